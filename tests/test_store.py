"""The chunk store at unit level (locations, frames, packs, the chunk writer) and the
store's format checks, driven through the real CLI where a user would meet them.

Real files, real LMDB, real processes; nothing of pylayers is mocked.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import blake3
import lmdb
import pytest
import zstandard

import pylayers
from pylayers.errors import CorruptData, StoreError
from pylayers.store import packs
from pylayers.store.config import CONFIG_FILE, FORMAT_VERSION
from pylayers.store.fsutil import write_atomically
from pylayers.store.packs import (
    CODEC_RAW,
    CODEC_ZSTD,
    FRAME_HEADER,
    PACK_HEADER,
    Location,
    PackReader,
    PackWriter,
    decode_frame,
    encode_frame,
    iter_frames,
)
from pylayers.store.repository import Store

sys.path.insert(0, os.path.dirname(__file__))
from treeutil import flip_byte  # noqa: E402


def cid(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def run_cli(store: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    # cwd must not be the source tree: `python -m` would import the unbuilt sources.
    return subprocess.run([sys.executable, "-m", "pylayers", "--store", str(store), *args],
                          capture_output=True, text=True, timeout=120,
                          cwd=cwd or store.parent)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str,
                          code: int = 7) -> None:
    """One line; exit status 7 (StoreError: the store cannot be used) unless `code`."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])


def text_bytes(n: int, seed: int = 0) -> bytes:
    words = [b"layer", b"chunk", b"store", b"frame", b"pack", b"index", b"zstd", b"fsck"]
    out = bytearray()
    i = seed
    while len(out) < n:
        out += words[i % len(words)] + b" %d\n" % (i * 7919 % 1000)
        i += 1
    return bytes(out[:n])


# -- Location ----------------------------------------------------------------------------

@pytest.mark.parametrize("loc", [
    Location("00" * 16, 0, 0, 0, 0),
    Location("0123456789abcdef" * 2, 16, 1 << 20, 4096, 65536),
    Location("ff" * 16, (1 << 64) - 1, (1 << 32) - 1, (1 << 32) - 1, (1 << 32) - 1, True),
])
def test_location_round_trip(loc: Location) -> None:
    raw = loc.encode()
    assert len(raw) == 16 + 8 + 4 + 4 + 4 + 1
    assert raw[-1] == (1 if loc.delta else 0)
    assert Location.decode(raw) == loc
    # the pack id is stored as 16 raw bytes, first in the value (docs/format.md)
    assert raw[:16] == bytes.fromhex(loc.pack)
    assert struct.unpack_from("<Q", raw, 16)[0] == loc.offset


# -- frames --------------------------------------------------------------------------------

def test_frame_round_trip_random_stays_raw() -> None:
    chunks = [(cid(d), d) for d in (os.urandom(70000), os.urandom(3), os.urandom(40000))]
    frame = encode_frame(chunks, level=3)
    f = decode_frame(frame, 16, "test")
    assert f.codec == CODEC_RAW
    assert f.length == len(frame)
    assert f.table == [(c, len(d)) for c, d in chunks]
    raw = b"".join(d for _, d in chunks)
    assert f.payload == raw and f.raw() == raw
    assert len(frame) == FRAME_HEADER.size + 3 * 36 + len(raw)


def test_frame_round_trip_text_compresses() -> None:
    data = [text_bytes(200_000, s) for s in range(3)]
    chunks = [(cid(d), d) for d in data]
    frame = encode_frame(chunks, level=3)
    f = decode_frame(frame, 0, "test")
    assert f.codec == CODEC_ZSTD
    assert len(frame) < sum(map(len, data)) // 4
    assert f.raw() == b"".join(data)
    assert f.raw_len == sum(map(len, data))
    # level 0 means: never compress
    f0 = decode_frame(encode_frame(chunks, level=0), 0, "test")
    assert f0.codec == CODEC_RAW and f0.raw() == b"".join(data)


def test_frame_damage_is_detected() -> None:
    d = text_bytes(50_000)
    frame = bytearray(encode_frame([(cid(d), d)], level=3))
    for pos in (0, 5, 9, 13, 17, 21, FRAME_HEADER.size + 3):  # header fields and table
        bad = bytearray(frame)
        bad[pos] ^= 0x40
        with pytest.raises(CorruptData):
            decode_frame(bytes(bad), 0, "test").raw()
    with pytest.raises(CorruptData):
        decode_frame(bytes(frame[:-1]), 0, "test")
    with pytest.raises(CorruptData):
        decode_frame(bytes(frame[:10]), 0, "test")


