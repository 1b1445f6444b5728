"""The index's size: the walk cache's compact values, and compaction of the LMDB file
(free pages dropped by rewriting it), including processes killed while compacting and
compaction beside concurrent snapshots."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest
import zstandard

from pylayers.layers.manifest import INLINE_MAX
from pylayers.layers.repo import Layers
from pylayers.store import index, ingest
from pylayers.store.index import COMPACT_DIR
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
    """`n` files of distinct content, each too big to be held in its manifest entry
    (INLINE_MAX): each snapshot adds `n` chunks at random places in the chunk index, so
    its commit rewrites most of the index's pages."""
    rnd = random.Random(seed)
    for i in range(n):
        d = root / f"d{i % 20}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(rnd.randbytes(rnd.randrange(INLINE_MAX + 1, 3000)))
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
            for name in index.DB_NAMES:
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
            for name in index.DB_NAMES:
                used += pages(txn.stat(env.open_db(name.encode(), txn=txn, create=False)))
        return os.path.getsize(store_path / "index" / "data.mdb") - used * st["psize"]
    finally:
        env.close()


def data_mdb(store_path: Path) -> Path:
    return store_path / "index" / "data.mdb"


# -- the walk cache ---------------------------------------------------------------------

def tiny_tree(root: Path, n: int, seed: int = 5) -> Path:
    """`n` files of 32-256 bytes, 100 a directory (a node_modules-like shape)."""
    rnd = random.Random(seed)
    for i in range(n):
        d = root / f"d{i // 100:03}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i % 100:02}.js").write_bytes(rnd.randbytes(rnd.randint(16, 128)).hex()
                                              .encode()[: rnd.randint(32, 256)])
    return root


def test_the_walk_cache_costs_a_few_bytes_a_file(tmp_path: Path) -> None:
    """One compressed value per snapshotted directory, instead of a stat-cache entry
    per file (56-92 bytes of value, 16 of key, and LMDB's node and page overhead)."""
    src = tiny_tree(tmp_path / "src", 5000)
    time.sleep(1.1)
    with Store.open(tmp_path / "store") as store:
        Layers(store).snapshot(src)
        with store.read() as t:
            [(key, _lid)] = list(t.walkcache.layer_ids())
            value = t.walkcache.get(key)
    assert len(value) / 5000 <= 32, len(value) / 5000  # bytes a file (11-20 measured)


def test_small_files_live_in_the_manifest_not_the_index(tmp_path: Path) -> None:
    """A file of at most INLINE_MAX bytes is held in its manifest entry: no chunk, no
    chunk-index entry, no pack table record. 5,000 files of 32-256 bytes cost at most
    64 bytes of index a file (walk cache and all), and the store (index and packs) at
    most twice `tar | zstd -3` of the same tree; every file reads back."""
    src = tiny_tree(tmp_path / "src", 5000)
    (src / "edge").write_bytes(b"e" * INLINE_MAX)  # inline
    (src / "over").write_bytes(b"o" * (INLINE_MAX + 1))  # one chunk
    time.sleep(1.1)
    store_path = tmp_path / "store"
    with Store.open(store_path) as store:
        layers = Layers(store)
        res = layers.snapshot(src)
        rec = layers.record(res.layer_id)
        tree = {e.path: e for e in layers.tree(res.layer_id)}
        assert tree[b"edge"].inline and not tree[b"edge"].chunks
        assert not tree[b"over"].inline and tree[b"over"].chunk_count() == 1
        # the file chunk of "over", and the manifest's own chunks: nothing else
        assert store.chunk_count() == 1 + len(rec.manifest)
        for p in (src / "d003").iterdir():
            assert layers.read_file(tree[p.relative_to(src).as_posix().encode()]) \
                == p.read_bytes()
    env = _raw_index(store_path)
    try:
        with env.begin() as txn:
            used = 0
            for name, _ in txn.cursor():
                for k, v in txn.cursor(db=env.open_db(name, txn=txn, create=False)):
                    used += len(k) + len(v)
    finally:
        env.close()
    assert used / 5000 <= 64, used / 5000
    tar = subprocess.run(["tar", "-cf", "-", "-C", str(src), "."], capture_output=True,
                         check=True).stdout
    zstd_size = len(zstandard.ZstdCompressor(level=3).compress(tar))
    stored = data_mdb(store_path).stat().st_size + sum(
        f.stat().st_size for f in (store_path / "packs").rglob("*") if f.is_file())
    assert stored <= 2 * zstd_size, (stored, zstd_size)


