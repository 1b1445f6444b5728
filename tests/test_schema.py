"""The store owns its schema: one accessor per table, transactions only from the store,
references instead of reading other modules' records; and what that makes possible:
prefix lookup by cursor range, commit naming in one transaction, orphan snapshot
directories collected, ephemeral trees leaving nothing behind, a lying stat cache
never producing a layer that names a missing chunk, and frames verified before they
are written."""

from __future__ import annotations

import ast
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import blake3
import pytest

import pylayers
from pylayers._native import walk, walk_records
from pylayers.errors import CorruptData, FailedPrecondition, StoreError
from pylayers.layers import fingerprint
from pylayers.layers.manifest import DIR, REG, Entry
from pylayers.layers.repo import Layers
from pylayers.mounts import Snapshotter
from pylayers.mounts.snapshotter import Kind
from pylayers.store import packs
from pylayers.store.repository import Store
from pylayers.store.tables import TABLES

CLI = [sys.executable, "-m", "pylayers"]
PACKAGE = Path(pylayers.__file__).parent


def run_cli(store: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "--store", str(store), *args], capture_output=True,
                          text=True, timeout=120, cwd=store.parent)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def files(root: Path, contents: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in contents.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


# -- the boundary ---------------------------------------------------------------------


def _modules_above_store() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py")
            if "store" not in p.relative_to(PACKAGE).parts[:1]]


def test_nothing_above_the_store_touches_lmdb() -> None:
    """No module outside pylayers/store imports lmdb, opens a transaction, reaches
    into the store's index, or names a table by string through a generic call."""
    offenders = []
    for path in _modules_above_store():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                if any(n == "lmdb" or n.startswith("lmdb.") for n in names):
                    offenders.append(f"{path.name}:{node.lineno}: imports lmdb")
            if isinstance(node, ast.Attribute) and node.attr in (
                    "env", "db", "_index", "_txn", "transaction", "begin"):
                offenders.append(f"{path.name}:{node.lineno}: .{node.attr}")
            # a generic key/value call on a store naming a table: store.get("tags", ...)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and "store" in ast.unparse(node.func.value).lower() \
                    and node.args and isinstance(node.args[0], ast.Constant) \
                    and node.args[0].value in TABLES:
                offenders.append(f"{path.name}:{node.lineno}: table {node.args[0].value!r} "
                                 "named by string")
    assert offenders == []


def test_store_has_no_generic_table_surface(tmp_path: Path) -> None:
    with Store.open(tmp_path / "store") as s:
        for name in ("get", "put", "delete", "items", "transaction", "env", "db"):
            assert not hasattr(s, name), name


# -- prefix lookup ---------------------------------------------------------------------


def test_prefix_lookup_is_a_cursor_range(tmp_path: Path) -> None:
    ids = sorted({blake3.blake3(str(i).encode()).digest() for i in range(300)})
    near = bytes.fromhex("abcdef0" + "f" * 57), bytes.fromhex("abcdef1" + "0" * 57)
    with Store.open(tmp_path / "store") as s, pytest.raises(RuntimeError), \
            s.write() as t:
        for lid in [*ids, *near]:
            t.layers.put(lid, b"{}")
        target = ids[137]
        h = target.hex()
        for n in range(4, 65):  # every length, odd ones included
            want = [k for k in [*ids, *near] if k.hex().startswith(h[:n])]
            assert t.layers.with_hex_prefix(h[:n], limit=len(want) + 1) == sorted(want)
        # the boundary between two ids one apart in the 7th hex digit
        assert t.layers.with_hex_prefix("abcdef0") == [near[0]]
        assert t.layers.with_hex_prefix("abcdef1") == [near[1]]
        assert t.layers.with_hex_prefix("abcdef") == list(near)
        assert t.layers.with_hex_prefix("abcdef", limit=1) == [near[0]]
        assert t.layers.with_hex_prefix("fffffff") == [k for k in ids
                                                      if k.hex().startswith("fffffff")]
        raise RuntimeError("abort: nothing of this is committed")
    with Store.open(tmp_path / "store") as s, s.read() as t:
        assert t.layers.count() == 0


# -- item 9: a walk-cache entry that lies ----------------------------------------------