# -- packs ---------------------------------------------------------------------------------

def write_pack(root: Path, chunk_data: list[bytes], level: int = 3):
    w = PackWriter(root, level)
    try:
        for d in chunk_data:
            w.add(cid(d), d)
        written = w.flush()
        w.keep(written)
    finally:
        w.close()
    return dict(written)


def test_pack_writer_frames_and_iter_frames(tmp_path: Path) -> None:
    piece = packs.FRAME_TARGET // 8 + 1000
    data = [os.urandom(piece) for _ in range(16)]  # two frame targets: at least two frames
    locs = write_pack(tmp_path, data)
    assert set(locs) == {cid(d) for d in data}
    packs_found = list(tmp_path.glob("*/*.pack"))
    assert len(packs_found) == 1
    frames = list(iter_frames(packs_found[0]))
    assert len(frames) >= 2
    by_id = {}
    for fr in frames:
        raw, start = fr.raw(), 0
        for c, n in fr.table:
            by_id[c] = (fr.offset, raw[start:start + n])
            start += n
    for d in data:
        loc = locs[cid(d)]
        assert by_id[cid(d)] == (loc.offset, d)
    assert frames[0].offset == PACK_HEADER.size


def test_pack_writer_copies_chunks_as_they_are_added(tmp_path: Path) -> None:
    """Chunks given as views of a buffer the caller then reuses (a file's read buffer)
    are stored as they were when added, across frames whose buffers the writer reuses
    (compressed frames, and raw ones written from the buffer itself), and a chunk that
    overflows a frame's buffer (a store of large chunks) grows it; the frames are the
    ones `encode_frame` makes of the same chunks."""
    src = bytearray(text_bytes(3 * packs.FRAME_TARGET, seed=5))
    big = text_bytes(packs.FRAME_BUFFER - packs.FRAME_TARGET + 100_000, seed=9)
    step = 200_000
    expected = []
    w = PackWriter(tmp_path, 3)
    try:
        for _ in range(2):  # twice the frames the writer keeps buffers for: reused
            for i in range(0, len(src), step):
                piece = bytes(src[i:i + step])
                with memoryview(src) as view:
                    w.add(cid(piece), view[i:i + step])
                src[i:i + step] = bytes(len(piece))  # the caller's buffer, reused
                expected.append(piece)
                if len(expected) == 20:  # near a frame's end: past its buffer
                    w.add(cid(big), memoryview(big))
                    expected.append(big)
            src[:] = os.urandom(len(src))  # incompressible: raw frames, whose payload
            # the writer writes from its buffer
        written = w.flush()
        w.keep(written)
    finally:
        w.close()
    (pack,) = tmp_path.glob("*/*.pack")
    frames = list(iter_frames(pack))
    assert len(frames) >= 6
    assert {fr.codec for fr in frames} == {CODEC_RAW, CODEC_ZSTD}
    got = []
    for fr in frames:
        raw, start = fr.raw(), 0
        chunks = []
        for c, n in fr.table:
            chunks.append((c, raw[start:start + n]))
            start += n
        assert pack.read_bytes()[fr.offset:fr.offset + fr.length] == encode_frame(chunks, 3)
        got += [d for _, d in chunks]
    assert got == expected
    assert [cid(d) for d in got] == [c for fr in frames for c, _ in fr.table]


def test_pack_writer_removes_what_was_never_indexed(tmp_path: Path) -> None:
    """close() deletes a pack nothing was kept of, and cuts a pack back to its last kept
    frame: a failed job leaves no dead data."""
    data = [os.urandom(400_000) for _ in range(6)]
    w = PackWriter(tmp_path, 3)
    for d in data[:3]:
        w.add(cid(d), d)
    w.flush()  # durable, but never indexed (no keep)
    w.close()
    assert list(tmp_path.glob("*/*.pack")) == []

    w = PackWriter(tmp_path, 3)
    for d in data[:3]:
        w.add(cid(d), d)
    kept = w.flush()
    w.keep(kept)
    for d in data[3:]:
        w.add(cid(d), d)
    w.flush()  # written and durable, then the job failed before indexing it
    (pack,) = tmp_path.glob("*/*.pack")
    end = max(loc.offset + loc.frame_len for _, loc in kept)
    assert pack.stat().st_size > end
    w.close()
    assert pack.stat().st_size == end
    frames = list(iter_frames(pack))  # a clean end: no partial frame
    assert {c for f in frames for c, _ in f.table} == {cid(d) for d in data[:3]}
    reader = PackReader(tmp_path)
    try:
        for c, loc in kept:
            assert cid(reader.read(loc)) == c
    finally:
        reader.close()


