"""x86 frames (docs/format.md, "x86 frames"): the C call filter (csrc/x86.c) against a
pure-Python reference, under AddressSanitizer and valgrind, and in a store: machine code
stored in x86 frames, smaller than without the filter, round trips, damage, and a version
7 store written without them."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from pylayers import _native
from pylayers.store.config import CONFIG_FILE
from pylayers.store.packs import (
    CODEC_ZSTD,
    CODEC_ZSTD_X86,
    FRAME_HEADER,
    TABLE_ENTRY,
    iter_frames,
    looks_like_x86,
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

def reference_filter(data: bytes, encode: bool) -> tuple[bytes, int]:
    """The transform of csrc/x86.h, byte by byte: the result and the operands converted."""
    b = bytearray(data)
    i = count = 0
    while i + 5 <= len(b):
        if b[i] not in (0xE8, 0xE9):
            i += 1
            continue
        if b[i + 4] in (0x00, 0xFF):
            v = int.from_bytes(b[i + 1 : i + 5], "little")
            r = (v + (i + 5) if encode else v - (i + 5)) & 0x01FFFFFF
            if r & 0x01000000:
                r |= 0xFE000000
            b[i + 1 : i + 5] = r.to_bytes(4, "little")
            count += 1
        i += 5
    return bytes(b), count


code_bytes = st.binary(max_size=400) | st.lists(
    st.sampled_from([0xE8, 0xE9, 0x00, 0xFF, 0x12, 0x90]), max_size=400).map(bytes)


@settings(max_examples=400, deadline=None)
@given(code_bytes, st.booleans())
def test_the_filter_matches_the_reference_and_undoes_itself(data: bytes, encode: bool) -> None:
    want, count = reference_filter(data, encode)
    got = bytearray(data)
    _native.x86_filter(got, encode)
    assert bytes(got) == want
    assert _native.x86_calls(data) == reference_filter(data, True)[1]
    if encode:
        assert count == _native.x86_calls(data)
    _native.x86_filter(got, not encode)
    assert bytes(got) == data  # decode(encode(b)) == b, and encode(decode(b)) == b


def fake_code(n: int, seed: int) -> bytes:
    """Bytes like a library's text section: instructions of a few bytes, one in five a
    call or jump to one of 60 functions (so each target is called from many places)."""
    rnd = random.Random(seed)
    funcs = [rnd.randrange(0, 1 << 20) for _ in range(60)]
    out = bytearray()
    while len(out) < n:
        if rnd.random() < 0.2:
            rel = rnd.choice(funcs) - (len(out) + 5)
            out += bytes([rnd.choice((0xE8, 0xE9))]) + (rel & 0xFFFFFFFF).to_bytes(4, "little")
        else:
            out += bytes(rnd.choice((0x48, 0x89, 0x8B, 0x83, 0xC3, 0x0F, 0x85))
                         for _ in range(rnd.randint(1, 7)))
    return bytes(out[:n])


def test_a_large_buffer_round_trips_and_code_is_what_looks_like_x86() -> None:
    code = fake_code(1 << 20, 1)
    enc = bytearray(code)
    _native.x86_filter(enc, True)
    assert bytes(enc) == reference_filter(code, True)[0]
    _native.x86_filter(memoryview(enc)[: len(enc)], False)
    assert bytes(enc) == code
    assert looks_like_x86(code)
    assert not looks_like_x86(module_source(1 << 20, 1))
    assert not looks_like_x86(random.Random(2).randbytes(1 << 20))


# -- the C core under sanitizers ----------------------------------------------------------

DRIVER = ["csrc/x86.c", "tests/native/x86_driver.c"]


@needs_gcc
def test_the_filter_under_asan_and_ubsan(tmp_path: Path) -> None:
    driver_under_asan(tmp_path, DRIVER)


@needs_gcc
@needs_valgrind
def test_the_filter_under_valgrind(tmp_path: Path) -> None:
    driver_under_valgrind(tmp_path, DRIVER)


# -- in a store ---------------------------------------------------------------------------

def write_tree(root: Path) -> None:
    (root / "lib").mkdir(parents=True, exist_ok=True)
    for i in range(3):
        (root / f"lib/libfake{i}.so").write_bytes(fake_code(2_000_000, i))
    (root / "src").mkdir(exist_ok=True)
    (root / "src/module.py").write_bytes(module_source(3_000_000, 7))


def frames(store: Path) -> list:
    return [(pack, fr) for pack in sorted((store / "packs").rglob("*.pack"))
            for fr in iter_frames(pack)]


def test_machine_code_is_stored_in_smaller_x86_frames(tmp_path: Path) -> None:
    store, src = tmp_path / "store", tmp_path / "src"
    write_tree(src)
    ref = snapshot(store, src)
    found = frames(store)
    x86 = [fr for _, fr in found if fr.codec == CODEC_ZSTD_X86]
    assert x86 and any(fr.codec == CODEC_ZSTD for _, fr in found)  # the text is not
    # the filter is why: the same bytes compressed without it are larger
    for fr in x86:
        raw = fr.raw()
        assert looks_like_x86(raw)
        plain = zstandard.ZstdCompressor(level=3).compress(bytes(raw))
        assert len(fr.payload) < 0.9 * len(plain)
    assert_checks_out(store, ref, src, tmp_path / "out")
    proc = run_cli(store, "fsck")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli(store, "cat", ref, "/lib/libfake1.so")
    assert proc.returncode == 0 and proc.stdout == (src / "lib/libfake1.so").read_bytes()


def test_a_damaged_x86_frame_is_reported_in_one_line(tmp_path: Path) -> None:
    store, src = tmp_path / "store", tmp_path / "src"
    write_tree(src)
    ref = snapshot(store, src)
    pack, fr = next((p, f) for p, f in frames(store) if f.codec == CODEC_ZSTD_X86)
    start = fr.offset + FRAME_HEADER.size + len(fr.table) * TABLE_ENTRY.size
    flip_byte(pack, start + len(fr.payload) // 2)
    proc = run_cli(store, "fsck")
    assert proc.returncode != 0
    assert pack.stem in proc.stdout.decode() + proc.stderr.decode()
    proc = run_cli(store, "checkout", ref, tmp_path / "out")
    err = proc.stderr.decode()
    assert proc.returncode != 0 and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_a_version_7_store_is_written_without_x86_frames(tmp_path: Path) -> None:
    """A store of format 7 (before x86 frames) is read and written by this pylayers
    without them, and stays version 7: an earlier pylayers can still read it."""
    store, src = tmp_path / "store", tmp_path / "src"
    (src / "empty").mkdir(parents=True)
    first = snapshot(store, src)
    set_store_version(store, 7)
    write_tree(src)
    ref = snapshot(store, src, "--parent", first)
    codecs = {fr.codec for _, fr in frames(store)}
    assert CODEC_ZSTD in codecs and CODEC_ZSTD_X86 not in codecs
    assert json.loads((store / CONFIG_FILE).read_text())["version"] == 7
    assert_checks_out(store, ref, src, tmp_path / "out")
    assert run_cli(store, "fsck").returncode == 0