def test_a_resnapshot_reads_only_what_changed(tmp_path: Path) -> None:
    src = tiny_tree(tmp_path / "src", 500)
    (src / "big").write_bytes(random.Random(1).randbytes(1 << 20))  # several chunks
    time.sleep(1.1)  # ctimes out of the racy window: the records are trusted
    with Store.open(tmp_path / "store") as store:
        layers = Layers(store)
        first = layers.snapshot(src)
        f = src / "d001" / "f07.js"
        st = f.stat()
        f.write_bytes(bytes(reversed(f.read_bytes())))  # same size, mtime put back
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        (src / "new").write_bytes(b"12345")
        again = layers.snapshot(src, parent=first.layer_id)
        assert again.stats.bytes_read == st.st_size + 5
        assert again.stats.cache_hits == 500  # 499 small files and big
        assert [e.path for e in layers.entries(again.layer_id)] == [
            b"", b"d001/f07.js", b"new"]  # the root: its mtime moved
        # what the cache kept is what reading gives: the same tree as a fresh store's
        with Store.open(tmp_path / "fresh") as other:
            fresh = Layers(other).snapshot(src)
            assert Layers(other).tree(fresh.layer_id) == layers.tree(again.layer_id)


def test_a_snapshot_indexes_its_chunks_as_it_goes(tmp_path: Path, monkeypatch) -> None:
    """The chunk writer commits every COMMIT_CHUNKS new chunks (what it has yet to
    index is held in memory: a tree of a million small files is a million chunks); the
    layer is the same as one committed at once, and whole."""
    src = many_files(tmp_path / "src", 300, seed=3)
    with Store.open(tmp_path / "one") as store:
        once = Layers(store).snapshot(src).layer_id
    monkeypatch.setattr(ingest, "COMMIT_CHUNKS", 7)
    with Store.open(tmp_path / "many") as store:
        layers = Layers(store)
        assert layers.snapshot(src).layer_id == once
        assert store.chunk_count() >= 300
    assert_fsck_ok(tmp_path / "many")
    proc = run_cli(tmp_path / "many", "checkout", once.hex(), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.read_bytes() for p in (tmp_path / "out").rglob("f*")) == \
        sorted(p.read_bytes() for p in src.rglob("f*"))


# -- compaction ------------------------------------------------------------------------

@pytest.fixture
def wasteful_store(tmp_path: Path, monkeypatch) -> Path:
    """A store whose index is mostly free pages: several snapshots, each indexing many
    new chunks, while this process holds the store, so none of them compacts."""
    store = tmp_path / "store"
    holder = Store.open(store)  # a shared lock: the CLI's snapshots cannot compact
    for i in range(4):
        snapshot(store, many_files(tmp_path / f"t{i}", 400, seed=i), "--tag", f"v{i}")
    with monkeypatch.context() as m:
        m.setattr(index, "COMPACT_MIN_BYTES", 1 << 60)
        holder.close()  # without compacting
    assert free_bytes(store) > data_mdb(store).stat().st_size / 3
    return store


HOLD = """
import sys
from pylayers.store.repository import Store
s = Store.open(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
s.close()
"""


def test_compaction_drops_free_pages_and_keeps_every_entry(wasteful_store: Path) -> None:
    store = wasteful_store
    before = all_tables(store)
    size = data_mdb(store).stat().st_size
    with Store.open(store, exclusive=True) as s:
        saved = s.compact_index()
        psize, total, used = s.index_pages()
        assert total - used <= 1  # nothing left but data (and LMDB's free list root)
        assert s.chunk_count() == len(before["chunks"])  # the reopened index works
    assert saved > size / 3 and data_mdb(store).stat().st_size == size - saved
    assert all_tables(store) == before
    assert not (store / COMPACT_DIR).exists()
    assert_fsck_ok(store)
    # other processes open and write it as before
    nxt = snapshot(store, many_files(store.parent / "next", 50, seed=9), "--tag", "next")
    assert run_cli(store, "tags").stdout.count("\n") == 5
    proc = run_cli(store, "checkout", nxt, str(store.parent / "out"))
    assert proc.returncode == 0, proc.stderr
    assert_fsck_ok(store)


def test_gc_compacts(wasteful_store: Path) -> None:
    size = data_mdb(wasteful_store).stat().st_size
    proc = run_cli(wasteful_store, "gc")
    assert proc.returncode == 0, proc.stderr
    assert data_mdb(wasteful_store).stat().st_size < size * 2 / 3
    assert free_bytes(wasteful_store) <= 4096
    assert_fsck_ok(wasteful_store)


