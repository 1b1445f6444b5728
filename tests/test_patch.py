"""Patch frames (docs/format.md, "Patch frames"): the C copy/insert delta (csrc/patch.c)
against a pure-Python reference decoder, under AddressSanitizer and valgrind, and in a
store: which files become patches, round trips, damage, and a version 6 store written
without them."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pylayers import _native
from pylayers.errors import CorruptData
from pylayers.store.config import CONFIG_FILE
from pylayers.store.packs import (
    CODEC_DELTA,
    CODEC_PATCH,
    FRAME_HEADER,
    TABLE_ENTRY,
    iter_frames,
)

sys.path.insert(0, os.path.dirname(__file__))

from treeutil import (  # noqa: E402
    assert_checks_out,
    driver_under_asan,
    driver_under_valgrind,
    flip_byte,
    module_source,
    needs_gcc,
    needs_valgrind,
    run_cli,
    set_store_version,
    snapshot,
)

# -- the reference ------------------------------------------------------------------------

def _varint(ops: bytes, i: int) -> tuple[int, int] | None:
    out = shift = 0
    while True:
        if i >= len(ops) or shift > 63:
            return None
        b = ops[i]
        i += 1
        out |= (b & 0x7F) << shift
        if not b & 0x80:
            return (out, i) if out < 1 << 64 else None
        shift += 7


def reference_apply(ops: bytes, base: bytes, out_len: int) -> tuple[bytes, int] | None:
    """What the ops rebuild from `base` and how many literal bytes they hold (not
    counting those in place), or None when they are malformed (csrc/patch.h, "Op
    stream")."""
    out = bytearray()
    i = prev_end = literals = 0
    while i < len(ops):
        got = _varint(ops, i)
        if got is None:
            return None
        tag, i = got
        lit = tag >> 1
        if lit > len(ops) - i or len(out) + lit > out_len:
            return None
        if tag & 1:  # in place: added to the base's bytes
            if prev_end + lit > len(base):
                return None
            out += bytes((a + b) & 0xFF for a, b in zip(ops[i:i + lit],
                                                        base[prev_end:prev_end + lit],
                                                        strict=True))
            prev_end += lit
        else:
            out += ops[i:i + lit]
            literals += lit
        i += lit
        got = _varint(ops, i)
        if got is None:
            return None
        copy, i = got
        if len(out) + copy > out_len:
            return None
        if not copy:
            continue
        got = _varint(ops, i)
        if got is None:
            return None
        zz, i = got
        shift = (zz >> 1) ^ -(zz & 1)
        start = prev_end + shift
        if start < 0 or start + copy > len(base):
            return None
        out += base[start:start + copy]
        prev_end = start + copy
    return (bytes(out), literals) if len(out) == out_len else None


def c_apply(ops: bytes, base: bytes, out_len: int) -> bytes | None:
    try:
        return _native.patch_apply(ops, base, out_len)
    except CorruptData:
        return None


def edited(base: bytes, rnd: random.Random, edits: int) -> bytes:
    """`base` with `edits` random edits: bytes changed, inserted, deleted, runs moved."""
    new = bytearray(base)
    for _ in range(edits):
        pos = rnd.randrange(len(new) + 1)
        kind = rnd.randrange(4)
        if kind == 0 and new:
            new[min(pos, len(new) - 1)] ^= rnd.randrange(1, 256)
        elif kind == 1:
            new[pos:pos] = rnd.randbytes(rnd.randrange(1, 40))
        elif kind == 2:
            del new[pos:pos + rnd.randrange(1, 80)]
        else:
            start = rnd.randrange(len(base) + 1)
            new[pos:pos] = base[start:start + rnd.randrange(1, 400)]
    return bytes(new)


# -- the C patch against the reference ------------------------------------------------------

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), size=st.integers(0, 50_000), edits=st.integers(0, 30),
       budget=st.sampled_from([0, 32, 4]))