@pytest.mark.parametrize("damage", ["flip", "truncate", "other-layer"])
def test_a_damaged_walk_cache_is_a_miss(tmp_path: Path, damage: str) -> None:
    """A walk cache whose bytes are damaged, or that names another layer than the one
    whose tree it describes, must never make a snapshot keep what it did not read: the
    file is read again, and the layer is the tree on disk."""
    src = files(tmp_path / "src", {"one": b"a single chunk\n" * 50, "other": b"x" * 999})
    time.sleep(1.1)  # ctimes out of the racy window: the records are trusted
    store = tmp_path / "store"
    first = ok(run_cli(store, "snapshot", str(src))).split()[-1]
    (src / "one").write_bytes(b"A single chunk\n" * 50)  # same size
    os.utime(src / "one", ns=(0, os.stat(src / "other").st_mtime_ns))
    with Store.open(store) as s:
        [(key, value)] = [(k, v) for k, v in _walkcache_items(s)]
        value = bytearray(value)
        if damage == "flip":
            value[40] ^= 0x10  # in the compressed records
        elif damage == "truncate":
            del value[-5:]
        else:  # a walk cache that names a layer whose tree is not what it recorded
            empty = Layers(s).snapshot(files(tmp_path / "empty", {}))
            value[:32] = empty.layer_id
        with s.write() as t:
            t.walkcache.put(key, bytes(value))
    (src / "new").write_bytes(b"defeats the tree fingerprint")
    proc = run_cli(store, "snapshot", "--parent", first, str(src))
    second = ok(proc).split()[-1]
    ok(run_cli(store, "fsck"))
    out = tmp_path / "out"
    ok(run_cli(store, "checkout", second, str(out)))
    for name in ("one", "other", "new"):
        assert (out / name).read_bytes() == (src / name).read_bytes()


def _walkcache_items(s: Store) -> list[tuple[bytes, bytes]]:
    with s.read() as t:
        return [(k, bytes(t.walkcache.get(k))) for k, _lid in t.walkcache.layer_ids()]


def test_commit_refuses_a_layer_naming_an_unindexed_chunk(tmp_path: Path) -> None:
    """The commit itself checks, in its transaction, that every chunk a file names is
    indexed: a caller handing it a wrong chunk list gets CorruptData and no layer."""
    missing = blake3.blake3(b"never stored").digest()
    root = Entry(b"", DIR, 0o755, 0, 0, 0)
    f = Entry(b"f", REG, 0o644, 0, 0, 0, size=5000, content=missing,
              chunks=missing + (5000).to_bytes(4, "little"))
    with Store.open(tmp_path / "store") as s:
        layers = Layers(s)
        with s.writer() as w, pytest.raises(CorruptData, match="not in the store"):
            layers.commit_entries(None, [root, f], w, tag="nope")
        assert layers.all_ids() == [] and layers.tags() == {}


def test_fsck_reports_a_child_the_index_does_not_know(tmp_path: Path) -> None:
    store = tmp_path / "store"
    src = files(tmp_path / "src", {"a": b"1"})
    base = ok(run_cli(store, "snapshot", str(src))).split()[-1]
    (src / "b").write_bytes(b"2")
    child = ok(run_cli(store, "snapshot", "--parent", base, str(src))).split()[-1]
    ok(run_cli(store, "fsck"))
    with Store.open(store) as s, s.write() as t:
        assert t.refs.referrers(bytes.fromhex(base)) == [("layer", bytes.fromhex(child))]
        t.refs.remove(bytes.fromhex(base), "layer", bytes.fromhex(child))
    proc = run_cli(store, "fsck")
    assert proc.returncode == 1
    assert f"layer {child[:12]}: the index does not record it as a child" in proc.stdout


# -- ephemeral trees ---------------------------------------------------------------------


def test_copy_driver_commit_leaves_no_walk_cache_or_fingerprints(
        tmp_path: Path) -> None:
    with Store.open(tmp_path / "store") as s:
        layers = Layers(s)
        snaps = Snapshotter(layers, "copy")
        [m] = snaps.prepare("work")
        files(Path(m.source), {f"f{i}": os.urandom(100 + i) for i in range(20)})
        time.sleep(1.1)  # old enough that a normal snapshot would record both
        lid = snaps.commit("done", "work")
        with s.read() as t:
            assert t.walkcache.count() == 0
            assert t.fingerprints.count() == 0
        assert layers.exists(lid)
        # the same tree snapshotted for real records both (the test can fail)
        out = tmp_path / "out"
        layers.checkout(lid, out)
        time.sleep(1.1)
        layers.snapshot(out)
        with s.read() as t:
            assert t.walkcache.count() == 1
            assert t.fingerprints.count() == 1


# -- the snapshotter's records -----------------------------------------------------------


def test_commit_without_a_name_is_named_by_its_layer(tmp_path: Path) -> None:
    with Store.open(tmp_path / "store") as s:
        snaps = Snapshotter(Layers(s), "copy")
        def same_tree(source: str) -> None:
            (Path(source) / "f").write_bytes(b"same")
            for p in (Path(source) / "f", Path(source)):
                os.utime(p, ns=(10**18, 10**18))

        [m] = snaps.prepare("a")
        same_tree(m.source)
        lid = snaps.commit(None, "a", labels={"x": "1"})
        info = snaps.stat(lid.hex())
        assert info.kind == Kind.COMMITTED and info.layer == lid.hex()
        assert info.labels == {"x": "1"}
        # the same tree again: the existing record is kept and gets the labels
        [m] = snaps.prepare("b")
        same_tree(m.source)
        assert snaps.commit(None, "b", labels={"y": "2"}) == lid
        assert snaps.stat(lid.hex()).labels == {"x": "1", "y": "2"}
        assert sorted(i.key for i in snaps.walk()) == [lid.hex()]
        # a snapshot standing on the layer holds it against rm, through refs
        snaps.prepare("c", lid.hex())
        with pytest.raises(FailedPrecondition, match="used by snapshot"):
            Layers(s).remove(lid.hex())


