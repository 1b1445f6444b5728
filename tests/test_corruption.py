"""Damaged packs: a flipped byte in a frame's payload or header, a truncated or missing
pack. fsck must name the damage and the layers and paths it hurts; checkout and cat
must refuse with one line on stderr instead of writing wrong bytes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pylayers.layers.manifest import REG
from pylayers.layers.repo import Layers
from pylayers.store.packs import (
    CODEC_RAW,
    CODEC_ZSTD,
    FRAME_HEADER,
    FRAME_TARGET,
    TABLE_ENTRY,
    pack_path,
)
from pylayers.store.repository import Store


def run_cli(store: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pylayers", "--store", str(store), *args],
                          capture_output=True, timeout=120, cwd=store.parent)


def assert_refused(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 8, (proc.returncode, err)  # CorruptData
    assert "Traceback" not in err and "internal error" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def text(n: int, seed: int) -> bytes:
    out = bytearray()
    i = seed
    while len(out) < n:
        out += b"%08d the quick brown fox jumps over the lazy dog\n" % (i * 2654435761 % 10**8)
        i += 1
    return bytes(out[:n])


@pytest.fixture
def damaged_store(tmp_path: Path):
    """A store with two layers; both hold `random.bin` (raw frames) and `text.txt`
    (zstd frames); `keep.txt` differs per layer. Files are big enough (3 frame
    targets) that some frames hold the chunks of one file only."""
    store = tmp_path / "store"
    size = 3 * FRAME_TARGET
    rnd, txt = os.urandom(size), text(size, 1)
    srcs = []
    for i in range(2):
        src = tmp_path / f"src{i}"
        src.mkdir()
        (src / "random.bin").write_bytes(rnd)
        (src / "text.txt").write_bytes(txt)
        (src / "zz_keep.txt").write_bytes(b"keep %d\n" % i)
        srcs.append(src)
    ids = []
    for i, src in enumerate(srcs):
        proc = run_cli(store, "snapshot", str(src), "--tag", f"l{i}")
        assert proc.returncode == 0, proc.stderr
        ids.append(proc.stdout.decode().strip().splitlines()[-1])
    return store, srcs, ids


def frames_of_file(store_path: Path, layer: str, name: bytes):
    """(pack path, frame offset, codec, [(chunk id, start, length)] in payload order) of
    frames holding only chunks of the file `name`, and the ids of all its chunks."""
    with Store.open(store_path, create=False) as store:
        layers = Layers(store)
        tree = layers.tree(layers.resolve(layer))
        owner: dict[bytes, bytes] = {}
        for e in tree:
            if e.kind == REG:
                for c, _ in e.chunk_list():
                    owner.setdefault(c, e.path)
        frames: dict[tuple[str, int], list] = {}
        for c, loc in store.iter_chunk_locations():
            frames.setdefault((loc.pack, loc.offset), []).append((c, loc.start, loc.length))
        out = []
        for (pack, offset), cids in sorted(frames.items()):
            cids.sort(key=lambda x: x[1])
            if all(owner.get(c) == name for c, _, _ in cids):
                path = pack_path(store.packs_root, pack)
                with open(path, "rb") as f:
                    f.seek(offset)
                    codec = f.read(FRAME_HEADER.size)[4]
                out.append((path, offset, codec, cids))
        mine = {c for c, p in owner.items() if p == name}
    return out, mine


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ 0x5A]))


def check_damage_reported(store: Path, srcs, ids, damaged_path: str, needle: str) -> None:
    proc = run_cli(store, "fsck")
    out = proc.stdout.decode()
    assert proc.returncode == 1, (out, proc.stderr)
    damaged = [ln for ln in out.splitlines() if ln.startswith("damaged: ")]
    assert damaged, out
    assert any(needle in ln for ln in damaged), (needle, out)
    for lid in ids:  # both layers hold the file: both are named, with the path
        assert any(lid[:12] in ln and f"/{damaged_path}" in ln for ln in damaged), out
    assert not any("zz_keep" in ln for ln in damaged), out
    assert "problems" in proc.stderr.decode()

    for i, lid in enumerate(ids):
        dest = store.parent / f"checkout{i}"
        line = assert_refused(run_cli(store, "checkout", lid, str(dest)))
        assert "pylayers:" in line
        # nothing wrong was written under the damaged name
        if (dest / damaged_path).exists():
            want = (srcs[i] / damaged_path).read_bytes()
            got = (dest / damaged_path).read_bytes()
            assert want.startswith(got)
            assert got != want
        proc = run_cli(store, "cat", lid, f"/{damaged_path}")
        assert_refused(proc)
        want = (srcs[i] / damaged_path).read_bytes()
        assert proc.stdout != want and want.startswith(proc.stdout)
        # an undamaged file of the same layer still reads fine
        proc = run_cli(store, "cat", lid, "/zz_keep.txt")
        assert proc.returncode == 0 and proc.stdout == b"keep %d\n" % i


@pytest.mark.parametrize("name,codec", [(b"random.bin", CODEC_RAW), (b"text.txt", CODEC_ZSTD)])
def test_flipped_payload_byte(damaged_store, name: bytes, codec: int) -> None:
    store, srcs, ids = damaged_store
    frames, _ = frames_of_file(store, "l0", name)
    path, offset, got_codec, cids = frames[0]
    assert got_codec == codec, "the fixture should give this file its own frame"
    payload = offset + FRAME_HEADER.size + len(cids) * TABLE_ENTRY.size
    flip(path, payload + 1000)
    if codec == CODEC_RAW:  # the chunk holding that byte is named
        needle = next(c for c, start, n in cids if start <= 1000 < start + n).hex()
    else:  # a zstd frame fails to decompress (the frame is named) or yields wrong bytes
        out = run_cli(store, "fsck").stdout.decode()
        needle = f"frame at {offset}"
        if needle not in out:
            needle = next(c.hex() for c, _, _ in cids if c.hex() in out)
    check_damage_reported(store, srcs, ids, name.decode(), needle)


@pytest.mark.parametrize("field", [0, 8, 12, 16, 20, "table"])
def test_flipped_frame_header_byte(damaged_store, field) -> None:
    """magic, nchunks, raw_len, stored_len, crc, and a chunk id in the table."""
    store, srcs, ids = damaged_store
    frames, _ = frames_of_file(store, "l0", b"random.bin")
    path, offset, _codec, _cids = frames[0]
    pos = offset + (FRAME_HEADER.size + 5 if field == "table" else field)
    flip(path, pos)
    check_damage_reported(store, srcs, ids, "random.bin", f"frame at {offset}")


def test_truncated_pack(damaged_store) -> None:
    store, srcs, ids = damaged_store
    frames, _ = frames_of_file(store, "l0", b"text.txt")
    path, offset, _codec, _cids = frames[-1]
    os.truncate(path, offset + 10)  # cuts the file's frame, and everything after it
    proc = run_cli(store, "fsck")
    assert proc.returncode == 1
    out = proc.stdout.decode()
    assert f"frame at {offset}" in out and "truncated" in out
    # l0's manifest was after the cut; l1 (own pack for its manifest) names the path
    assert f"layer {ids[0][:12]}: manifest chunk" in out
    assert any(ids[1][:12] in ln and "/text.txt" in ln for ln in out.splitlines()), out
    for lid in ids:
        assert_refused(run_cli(store, "checkout", lid, str(store.parent / f"co{lid}")))


def test_missing_pack(damaged_store) -> None:
    store, srcs, ids = damaged_store
    frames, _ = frames_of_file(store, "l0", b"random.bin")
    path = frames[0][0]
    path.unlink()
    proc = run_cli(store, "fsck")
    assert proc.returncode == 1
    out = proc.stdout.decode()
    assert f"pack {path.stem} is missing" in out
    # l0 wrote that pack, its manifest included; l1 deduped its files into it
    assert f"layer {ids[0][:12]}: manifest chunk {ids[0]}" in out  # one-chunk manifest
    for f in ("/random.bin", "/text.txt"):
        assert any(ids[1][:12] in ln and f in ln for ln in out.splitlines()), out
    assert "zz_keep" not in out
    line = assert_refused(run_cli(store, "checkout", ids[1], str(store.parent / "co")))
    assert "missing" in line
    # gc must not make things worse: it refuses or keeps the layers as they are
    run_cli(store, "gc")
    proc = run_cli(store, "cat", ids[1], "/zz_keep.txt")
    assert proc.returncode == 0 and proc.stdout == b"keep 1\n"


def test_damage_in_a_manifest_chunk_is_reported(tmp_path: Path) -> None:
    store = tmp_path / "store"
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"small\n")
    proc = run_cli(store, "snapshot", str(src))
    lid = proc.stdout.decode().strip().splitlines()[-1]
    with Store.open(store, create=False) as s:
        layers = Layers(s)
        rec = layers.record(bytes.fromhex(lid))
        loc = s.location(rec.manifest[0][0])
        path = pack_path(s.packs_root, loc.pack)
    flip(path, loc.offset + 12)  # raw_len of the frame holding the manifest

    proc = run_cli(store, "fsck")
    assert proc.returncode == 1
    assert f"layer {lid[:12]}: manifest chunk" in proc.stdout.decode()
    for args in (["checkout", lid, str(tmp_path / "co")], ["cat", lid, "/f"], ["ls", lid],
                 ["diff", lid, str(src)]):
        assert_refused(run_cli(store, *args))