def _payload_offset(pack: Path, frame_offset: int) -> int:
    with open(pack, "rb") as f:
        f.seek(frame_offset)
        n = FRAME_HEADER.unpack(f.read(FRAME_HEADER.size))[3]
    return frame_offset + FRAME_HEADER.size + n * packs.TABLE_ENTRY.size


def test_pack_reader_caches_decoded_frames(tmp_path: Path) -> None:
    piece = packs.FRAME_TARGET * 3 // 5
    data = [os.urandom(piece) for _ in range(6)]  # one or two chunks per frame
    locs = write_pack(tmp_path, data)
    offsets = sorted({loc.offset for loc in locs.values()})
    assert len(offsets) >= 3
    frame_of = {off: [d for d in data if locs[cid(d)].offset == off] for off in offsets}
    a, b, c = (frame_of[o][0] for o in offsets[:3])
    pack = next(tmp_path.glob("*/*.pack"))

    reader = PackReader(tmp_path, cache_frames=2)
    try:
        assert reader.read(locs[cid(a)]) == a
        assert reader.read(locs[cid(b)]) == b
        # damage frames A and B on disk: reads served from the cache do not see it
        flip_byte(pack, _payload_offset(pack, locs[cid(a)].offset) + locs[cid(a)].start + 10)
        flip_byte(pack, _payload_offset(pack, locs[cid(b)].offset) + locs[cid(b)].start + 10)
        assert reader.read(locs[cid(a)]) == a  # hit; A is now the most recently used
        assert reader.read(locs[cid(c)]) == c  # evicts the least recently used: B
        assert reader.read(locs[cid(a)]) == a  # A still cached
        got_b = reader.read(locs[cid(b)])  # re-read from disk: damaged bytes
        assert got_b != b
    finally:
        reader.close()
    reader = PackReader(tmp_path, cache_frames=2)
    try:
        assert reader.read(locs[cid(a)]) != a  # a fresh reader reads the disk
    finally:
        reader.close()