def test_collect_asks_layers_to_remove_and_keeps_what_others_use(tmp_path: Path) -> None:
    with Store.open(tmp_path / "store") as s:
        layers = Layers(s)
        snaps = Snapshotter(layers, "copy")
        [m] = snaps.prepare("a")
        (Path(m.source) / "f").write_bytes(b"one")
        la = snaps.commit("A", "a")
        [m] = snaps.prepare("b", "A")
        (Path(m.source) / "g").write_bytes(b"two")
        lb = snaps.commit("B", "b")
        layers.set_tag("keep", la)
        # B goes, with its layer; A's layer is tagged: A stays
        assert snaps.collect() == ["B"]
        assert not layers.exists(lb) and layers.exists(la)
        layers.remove("keep")
        assert snaps.collect() == ["A"]
        assert not layers.exists(la)
        with s.read() as t:
            assert list(t.refs.items()) == []


# -- orphans -------------------------------------------------------------------------------

CRASH_AFTER_RECORD = """
import os, signal, sys
from pylayers import Layers, Store
from pylayers.mounts import Snapshotter
s = Store.open(sys.argv[1])
snaps = Snapshotter(Layers(s), "copy")
[m] = snaps.prepare("work")
open(os.path.join(m.source, "f"), "wb").write(b"data")
print(snaps.stat("work").dir_id, flush=True)
# die after the records changed but before the directory is removed
real = snaps._driver
def driver(name):
    d = real(name)
    d.remove = lambda sdir: os.kill(os.getpid(), signal.SIGKILL)
    return d
snaps._driver = driver
snaps.commit("done", "work")
"""


def test_a_crash_between_record_and_directory_leaves_an_orphan_gc_removes(
        tmp_path: Path) -> None:
    store = tmp_path / "store"
    proc = subprocess.run([sys.executable, "-c", CRASH_AFTER_RECORD, str(store)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    orphan = store / "snapshots" / proc.stdout.strip()
    assert (orphan / "fs" / "f").read_bytes() == b"data"
    with Store.open(store) as s:
        snaps = Snapshotter(Layers(s), "copy")
        assert [i.key for i in snaps.walk()] == ["done"]  # the record was replaced
        [m] = snaps.prepare("live")  # a directory a record names: gc must keep it
        live = Path(m.source).parent
    (store / "snapshots" / "stray").write_bytes(b"")
    ok(run_cli(store, "gc"))
    assert not orphan.exists() and not (store / "snapshots" / "stray").exists()
    assert live.is_dir()
    assert sorted(p.name for p in (store / "snapshots").iterdir()) == [live.name]


# -- frames ----------------------------------------------------------------------------------


def test_a_frame_whose_compression_is_damaged_is_refused() -> None:
    data = b"compressible text, " * 5000
    cid = blake3.blake3(data).digest()
    frame = packs.encode_frame([(cid, data)], 3)  # verified on the way out
    head = packs.FRAME_HEADER.size + packs.TABLE_ENTRY.size
    assert frame[4] == packs.CODEC_ZSTD
    damaged = bytearray(frame)
    damaged[head + len(damaged[head:]) // 2] ^= 0x01
    with pytest.raises(StoreError, match="just encoded"):
        packs.verify_frame(bytes(damaged), data)
    with pytest.raises(StoreError, match="just encoded"):  # decodes, to other bytes
        packs.verify_frame(frame, data[:-1] + b"!")
    packs.verify_frame(frame, data)


def test_one_zstd_context_per_thread() -> None:
    here = packs._compressor(3), packs._decompressor()
    assert (packs._compressor(3), packs._decompressor()) == here
    other: list = []
    t = threading.Thread(target=lambda: other.extend([packs._compressor(3),
                                                      packs._decompressor()]))
    t.start()
    t.join()
    assert other[0] is not here[0] and other[1] is not here[1]
    data = random.Random(3).randbytes(1000) * 50
    for _ in range(3):  # a reused context gives the same frames
        assert packs._decompressor().decompress(packs._compressor(3).compress(data)) == data


# -- the native walk ------------------------------------------------------------------------


def test_walk_hands_out_the_c_buffer_and_fingerprints_hash_it(tmp_path: Path) -> None:
    files(tmp_path / "t", {"a": b"1", "d/b": b"22"})
    with walk(tmp_path / "t") as (view, max_ctime):
        assert isinstance(view, memoryview)
        copied = bytes(view)
    with pytest.raises(ValueError):  # released with the C buffer: it was never a copy
        bytes(view)
    assert (copied, max_ctime) == walk_records(tmp_path / "t")
    fp, _ = fingerprint.tree_fingerprint(tmp_path / "t")
    assert fp == blake3.blake3(fingerprint.DOMAIN + copied).digest()
