"""The index's size: the stat cache's compact values."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import lmdb

import pylayers
from pylayers.layers.scan import decode_statcache, encode_statcache
from pylayers.store import repository
from pylayers.store.repository import Store

CLI = [sys.executable, "-m", "pylayers"]


def run_cli(store: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "--store", str(store), *args], capture_output=True,
                          text=True, timeout=120, cwd=store.parent)


def snapshot(store: Path, src: Path, *extra: str) -> str:
    proc = run_cli(store, "snapshot", str(src), *extra)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def assert_fsck_ok(store: Path) -> None:
    proc = run_cli(store, "fsck")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)


def many_files(root: Path, n: int, seed: int) -> Path:
    """`n` small files of distinct content: each snapshot adds `n` chunks at random
    places in the chunk index, so its commit rewrites most of the index's pages."""
    rnd = random.Random(seed)
    for i in range(n):
        d = root / f"d{i % 20}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(rnd.randbytes(rnd.randrange(50, 3000)))
    return root


def _raw_index(store_path: Path):
    """The index opened read-only and without LMDB's lock file, outside any Store (whose
    close could compact it); only while no process writes to it."""
    return lmdb.open(os.fspath(store_path / "index"), readonly=True, lock=False, max_dbs=16)


def all_tables(store_path: Path) -> dict[str, list[tuple[bytes, bytes]]]:
    env = _raw_index(store_path)
    try:
        out = {}
        with env.begin() as txn:
            for name in repository.DB_NAMES:
                db = env.open_db(name.encode(), txn=txn, create=False)
                out[name] = [(bytes(k), bytes(v)) for k, v in txn.cursor(db)]
        return out
    finally:
        env.close()


def free_bytes(store_path: Path) -> int:
    """Bytes of data.mdb that hold no table's page (LMDB's free pages)."""
    env = _raw_index(store_path)
    try:
        def pages(st: dict) -> int:
            return st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]

        st = env.stat()
        used = 2 + pages(st)
        with env.begin() as txn:
            for name in repository.DB_NAMES:
                used += pages(txn.stat(env.open_db(name.encode(), txn=txn, create=False)))
        return os.path.getsize(store_path / "index" / "data.mdb") - used * st["psize"]
    finally:
        env.close()


def data_mdb(store_path: Path) -> Path:
    return store_path / "index" / "data.mdb"


# -- the stat cache's values -------------------------------------------------------------

def test_statcache_values_leave_out_the_chunk_list_of_one_chunk_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "small").write_bytes(b"one chunk\n" * 100)
    (src / "empty").write_bytes(b"")
    (src / "big").write_bytes(random.Random(1).randbytes(1 << 20))  # several chunks
    time.sleep(1.1)  # ctimes out of the racy window: entries are written
    with Store.open(tmp_path / "store") as store:
        layers = pylayers.Layers(store)
        first = layers.snapshot(src)
        inode = {name: struct.pack("<QQ", st.st_dev, st.st_ino)
                 for name in ("small", "empty", "big")
                 for st in [os.stat(src / name)]}
        values = dict(store.items("statcache"))
        assert len(values[inode["small"]]) == 56
        assert len(values[inode["empty"]]) == 56
        big = values[inode["big"]]
        assert len(big) > 56 and (len(big) - 56) % 36 == 0
        (src / "new").write_bytes(b"12345")  # the tree changed: no fingerprint shortcut
        again = layers.snapshot(src, parent=first.layer_id)
        assert again.stats.cache_hits == 3 and again.stats.bytes_read == 5
        assert [e.path for e in layers.entries(again.layer_id)] == [b"", b"new"]
        # what the cache gave back is what reading gave: the tree's manifests agree
        for e in layers.tree(again.layer_id):
            if e.path == b"small":
                assert e.chunk_list() == [(e.content, e.size)]
            if e.path == b"empty":
                assert e.chunk_list() == []


def test_statcache_round_trip_and_rejected_lengths() -> None:
    content = bytes(range(32))
    one = struct.pack("<32sI", content, 700)
    assert decode_statcache(encode_statcache(700, 5, 6, content, one)) == (
        700, 5, 6, content, one)
    two = struct.pack("<32sI", b"a" * 32, 300) + struct.pack("<32sI", b"b" * 32, 400)
    assert decode_statcache(encode_statcache(700, -5, 6, content, two)) == (
        700, -5, 6, content, two)
    assert decode_statcache(encode_statcache(0, 1, 2, b"\0" * 32, b"")) == (
        0, 1, 2, b"\0" * 32, b"")
    # the earlier layout (dev, ino first: 80 + 36n bytes) never decodes
    old = struct.pack("<QQQqq32s", 1, 2, 700, 5, 6, content) + one
    assert decode_statcache(old) is None
    assert decode_statcache(old[:-36]) is None
    assert decode_statcache(b"x" * 55) is None


def test_an_entry_in_the_earlier_layout_is_a_miss_and_is_replaced(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data\n" * 1000)
    time.sleep(1.1)
    with Store.open(tmp_path / "store") as store:
        layers = pylayers.Layers(store)
        first = layers.snapshot(src)
        st = os.stat(src / "f")
        key = struct.pack("<QQ", st.st_dev, st.st_ino)
        value = store.get("statcache", key)
        size, mtime, ctime, content, chunks = decode_statcache(value)
        # what an earlier build wrote, claiming other content: it must not be believed
        store.put("statcache", key, struct.pack("<QQQqq32s", st.st_dev, st.st_ino, size,
                                                mtime, ctime, b"\xee" * 32) + chunks)
        (src / "new").write_bytes(b"12345")  # the tree changed: no fingerprint shortcut
        again = layers.snapshot(src, parent=first.layer_id)
        assert again.stats.cache_hits == 0 and again.stats.bytes_read == size + 5
        assert [e.path for e in layers.entries(again.layer_id)] == [b"", b"new"]
        assert store.get("statcache", key) == value