def test_pack_reader_threads_share_a_frame_and_its_error(tmp_path: Path) -> None:
    """Threads that want a frame another is decompressing wait for it instead of
    decompressing it again (a writer's workers read neighbouring bases): every read
    still gets its bytes, and when the frame is damaged every waiter gets the error,
    none waits forever."""
    import random
    import threading

    data = [b"".join(b"line %d of chunk %d\n" % (j, i) for j in range(25_000))
            for i in range(12)]  # 5 MB of text: two frames, compressed
    locs = write_pack(tmp_path, data)
    assert len({loc.offset for loc in locs.values()}) >= 2

    def hammer(reader: PackReader, wanted: list[bytes], results: list) -> None:
        order = list(wanted)
        random.Random(len(results)).shuffle(order)
        try:
            results.append(all(reader.read(locs[cid(d)]) == d for d in order))
        except CorruptData as e:
            results.append(e)

    def run(reader: PackReader, wanted: list[bytes]) -> list:
        results: list = []
        threads = [threading.Thread(target=hammer, args=(reader, wanted, results))
                   for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
            assert not t.is_alive()
        reader.close()
        return results

    assert run(PackReader(tmp_path, cache_frames=1), data) == [True] * 8
    first = min(loc.offset for loc in locs.values())
    pack = next(tmp_path.glob("*/*.pack"))
    flip_byte(pack, first)  # the frame's magic: every read of it fails
    in_first = [d for d in data if locs[cid(d)].offset == first]
    results = run(PackReader(tmp_path, cache_frames=1), in_first)
    assert len(results) == 8 and all(isinstance(r, CorruptData) for r in results)


def test_pack_reader_missing_pack(tmp_path: Path) -> None:
    reader = PackReader(tmp_path)
    with pytest.raises(CorruptData, match="missing"):
        reader.read(Location("ab" * 16, 16, 100, 0, 10))
    reader.close()


# -- the store's chunk writer --------------------------------------------------------------

def test_chunk_writer_dedups(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    other = os.urandom(50_000)
    with Store.open(tmp_path / "s") as store:
        with store.writer() as w:
            assert w.put(cid(data), data) is True
            assert w.put(cid(data), data) is False  # same chunk, same job: stored once
            assert w.put(cid(other), other) is True
            w.commit()
            assert w.new_chunks == 2
        assert store.chunk_count() == 2
        pack_files = store.pack_files()
        assert len(pack_files) == 1
        frames = list(iter_frames(pack_files[0]))
        assert sum(len(f.table) for f in frames) == 2
        assert sum(f.raw_len for f in frames) == len(data) + len(other)
        # a later job finds it in the index and writes nothing at all
        with store.writer() as w:
            assert w.put(cid(data), data) is False
            w.commit()
            assert w.new_chunks == 0
        assert len(store.pack_files()) == 1
        assert store.chunk_count() == 2
        assert store.read_chunk(cid(data)) == data
        assert store.read_chunk(cid(other)) == other


def test_uncommitted_chunks_are_not_indexed(tmp_path: Path) -> None:
    data = os.urandom(20_000)
    with Store.open(tmp_path / "s") as store:
        with store.writer() as w:
            w.put(cid(data), data)
        assert not store.has_chunk(cid(data))
        assert store.chunk_count() == 0


def test_read_chunk_verifies_ids(tmp_path: Path) -> None:
    good, evil = os.urandom(10_000), os.urandom(10_000)
    with Store.open(tmp_path / "s") as store:
        with store.writer() as w:
            w.put(cid(good), evil)  # an index entry whose bytes do not match its id
            w.commit()
        with pytest.raises(CorruptData, match=cid(good).hex()):
            store.read_chunk(cid(good))
        with pytest.raises(CorruptData, match="missing"):
            store.read_chunk(cid(evil))


# -- du ----------------------------------------------------------------------------------

def test_du_json_is_consistent(tmp_path: Path) -> None:
    store = tmp_path / "store"
    shared = os.urandom(3 << 20)
    sizes = 0
    for name in ("t1", "t2", "t3"):
        d = tmp_path / name
        d.mkdir()
        (d / "shared.bin").write_bytes(shared)
        own = (name.encode() + b"\n") * 1000
        (d / "own.txt").write_bytes(own)
        sizes += len(shared) + len(own)
        assert run_cli(store, "snapshot", str(d)).returncode == 0
    proc = run_cli(store, "du", "--json")
    assert proc.returncode == 0, proc.stderr
    du = json.loads(proc.stdout)
    assert du["layers"] == 3
    assert du["logical_bytes"] == sizes
    on_disk = 0
    for dirpath, _dirs, files in os.walk(store):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            on_disk += min(st.st_size, st.st_blocks * 512)
    assert du["stored_bytes"] == on_disk
    pack_bytes = sum(p.stat().st_size for p in (store / "packs").glob("*/*.pack"))
    assert pack_bytes <= du["stored_bytes"]
    # the shared 3 MiB (random: incompressible) is stored once, not three times
    assert len(shared) <= pack_bytes < 2 * len(shared)
    # the ratio is of file data: manifests and the index's fixed overhead are apart
    assert du["pack_bytes"] == pack_bytes
    assert du["dedup_ratio"] == round(du["logical_bytes"] / du["data_bytes"], 3)
    assert du["dedup_ratio"] > 1.5
    with Store.open(store, create=False) as s:
        assert du["chunks"] == s.chunk_count()


# -- format checks -------------------------------------------------------------------------

ALL_COMMANDS = [
    ["snapshot", "{src}"], ["checkout", "base", "{dest}"], ["log", "base"], ["show", "base"],
    ["ls", "base"], ["cat", "base", "/f"], ["diff", "base", "{src}"], ["tag", "x", "base"],
    ["tags"], ["rm", "base"], ["du"], ["du", "--json"], ["gc"], ["fsck"],
]


@pytest.fixture
def base_store(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"hello\n")
    store = tmp_path / "store"
    proc = run_cli(store, "snapshot", str(src), "--tag", "base")
    assert proc.returncode == 0, proc.stderr
    return store, src


def _every_command_refuses(store: Path, src: Path, tmp_path: Path, *needles: str) -> None:
    before = sorted(str(p.relative_to(store)) for p in store.rglob("*"))
    for i, cmd in enumerate(ALL_COMMANDS):
        args = [a.format(src=src, dest=tmp_path / f"out{i}") for a in cmd]
        proc = run_cli(store, *args)
        assert_one_line_error(proc, *needles)
        assert not (tmp_path / f"out{i}").exists()
    assert sorted(str(p.relative_to(store)) for p in store.rglob("*")) == before


def test_newer_config_version_is_refused_by_every_command(base_store, tmp_path: Path) -> None:
    store, src = base_store
    cfg = json.loads((store / CONFIG_FILE).read_text())
    cfg["version"] = 99
    (store / CONFIG_FILE).write_text(json.dumps(cfg))
    _every_command_refuses(store, src, tmp_path, "version 99")
    proc = run_cli(store, "init")
    assert_one_line_error(proc, "exists", code=4)
    with pytest.raises(StoreError, match="version 99"):
        Store.open(store)


def test_newer_index_format_is_refused(base_store, tmp_path: Path) -> None:
    store, src = base_store
    env = lmdb.open(str(store / "index"), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(b"format_version", b"99", db=env.open_db(b"meta", txn=txn))
    env.close()
    _every_command_refuses(store, src, tmp_path, "version 99")
    with pytest.raises(StoreError, match="99"):
        Store.open(store)


def make_version_1(store: Path) -> None:
    """Turn a store into what a pylayers of format version 1 wrote: no `fingerprints` or
    `refs` table, a tree fingerprint in `statcache` under a b"tree:" key, version 1 in
    config.json and in the index."""
    cfg = json.loads((store / CONFIG_FILE).read_text())
    cfg["version"] = 1
    (store / CONFIG_FILE).write_text(json.dumps(cfg))
    env = lmdb.open(str(store / "index"), max_dbs=16)
    with env.begin(write=True) as txn:
        for name in (b"fingerprints", b"refs"):
            txn.drop(env.open_db(name, txn=txn), delete=True)
        txn.put(b"format_version", b"1", db=env.open_db(b"meta", txn=txn))
        txn.put(b"tree:" + bytes(32), bytes(64), db=env.open_db(b"statcache", txn=txn))
    env.close()


def test_a_version_1_store_is_refused_by_every_command(base_store, tmp_path: Path) -> None:
    store, src = base_store
    make_version_1(store)
    _every_command_refuses(store, src, tmp_path, "version 1", "earlier pylayers")
    want = f"version 1; this pylayers reads version {FORMAT_VERSION}"
    with pytest.raises(StoreError, match=want):
        Store.open(store)
    # config.json edited to say 2: the index still says 1, and nothing is created in it
    cfg = json.loads((store / CONFIG_FILE).read_text())
    cfg["version"] = FORMAT_VERSION
    (store / CONFIG_FILE).write_text(json.dumps(cfg))
    _every_command_refuses(store, src, tmp_path, "index has format version 1",
                           "earlier pylayers")
    env = lmdb.open(str(store / "index"), max_dbs=16, readonly=True)
    with env.begin() as txn:
        names = {bytes(k) for k in txn.cursor().iternext(values=False)}
    env.close()
    assert b"fingerprints" not in names and b"refs" not in names


# An earlier version's store, as it differed from this version's: (what it lacked or
# had, as tables to drop and (table, key, value) to put), and how its index looks after
# every command refused it (nothing created or changed in it).
OLD_VERSIONS = {
    # no delta frames, `flags` byte or `paths` table
    2: ((b"paths",), (), lambda names: b"paths" not in names),
    # a per-inode `statcache` table and no `walkcache`
    3: ((b"walkcache",), ((b"statcache", b"\x01" * 16, bytes(56)),),
        lambda names: b"walkcache" not in names and b"statcache" in names),
    # one image config per top layer, no `layer_configs`, tags without a config digest
    4: ((b"layer_configs",), (), lambda names: b"layer_configs" not in names),
    # manifests with every file as chunks (PLYRMAN1): the tables are version 6's
    5: ((), (), lambda names: b"layer_configs" in names and b"paths" in names),
}


@pytest.mark.parametrize("version", sorted(OLD_VERSIONS))
def test_an_earlier_version_store_is_refused_by_every_command(
        base_store, tmp_path: Path, version: int) -> None:
    """A store whose config and index both say an earlier version (its index as that
    version had it, OLD_VERSIONS) is refused with one line by every command, and
    nothing is created or changed in its index."""
    drop, put, untouched = OLD_VERSIONS[version]
    store, src = base_store
    cfg = json.loads((store / CONFIG_FILE).read_text())
    cfg["version"] = version
    (store / CONFIG_FILE).write_text(json.dumps(cfg))
    env = lmdb.open(str(store / "index"), max_dbs=16)
    with env.begin(write=True) as txn:
        for name in drop:
            txn.drop(env.open_db(name, txn=txn), delete=True)
        for name, key, value in put:
            txn.put(key, value, db=env.open_db(name, txn=txn))
        txn.put(b"format_version", str(version).encode(), db=env.open_db(b"meta", txn=txn))
    env.close()
    _every_command_refuses(store, src, tmp_path, f"version {version}", "earlier pylayers")
    want = f"version {version}; this pylayers reads version {FORMAT_VERSION}"
    with pytest.raises(StoreError, match=want):
        Store.open(store)
    env = lmdb.open(str(store / "index"), max_dbs=16, readonly=True)
    with env.begin() as txn:
        names = {bytes(k) for k in txn.cursor().iternext(values=False)}
    env.close()
    assert untouched(names)


@pytest.mark.parametrize("value", [b"abc", b"0", b""])
def test_malformed_index_format_is_one_line(base_store, value: bytes) -> None:
    store, src = base_store
    env = lmdb.open(str(store / "index"), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(b"format_version", value, db=env.open_db(b"meta", txn=txn))
    env.close()
    for args in (["fsck"], ["snapshot", str(src)], ["du"]):
        assert_one_line_error(run_cli(store, *args), "format version")


def test_foreign_directory_is_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine\n")
    src = tmp_path / "src"
    src.mkdir()
    for args in (["init"], ["snapshot", str(src)], ["fsck"], ["gc"], ["du"], ["tags"]):
        proc = run_cli(foreign, *args)
        assert_one_line_error(proc, "not a pylayers store")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]  # nothing written
    # a config.json of something else is not ours either
    (foreign / CONFIG_FILE).write_text('{"format": "something-else", "version": 1}')
    assert_one_line_error(run_cli(foreign, "snapshot", str(src)), "not a pylayers store")
    (foreign / CONFIG_FILE).write_text("[1, 2, 3]")
    assert_one_line_error(run_cli(foreign, "fsck"))
    # a plain file is not a store
    f = tmp_path / "file"
    f.write_text("x")
    assert_one_line_error(run_cli(f, "snapshot", str(src)), "not a directory")


def test_interrupted_init_is_completed(tmp_path: Path) -> None:
    """A store whose creation stopped before config.json (killed, or another process
    creating it right now) holds only an empty index, empty packs/ and the lock file;
    the next command that may create a store finishes the job instead of calling the
    directory foreign. With packs in it, it is not ours to touch."""
    store = tmp_path / "store"
    Store.open(store).close()
    (store / CONFIG_FILE).unlink()
    (store / ".config.json.12345.tmp").write_bytes(b'{"form')  # killed mid-write
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data\n")
    assert_one_line_error(run_cli(store, "fsck"), "no store")
    proc = run_cli(store, "snapshot", str(src))
    assert proc.returncode == 0, proc.stderr
    assert run_cli(store, "fsck").returncode == 0
    (store / CONFIG_FILE).unlink()
    assert_one_line_error(run_cli(store, "snapshot", str(src)), "not a pylayers store")
    assert not (store / CONFIG_FILE).exists()


def test_read_commands_do_not_create_a_store(tmp_path: Path) -> None:
    store = tmp_path / "nothing"
    for args in (["fsck"], ["du"], ["tags"], ["log", "x"]):
        assert_one_line_error(run_cli(store, *args), "no store")
    assert not store.exists()


def test_init_twice_says_it_exists(tmp_path: Path) -> None:
    store = tmp_path / "store"
    proc = run_cli(store, "init")
    assert proc.returncode == 0, proc.stderr
    cfg = (store / CONFIG_FILE).read_bytes()
    assert json.loads(cfg)["version"] == FORMAT_VERSION
    assert_one_line_error(run_cli(store, "init"), "exists", code=4)
    assert (store / CONFIG_FILE).read_bytes() == cfg
    # no temporary file is left beside config.json
    assert sorted(p.name for p in store.iterdir()) == ["config.json", "index", "lock", "packs"]


def test_config_written_atomically_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "config.json"
    target.write_bytes(b"old contents\n")
    with open(target, "rb") as old:
        old_ino = os.fstat(old.fileno()).st_ino
        write_atomically(target, b"new contents\n")
        # a rename, not an overwrite in place: the old file is untouched
        assert old.read() == b"old contents\n"
    assert target.read_bytes() == b"new contents\n"
    assert target.stat().st_ino != old_ino
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def _limited_write(path: Path, data_len: int) -> subprocess.CompletedProcess:
    """write_atomically in a child whose files may not grow past 4 KiB (RLIMIT_FSIZE)."""
    code = (
        "import sys, pathlib\n"
        "from pylayers.store.fsutil import write_atomically\n"
        f"write_atomically(pathlib.Path({str(path)!r}), b'x' * {data_len})\n"
    )

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          preexec_fn=limit, cwd=path.parent, timeout=60)


def test_config_write_failure_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "config.json"
    target.write_bytes(b"{}\n")
    proc = _limited_write(target, 1 << 20)
    assert proc.returncode != 0
    assert "File too large" in proc.stderr
    assert target.read_bytes() == b"{}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"], "temp file left behind"
    proc = _limited_write(target, 100)
    assert proc.returncode == 0, proc.stderr
    assert target.read_bytes() == b"x" * 100


def test_store_open_api(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no store"):
        Store.open(tmp_path / "absent", create=False)
    with Store.open(tmp_path / "s") as store:
        assert store.config.chunker == pylayers.ChunkerParams()
        assert store.chunk_count() == 0
    with Store.open(tmp_path / "s", create=False) as store:
        assert store.chunk_count() == 0


FORMAT_DOC = Path(__file__).resolve().parents[1] / "docs" / "format.md"
_FIELD = re.compile(r'"(?P<lit>[^"]*)"'
                    r"|(?P<ty>u\d+)(?:\[(?P<count>\d+)\])? (?P<name>\w+)(?:\(=(?P<fixed>\d+)\))?"
                    r"|(?P<raw>\w+)\[(?P<len>\d+)\]")


def doc_layout(text: str, values: dict[str, int | bytes]) -> bytes:
    """Bytes laid out as a docs/format.md grammar line says: "LITERAL", `uN name`
    (little-endian, from `values`), `uN name(=V)` (fixed V), `u8[K] 0` (K zero bytes),
    `name[K]` (K raw bytes from `values`). Written from the document, not from packs.py."""
    out = b""
    pos = 0
    for m in _FIELD.finditer(text):
        assert not text[pos:m.start()].strip(), f"cannot read {text[pos:m.start()]!r}"
        pos = m.end()
        if m["lit"] is not None:
            out += m["lit"].encode()
        elif m["ty"]:
            width = int(m["ty"][1:]) // 8
            if m["count"]:
                assert m["name"] == "0", m.group()
                out += bytes(width * int(m["count"]))
            else:
                value = int(m["fixed"]) if m["fixed"] else values[m["name"]]
                out += value.to_bytes(width, "little")
        else:
            value = values[m["raw"]]
            assert isinstance(value, bytes) and len(value) == int(m["len"]), m.group()
            out += value
    assert not text[pos:].strip(), f"cannot read {text[pos:]!r}"
    return out


def test_pack_bytes_match_the_format_doc(tmp_path: Path) -> None:
    """A pack written by PackWriter is, byte for byte, what docs/format.md's grammar
    gives for known chunks (so a changed field order, width or magic fails here), and
    an index location is laid out as its `chunks` table says."""
    doc = FORMAT_DOC.read_text()
    grammar = doc.split("## Packs", 1)[1].split("```")[1]
    rules = {}
    for line in grammar.strip().splitlines():
        if ":=" in line:
            name, rule = (x.strip() for x in line.split(":=", 1))
        else:
            rule = line.strip()
        rules.setdefault(name, []).append(re.split(r"\s{3,}", rule)[0])
    assert rules["pack"] == ["header frame*"]
    assert rules["header"] == ['"PLYRPACK" u32 version(=1) u32 reserved(=0)']
    head, table_rule, base_rule, payload_rule = rules["frame"]
    entry = re.fullmatch(r"\((.*)\)\{nchunks\}", table_rule)
    assert entry and payload_rule == "payload[stored_len]", rules["frame"]
    assert base_rule == "(base_id[32]){nbase}", rules["frame"]

    data = [b"hello", b"world!", b"x" * 1000]  # compresses: codec 1, stored < raw
    locs = write_pack(tmp_path, data, level=3)
    (pack,) = tmp_path.glob("*/*.pack")
    got = pack.read_bytes()
    raw = b"".join(data)
    table = b"".join(doc_layout(entry[1], {"id": cid(d), "length": len(d)}) for d in data)
    header = doc_layout(rules["header"][0], {})
    fields = {"codec": 0, "nbase": 0, "nchunks": 0, "raw_len": 0, "stored_len": 0, "crc": 0}
    payload = got[len(header) + len(doc_layout(head, fields)) + len(table):]
    assert zstandard.ZstdDecompressor().decompress(payload) == raw
    assert len(payload) < len(raw)
    fields = {"codec": 1, "nbase": 0, "nchunks": len(data), "raw_len": len(raw),
              "stored_len": len(payload), "crc": 0}
    before_crc = doc_layout(head, fields)[:-4]
    fields["crc"] = zlib.crc32(before_crc + table)
    frame = doc_layout(head, fields) + table + payload
    assert len(header) == 16 and len(before_crc) == 20
    assert got == header + frame

    row = next(ln for ln in doc.splitlines() if ln.startswith("| `chunks`"))
    value_rule = re.search(r"`(pack_id\[16\][^`]*)`", row)[1]
    for i, d in enumerate(data):
        loc = locs[cid(d)]
        start = sum(map(len, data[:i]))
        want = doc_layout(value_rule, {"pack_id": bytes.fromhex(pack.stem),
                                       "frame_offset": len(header),
                                       "frame_len": len(frame), "start": start,
                                       "length": len(d), "flags": 0})
        assert loc.encode() == want
        assert raw[start:start + len(d)] == d


def test_reads_from_many_threads_over_many_packs(tmp_path: Path) -> None:
    """One Store shared by threads (the overlay driver materialises layers from several
    at once): every read returns the right bytes, and no more than a bounded number of
    pack files stay open however many packs are read."""
    import random
    import threading

    chunks = {}
    fds_at_start = len(os.listdir("/proc/self/fd"))
    with Store.open(tmp_path / "s") as store:
        for _ in range(80):  # each writing job starts its own pack
            with store.writer() as w:
                for _ in range(4):
                    data = os.urandom(random.randrange(1000, 30_000))
                    chunks[cid(data)] = data
                    w.put(cid(data), data)
                w.commit()
        assert len(store.pack_files()) == 80
        fds_before = len(os.listdir("/proc/self/fd"))
        errors: list[str] = []
        start = threading.Barrier(6)

        def reader(seed: int) -> None:
            order = list(chunks)
            random.Random(seed).shuffle(order)
            start.wait()
            try:
                for _ in range(3):
                    for c in order:
                        if store.read_chunk(c) != chunks[c]:
                            errors.append(f"wrong bytes for {c.hex()}")
            except Exception as exc:  # a damaged read is a test failure, not a warning
                errors.append(repr(exc))

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len(os.listdir("/proc/self/fd")) <= fds_before + 64
    assert len(os.listdir("/proc/self/fd")) <= fds_at_start  # close() closed them all


def test_read_ahead_in_order_errors_in_place_and_stops_when_closed(tmp_path: Path) -> None:
    import threading

    from pylayers.store.readahead import read_ahead

    datas = [os.urandom(50_000) for _ in range(40)]
    with Store.open(tmp_path / "s") as store:
        with store.writer() as w:
            for d in datas:
                w.put(cid(d), d)
            w.commit()
        ids = [cid(d) for d in datas]
        # twice over, in an order unlike the packs', with small batches ahead
        order = ids[::-1] + ids
        assert list(read_ahead(store, order, ahead_bytes=1 << 20)) == datas[::-1] + datas
        # a missing chunk is an error where it stands: the chunks before it are given
        missing = cid(b"not stored")
        got = []
        with pytest.raises(CorruptData, match="missing"):
            for data in read_ahead(store, [*ids[:3], missing, *ids[3:]]):
                got.append(data)
        assert got == datas[:3]
        # leaving early stops the thread
        before = threading.active_count()
        it = read_ahead(store, ids * 50, ahead_bytes=1 << 20)
        assert next(it) == datas[0]
        it.close()
        assert threading.active_count() == before