def test_closing_compacts_only_when_alone(wasteful_store: Path) -> None:
    store = wasteful_store
    ino = data_mdb(store).stat().st_ino
    other = subprocess.Popen([sys.executable, "-c", HOLD, str(store)], text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=store.parent)
    try:
        assert other.stdout.readline() == "ready\n"
        # a process closing the store while `other` holds it cannot compact
        proc = run_cli(store, "tags")
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        assert data_mdb(store).stat().st_ino == ino
    finally:
        other.communicate("\n", timeout=60)  # alone when it closes: it compacts
    assert other.returncode == 0
    assert data_mdb(store).stat().st_ino != ino
    assert free_bytes(store) <= 4096
    # a close with little free space does not rewrite the file again
    ino = data_mdb(store).stat().st_ino
    assert run_cli(store, "tags").returncode == 0
    assert data_mdb(store).stat().st_ino == ino
    assert_fsck_ok(store)


def test_snapshots_compact_the_index_as_they_go(tmp_path: Path) -> None:
    store = tmp_path / "store"
    sizes = []
    for i in range(5):
        snapshot(store, many_files(tmp_path / f"t{i}", 400, seed=i), "--tag", f"v{i}")
        sizes.append(data_mdb(store).stat().st_size)
        assert free_bytes(store) < max(index.COMPACT_MIN_BYTES,
                                       index.COMPACT_FREE_SHARE * sizes[-1])
    assert_fsck_ok(store)


COMPACT_LOOP = """
import sys
from pylayers.store.repository import Store
s = Store.open(sys.argv[1], exclusive=True)
print("ready", flush=True)
while True:
    s.compact_index()
"""

KILL_AT = """
import os, signal, sys
from pylayers.store import repository
real_rename = os.rename
point = sys.argv[2]
def rename(a, b):
    if point == "before-rename":
        os.kill(os.getpid(), signal.SIGKILL)
    real_rename(a, b)
    if point == "after-rename":
        os.kill(os.getpid(), signal.SIGKILL)
os.rename = rename
s = repository.Store.open(sys.argv[1], exclusive=True)
s.compact_index()
"""


@pytest.mark.parametrize("point", ["before-rename", "after-rename"])
def test_killed_at_each_step_of_compaction(wasteful_store: Path, point: str) -> None:
    store = wasteful_store
    before = all_tables(store)
    size = data_mdb(store).stat().st_size
    proc = subprocess.run([sys.executable, "-c", KILL_AT, str(store), point],
                          capture_output=True, text=True, timeout=60, cwd=store.parent)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # killed with the new file written beside the old one, or just after it replaced it
    renamed = point == "after-rename"
    assert (store / COMPACT_DIR / "data.mdb").exists() != renamed
    assert (data_mdb(store).stat().st_size < size * 2 / 3) == renamed
    assert all_tables(store) == before
    assert_fsck_ok(store)
    snapshot(store, many_files(store.parent / "next", 50, seed=9), "--tag", "next")
    assert not (store / COMPACT_DIR).exists()  # cleaned up by the next compaction
    assert_fsck_ok(store)
    assert len(all_tables(store)["layers"]) == len(before["layers"]) + 1


def test_killed_while_compacting_at_random_moments(wasteful_store: Path) -> None:
    store = wasteful_store
    before = all_tables(store)
    rnd = random.Random(7)
    replaced = 0
    for _ in range(8):
        ino = data_mdb(store).stat().st_ino
        proc = subprocess.Popen([sys.executable, "-c", COMPACT_LOOP, str(store)],
                                stdout=subprocess.PIPE, text=True, cwd=store.parent)
        assert proc.stdout.readline() == "ready\n"
        time.sleep(rnd.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        replaced += data_mdb(store).stat().st_ino != ino
        assert all_tables(store) == before
    assert replaced  # the kills did land in compacting processes that had swapped files
    assert_fsck_ok(store)
    snapshot(store, many_files(store.parent / "next", 50, seed=9), "--tag", "next")
    assert_fsck_ok(store)


def test_concurrent_snapshots_while_closers_compact(tmp_path: Path) -> None:
    """Processes closing the store try to compact it while others snapshot into it:
    every layer stays, and the index is compacted by whoever is alone last."""
    store = tmp_path / "store"
    Store.open(store).close()
    trees = [many_files(tmp_path / f"t{i}", 300, seed=i) for i in range(6)]
    ino = data_mdb(store).stat().st_ino
    for rnd in range(2):
        procs = [subprocess.Popen([*CLI, "--store", str(store), "snapshot", str(t), "--tag",
                                   f"r{rnd}-{i}", "-m", str(rnd)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=tmp_path)
                 for i, t in enumerate(trees)]
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        for i in range(len(trees)):
            (trees[i] / f"d{rnd}" / f"new{rnd}").write_bytes(os.urandom(2000))
    tags = all_tables(store)["tags"]
    assert len(tags) == 12
    assert data_mdb(store).stat().st_ino != ino
    assert_fsck_ok(store)
    for i in (0, 5):
        proc = run_cli(store, "checkout", f"r1-{i}", str(tmp_path / f"out{i}"))
        assert proc.returncode == 0, proc.stderr