def test_a_patch_rebuilds_its_file_within_its_literal_budget(seed: int, size: int,
                                                             edits: int, budget: int) -> None:
    rnd = random.Random(seed)
    # text-like bytes with repeats: several places of the base match a window
    base = bytes(rnd.choice(b"abcdefgh \n") for _ in range(size))
    raw = edited(base, rnd, edits)
    max_literals = len(raw) // budget if budget else len(raw)
    ops = _native.patch_make(raw, base, max_literals, len(raw) + len(raw) // 8 + 64)
    if ops is None:
        # not worth it: then the literal budget really was too small for its copies
        assert budget and max_literals < len(raw)
        return
    rebuilt = reference_apply(ops, base, len(raw))
    assert rebuilt is not None
    assert rebuilt[0] == raw and rebuilt[1] <= max_literals
    assert c_apply(ops, base, len(raw)) == raw
    # deterministic: the same inputs, the same stream; and the same with a table of the
    # caller's, left dirty by the last call (it is cleared before use)
    assert _native.patch_make(raw, base, max_literals, len(raw) + len(raw) // 8 + 64) == ops
    table = _DIRTY_TABLE[0]
    if len(table) < _native.patch_table_bytes(len(base)):
        table = _DIRTY_TABLE[0] = bytearray(b"\xff" * _native.patch_table_bytes(len(base)))
    assert _native.patch_make(raw, base, max_literals, len(raw) + len(raw) // 8 + 64,
                              table) == ops


_DIRTY_TABLE = [bytearray()]  # a patch table reused from example to example


def test_a_few_changed_bytes_cost_a_few_bytes_of_ops() -> None:
    """A .pyc whose 16-byte header changed, a file with one line inserted, a file with a
    run moved: the ops hold little more than the changed bytes."""
    rnd = random.Random(5)
    body = rnd.randbytes(40_000)
    old = b"HEAD" + bytes(12) + body
    new = b"HEAD" + b"\x01" * 12 + body
    ops = _native.patch_make(new, old, len(new) // 32, len(new))
    assert ops is not None and len(ops) <= 12 + 12
    inserted = body[:20_000] + b"# a new line\n" + body[20_000:]
    ops = _native.patch_make(inserted, body, len(inserted) // 32, len(inserted))
    assert ops is not None and len(ops) <= 13 + 24
    moved = body[30_000:] + body[:30_000]
    ops = _native.patch_make(moved, body, 0, len(moved))
    assert ops is not None and len(ops) <= 16
    assert c_apply(ops, body, len(moved)) == moved
    # a relinked library: 4-byte addresses moved alike every 64 bytes (a sixteenth of the
    # bytes): in place, their differences from the base repeat, and they are no literals
    linked = bytearray(body)
    for at in range(0, len(linked) - 4, 64):
        old = int.from_bytes(linked[at:at + 4], "little")
        linked[at:at + 4] = ((old + 0x1000) & 0xFFFFFFFF).to_bytes(4, "little")
    ops = _native.patch_make(bytes(linked), body, len(linked) // 32, len(linked))
    assert ops is not None
    rebuilt, literals = reference_apply(ops, body, len(linked))
    assert rebuilt == linked and literals == 0
    assert c_apply(ops, body, len(linked)) == linked
    # unrelated bytes: the scan gives up at its budget
    assert _native.patch_make(rnd.randbytes(40_000), body, 1250, 60_000) is None


@settings(max_examples=400, deadline=None)
@given(seed=st.integers(0, 2**32), cut=st.integers(0, 200), flips=st.integers(0, 4),
       tail=st.binary(max_size=12))
def test_damaged_ops_are_refused_as_the_reference_refuses_them(seed: int, cut: int,
                                                               flips: int,
                                                               tail: bytes) -> None:
    """The C decoder and the reference agree on any op stream, damaged or not: the
    same bytes, or both refuse it."""
    rnd = random.Random(seed)
    base = rnd.randbytes(rnd.randrange(0, 3000))
    raw = edited(base, rnd, rnd.randrange(0, 8))
    ops = _native.patch_make(raw, base, len(raw), len(raw) + len(raw) // 8 + 64)
    assert ops is not None
    bad = bytearray(ops[:max(0, len(ops) - cut)] if cut % 3 == 0 else ops)
    for _ in range(flips):
        if bad:
            bad[rnd.randrange(len(bad))] ^= 1 << rnd.randrange(8)
    bad += tail
    for out_len in (len(raw), len(raw) + 1, max(0, len(raw) - 1)):
        want = reference_apply(bytes(bad), base, out_len)
        assert c_apply(bytes(bad), base, out_len) == (want[0] if want else None)


@pytest.mark.parametrize("ops,why", [
    (b"\xff" * 10 + b"\x7f", "a varint past 64 bits"),
    (b"\x00\x04\x03", "a copy before the base's start"),
    (b"\x00\x04\x0e", "a copy past the base's end"),
    (b"\x00\x04", "a copy without its shift"),
    (b"\x0aab", "literals cut short"),
    (b"\x02x\x04\x04\x00", "an op after the output is full"),
    (b"\x00\x04\x08\x03\x00", "in-place bytes past the base's end"),
])
def test_malformed_ops_are_corrupt_data(ops: bytes, why: str) -> None:
    base = b"abcdefgh"
    assert reference_apply(ops, base, 5) is None, why
    with pytest.raises(CorruptData, match="malformed patch"):
        _native.patch_apply(ops, base, 5)
    assert _native.patch_apply(b"\x02x\x04\x04", base, 5) == b"xcdef"
    assert _native.patch_apply(b"\x03\x01\x04\x00", base, 5) == b"bbcde"  # in place


# -- the C core under sanitizers ----------------------------------------------------------

DRIVER = ["csrc/patch.c", "tests/native/patch_driver.c"]


@needs_gcc
def test_patch_under_asan_and_ubsan(tmp_path: Path) -> None:
    driver_under_asan(tmp_path, DRIVER)


@needs_gcc
@needs_valgrind
def test_patch_under_valgrind(tmp_path: Path) -> None:
    driver_under_valgrind(tmp_path, DRIVER)


# -- in a store ---------------------------------------------------------------------------

def write_tree(root: Path, stamp: int) -> None:
    for i in range(6):
        body = random.Random(i).randbytes(8_000 + 3_000 * i) + module_source(20_000, i)
        p = root / f"pkg/__pycache__/m{i}.pyc"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\x6f\x0d\x0d\x0a" + stamp.to_bytes(12, "little") + body)
    # every 12th byte of random bytes changed: no run of 16 to copy, so no patch; zstd
    # still finds the 11-byte runs in the base (a tenth of the bytes alone)
    noise = bytearray(random.Random(99).randbytes(60_000))
    for at in range(0, len(noise), 12):
        noise[at] = (noise[at] + stamp) & 0xFF
    (root / "noise.bin").write_bytes(bytes(noise))


def frames_by_codec(store: Path) -> dict[int, list]:
    out: dict[int, list] = {}
    for pack in sorted((store / "packs").rglob("*.pack")):
        for fr in iter_frames(pack):
            out.setdefault(fr.codec, []).append((pack, fr))
    return out


def test_headers_become_patches_and_scattered_edits_zstd_deltas(tmp_path: Path) -> None:
    store, src = tmp_path / "store", tmp_path / "src"
    write_tree(src, 1)
    v1 = snapshot(store, src)
    keep = tmp_path / "v1"
    shutil.copytree(src, keep, symlinks=True)
    write_tree(src, 2)
    v2 = snapshot(store, src, "--parent", v1)
    found = frames_by_codec(store)
    patches, deltas = found.get(CODEC_PATCH, []), found.get(CODEC_DELTA, [])
    assert len(patches) == 6  # the .pyc files: a header changed
    assert all(fr.payload and len(fr.payload) < 60 for _, fr in patches)
    assert len(deltas) == 1  # noise.bin
    assert deltas[0][1].raw_len == 60_000
    assert_checks_out(store, v2, src, tmp_path / "out2")
    assert_checks_out(store, v1, keep, tmp_path / "out1")
    proc = run_cli(store, "fsck")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli(store, "cat", v2, "/pkg/__pycache__/m3.pyc")
    assert proc.returncode == 0 and proc.stdout == (src / "pkg/__pycache__/m3.pyc").read_bytes()


@pytest.mark.parametrize("where", ["payload", "base list"])
def test_a_damaged_patch_frame_is_reported_in_one_line(tmp_path: Path, where: str) -> None:
    store, src = tmp_path / "store", tmp_path / "src"
    write_tree(src, 1)
    v1 = snapshot(store, src)
    write_tree(src, 2)
    v2 = snapshot(store, src, "--parent", v1)
    pack, fr = frames_by_codec(store)[CODEC_PATCH][0]
    start = fr.offset + FRAME_HEADER.size + len(fr.table) * TABLE_ENTRY.size + 32 * len(fr.base)
    at = start + len(fr.payload) // 2 if where == "payload" else start - 5
    flip_byte(pack, at)
    proc = run_cli(store, "fsck")
    assert proc.returncode != 0
    assert pack.stem in proc.stdout.decode() + proc.stderr.decode()
    proc = run_cli(store, "checkout", v2, tmp_path / "out")
    err = proc.stderr.decode()
    assert proc.returncode != 0 and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_a_version_6_store_is_written_without_patches(tmp_path: Path) -> None:
    """A store of format 6 (before patch frames) is read and written by this pylayers,
    with zstd deltas only, and stays version 6: an earlier pylayers can still read it."""
    store, src = tmp_path / "store", tmp_path / "src"
    write_tree(src, 1)
    v1 = snapshot(store, src)
    set_store_version(store, 6)
    cfg = json.loads((store / CONFIG_FILE).read_text())
    write_tree(src, 2)
    v2 = snapshot(store, src, "--parent", v1)
    found = frames_by_codec(store)
    assert CODEC_PATCH not in found
    assert len(found[CODEC_DELTA]) == 7  # the six .pyc files and noise.bin
    assert json.loads((store / CONFIG_FILE).read_text())["version"] == 6
    assert_checks_out(store, v2, src, tmp_path / "out")
    assert run_cli(store, "fsck").returncode == 0
    # an index that says 6 under a config that says 7 is refused
    cfg["version"] = 7
    (store / CONFIG_FILE).write_text(json.dumps(cfg))
    proc = run_cli(store, "log", v2)
    assert proc.returncode != 0 and b"index has format version 6" in proc.stderr


def test_a_patch_claiming_a_long_op_stream_is_damage_not_an_allocation() -> None:
    """A patch frame's payload that says it decompresses to more than any patch of its
    frame can hold is refused before anything is allocated, by both read paths."""
    import zstandard

    from pylayers.store.packs import Frame, delta_into

    base = b"abcdefgh" * 100
    for claimed in (10_000, 1 << 40):
        # a zstd frame header whose content size says `claimed` bytes
        params = zstandard.ZstdCompressionParameters.from_level(3, write_content_size=True)
        payload = zstandard.ZstdCompressor(compression_params=params).compress(bytes(10_000))
        if claimed != 10_000:  # patch the header's 8-byte content size field
            payload = payload[:5] + claimed.to_bytes(8, "little") + payload[13:]
            payload = bytes([payload[0], payload[1], payload[2], payload[3], 0xE0]) + \
                payload[5:]
        frame = Frame(0, 0, CODEC_PATCH, 100, [(bytes(32), 100)], payload, [bytes(32)])
        with pytest.raises(CorruptData, match="too long|cannot decompress"):
            frame.raw(base)
        with pytest.raises(CorruptData, match="too long|cannot decompress"):
            delta_into(frame, base, bytearray(100))


def test_delta_into_rebuilds_a_patch_into_the_buffer() -> None:
    """A checkout's reader (`packs.delta_into`) rebuilds a patch frame into its reused
    buffer, the same bytes as `Frame.raw`."""
    import blake3

    from pylayers.store.packs import decode_frame, delta_into, encode_delta_frame

    rnd = random.Random(11)
    old = rnd.randbytes(100_000)
    new = bytearray(old)
    for at in range(50, len(new), 5_000):
        new[at] ^= 0x5A
    chunks = [(blake3.blake3(bytes(new)).digest(), bytes(new))]
    fr = decode_frame(encode_delta_frame(chunks, [bytes(32)], old, 3), 0, "test")
    assert fr.codec == CODEC_PATCH
    assert fr.raw(old) == new
    buf = bytearray(len(new) + 10)
    got = delta_into(fr, old, buf)
    assert got.obj is buf and bytes(got) == new
    fr.payload = fr.payload[:-3]
    with pytest.raises(CorruptData, match="frame at offset 0"):
        delta_into(fr, old, buf)
