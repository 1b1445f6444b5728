"""Several processes on one store: concurrent snapshots, store creation racing, gc
beside snapshots (it must wait for them), and what gc frees.

Every process here is a real `python -m pylayers` on a real store.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import blake3
import pytest

from pylayers import Layers
from pylayers.store.repository import Store

sys.path.insert(0, os.path.dirname(__file__))

from treeutil import assert_checks_out, du, snapshot, start_cli  # noqa: E402
from treeutil import run_cli as _run_cli  # noqa: E402


def run_cli(store: Path, *args: str) -> subprocess.CompletedProcess:
    return _run_cli(store, *args, text=True)


def finish(p: subprocess.Popen) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=120)
    return p.returncode, out, err


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True)
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def assert_fsck_ok(store: Path) -> subprocess.CompletedProcess:
    proc = run_cli(store, "fsck")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert "damaged" not in proc.stdout
    return proc


def manifest_file_chunks(data: bytes) -> set[bytes]:
    """The chunk ids of the regular files of a manifest, parsed here as docs/format.md
    ("Manifest") lays it out, not with pylayers' decoder (whose bugs gc would share)."""
    assert data[:8] == b"PLYRMAN2", data[:8]
    pos = 8 + 32
    (count,) = struct.unpack_from("<I", data, pos)
    pos += 4
    out: set[bytes] = set()
    for _ in range(count):
        pathlen, kind, _flags, _mode, _uid, _gid, _mtime, size = struct.unpack_from(
            "<HBBIIIqQ", data, pos)
        pos += 32 + pathlen
        if kind == 1 and size <= 1024:  # a small file: data[size], no chunks
            pos += size
        elif kind == 1:  # file: content_id[32] u32 nchunks (chunk_id[32] u32 length)*
            (nchunks,) = struct.unpack_from("<I", data, pos + 32)
            pos += 36
            total = 0
            for _ in range(nchunks):
                out.add(data[pos:pos + 32])
                total += struct.unpack_from("<I", data, pos + 32)[0]
                pos += 36
            assert total == size
        elif kind in (3, 4):  # symlink, hardlink: u16 len target[len]
            pos += 2 + struct.unpack_from("<H", data, pos)[0]
        elif kind in (5, 6):  # devices: u32 major u32 minor
            pos += 8
        else:
            assert kind in (2, 7, 8), kind
        (nxattrs,) = struct.unpack_from("<H", data, pos)
        pos += 2
        for _ in range(nxattrs):
            namelen, valuelen = struct.unpack_from("<HI", data, pos)
            pos += 6 + namelen + valuelen
    assert pos == len(data), (pos, len(data))
    return out


def referenced_chunks(store_path: Path) -> set[bytes]:
    """Every chunk id a layer names: its manifest's chunks (from its record) and its
    files' chunks (from the manifest, parsed by the test)."""
    refs: set[bytes] = set()
    with Store.open(store_path, create=False) as store:
        layers = Layers(store)
        for lid in layers.all_ids():
            manifest = layers.record(lid).manifest
            refs.update(c for c, _ in manifest)
            data = b"".join(store.read_chunk(c) for c, _ in manifest)
            assert blake3.blake3(data).digest() == lid  # the documented layer id
            refs.update(manifest_file_chunks(data))
    return refs


def indexed_chunks(store_path: Path) -> set[bytes]:
    with Store.open(store_path, create=False) as store:
        return {c for c, _ in store.iter_chunk_locations()}


@pytest.fixture(scope="module")
def shared_blobs() -> dict[str, bytes]:
    rng = random.Random(7)
    text = b"".join(b"line %d of a shared text file\n" % rng.randrange(10**6)
                    for _ in range(150_000))
    return {"big": os.urandom(12 << 20), "text": text, "small": b"same small file\n"}


def four_trees(base: Path, blobs: dict[str, bytes]) -> list[Path]:
    trees = []
    for i in range(4):
        files = {
            "shared/big.bin": blobs["big"],
            "shared/text.txt": blobs["text"],
            "etc/small": blobs["small"],
            f"own/{i}.bin": os.urandom(4 << 20),
            "own/name": f"tree {i}\n".encode(),
        }
        if i % 2:
            files["pair/odd.bin"] = blobs["big"][: 5 << 20]  # shared by trees 1 and 3
        trees.append(write_tree(base / f"tree{i}", files))
    return trees


# -- concurrent snapshots -------------------------------------------------------------------

def test_four_concurrent_snapshots(tmp_path: Path, shared_blobs) -> None:
    store = tmp_path / "store"
    assert run_cli(store, "init").returncode == 0
    trees = four_trees(tmp_path, shared_blobs)
    procs = [start_cli(store, "snapshot", str(t), "--tag", f"t{i}")
             for i, t in enumerate(trees)]
    results = [finish(p) for p in procs]
    for rc, _out, err in results:
        assert rc == 0, err
    ids = [out.strip().splitlines()[-1] for _rc, out, _err in results]
    assert len(set(ids)) == 4
    for i, t in enumerate(trees):
        assert_checks_out(store, f"t{i}", t, tmp_path / f"out{i}")
        assert_checks_out(store, ids[i], t, tmp_path / f"outid{i}")
    assert_fsck_ok(store)
    # one index entry per distinct chunk: the index holds exactly what the layers name
    refs = referenced_chunks(store)
    assert indexed_chunks(store) == refs
    d = du(store)
    assert d["chunks"] == len(refs)
    # the shared 12 MiB (incompressible) counts four times logically; packs hold at most
    # one copy per concurrent writer, and gc leaves about one
    assert d["logical_bytes"] > 4 * len(shared_blobs["big"])
    assert run_cli(store, "gc").returncode == 0
    assert_fsck_ok(store)
    for i, t in enumerate(trees):
        assert_checks_out(store, f"t{i}", t, tmp_path / f"after_gc{i}")


def test_concurrent_snapshots_create_the_store(tmp_path: Path) -> None:
    """No `init` first: several first uses of a fresh store path race to create it."""
    for attempt in range(6):
        store = tmp_path / f"fresh{attempt}"
        srcs = [write_tree(tmp_path / f"src{attempt}_{i}", {"f": f"{attempt} {i}\n".encode()})
                for i in range(4)]
        procs = [start_cli(store, "snapshot", str(s)) for s in srcs]
        results = [finish(p) for p in procs]
        for rc, _out, err in results:
            assert rc == 0, err
        with Store.open(store, create=False) as s:
            assert len(Layers(s).all_ids()) == 4
        assert_fsck_ok(store)


# -- gc beside snapshots ----------------------------------------------------------------------

def test_gc_beside_snapshots_never_deletes_what_they_use(tmp_path: Path) -> None:
    """Each round: a snapshot starts whose first file dedups against the previous
    round's layer; meanwhile that layer is removed and two gcs and another snapshot
    start. gc must wait for the snapshots (store lock): had it swept while the first one
    ran, the new layer would name chunks gc had just deleted. (A big sparse file keeps
    each snapshot busy for a while, cheaply: its zero chunks dedup to one.)"""
    store = tmp_path / "store"
    rounds = 3
    payload = [os.urandom(4 << 20) for _ in range(rounds + 1)]
    srcs = []
    for r in range(rounds + 1):
        # tree r: a.bin is tree r-1's b.bin; then the sparse file
        files = {"a.bin": payload[r], "n": b"%d\n" % r}
        if r < rounds:
            files["b.bin"] = payload[r + 1]
        src = write_tree(tmp_path / f"gsrc{r}", files)
        with open(src / "sparse", "wb") as f:
            f.truncate(768 << 20)
        srcs.append(src)
    prev = snapshot(store, srcs[0])
    others = {}
    for r in range(1, rounds + 1):
        snap = start_cli(store, "snapshot", str(srcs[r]))
        time.sleep(0.05 * r)  # at various points of the snapshot
        rm = run_cli(store, "rm", prev)
        assert rm.returncode == 0, rm.stderr
        gcs = [start_cli(store, "gc") for _ in range(2)]
        other_src = write_tree(tmp_path / f"other{r}", {"o": os.urandom(1 << 20)})
        other = start_cli(store, "snapshot", str(other_src))
        rc, out, err = finish(snap)
        assert rc == 0, err
        prev = out.strip().splitlines()[-1]
        for g in gcs:
            grc, _gout, gerr = finish(g)
            assert grc == 0, gerr
        orc, oout, oerr = finish(other)
        assert orc == 0, oerr
        others[oout.strip().splitlines()[-1]] = other_src
        # the layer just made must be whole now, before a later snapshot could re-add
        # anything gc deleted
        proc = run_cli(store, "fsck")
        assert proc.returncode == 0, (r, proc.stdout, proc.stderr)
        cat = _run_cli(store, "cat", prev, "/a.bin", cwd=tmp_path, timeout=60)
        assert cat.returncode == 0 and cat.stdout == payload[r], cat.stderr
    with Store.open(store, create=False) as s:
        layer_ids = {k.hex() for k in Layers(s).all_ids()}
    assert layer_ids == set(others) | {prev}
    for i, (lid, src) in enumerate(others.items()):
        assert_checks_out(store, lid, src, tmp_path / f"co{i}")


def test_gc_after_rm_frees_space_and_keeps_the_rest(tmp_path: Path) -> None:
    store = tmp_path / "store"
    keep_src = write_tree(tmp_path / "keep", {"k.bin": os.urandom(2 << 20), "k.txt": b"k\n"})
    gone_src = write_tree(tmp_path / "gone", {"g.bin": os.urandom(6 << 20),
                                              "k.bin": (keep_src / "k.bin").read_bytes()})
    keep = snapshot(store, keep_src, "--tag", "keep")
    gone = snapshot(store, gone_src)
    child_src = write_tree(tmp_path / "child", {"k.txt": b"child\n"})
    child = snapshot(store, child_src, "--parent", "keep")
    before = du(store)
    assert run_cli(store, "rm", gone).returncode == 0
    assert du(store)["stored_bytes"] == before["stored_bytes"]  # rm alone frees nothing
    proc = run_cli(store, "gc")
    assert proc.returncode == 0, proc.stderr
    after = du(store)
    assert after["layers"] == 2
    # the 6 MiB only `gone` held are gone from disk
    assert after["stored_bytes"] < before["stored_bytes"] - (5 << 20)
    assert after["chunks"] < before["chunks"]
    assert indexed_chunks(store) == referenced_chunks(store)
    assert_fsck_ok(store)
    assert_checks_out(store, keep, keep_src, tmp_path / "out_keep")
    # the child is a diff against `keep` (k.txt changed, k.bin whited out): both needed
    assert_checks_out(store, child, child_src, tmp_path / "out_child")
    # a second gc has nothing left to do
    assert du(store)["stored_bytes"] == after["stored_bytes"]
    proc = run_cli(store, "gc")
    assert proc.returncode == 0 and "0 chunks, 0 packs; rewrote 0 packs" in proc.stdout


def test_gc_repacks_a_mostly_dead_pack(tmp_path: Path) -> None:
    store = tmp_path / "store"
    small = os.urandom(300_000)
    big_src = write_tree(tmp_path / "big", {"a_big.bin": os.urandom(8 << 20),
                                            "z_small.bin": small})
    small_src = write_tree(tmp_path / "small", {"z_small.bin": small})
    big = snapshot(store, big_src)
    small_id = snapshot(store, small_src)  # its file data dedups into big's pack
    packs_before = {p.name for p in (store / "packs").glob("*/*.pack")}
    assert run_cli(store, "rm", big).returncode == 0
    before = du(store)["stored_bytes"]
    proc = run_cli(store, "gc")
    assert proc.returncode == 0, proc.stderr
    assert "rewrote 1 packs" in proc.stdout, proc.stdout
    packs_after = {p.name for p in (store / "packs").glob("*/*.pack")}
    assert packs_after - packs_before, "no new pack: nothing was rewritten"
    assert len(packs_after & packs_before) == 1  # small's own pack (its manifest) stays
    after = du(store)["stored_bytes"]
    assert after < before - (7 << 20)
    assert after < 2 << 20
    assert_fsck_ok(store)
    assert_checks_out(store, small_id, small_src, tmp_path / "out")
    assert indexed_chunks(store) == referenced_chunks(store)


def test_gc_repacks_a_pack_whose_frames_are_each_mostly_dead(tmp_path: Path) -> None:
    """Small files share frames (~1 MiB each). When 9 in 10 of them die, every frame
    still holds a live chunk, but the pack is mostly dead all the same: gc must rewrite
    it, not keep 90 % dead bytes because no single frame is wholly dead."""
    store = tmp_path / "store"
    files = {f"f{i:03d}": os.urandom(8000) for i in range(400)}
    big_src = write_tree(tmp_path / "all", files)
    few_src = write_tree(tmp_path / "few", {k: v for i, (k, v) in enumerate(files.items())
                                            if i % 10 == 0})
    big = snapshot(store, big_src)
    few = snapshot(store, few_src)
    assert run_cli(store, "rm", big).returncode == 0
    before = du(store)["stored_bytes"]
    proc = run_cli(store, "gc")
    assert proc.returncode == 0, proc.stderr
    assert "rewrote 1 packs" in proc.stdout, proc.stdout
    after = du(store)["stored_bytes"]
    assert after < before - 2_500_000  # about 360 files' worth freed
    assert_fsck_ok(store)
    assert_checks_out(store, few, few_src, tmp_path / "out")


def test_resnapshot_after_gc_does_not_trust_a_stale_stat_cache(tmp_path: Path) -> None:
    """The stat cache names chunks; after rm + gc deleted them, snapshotting the same
    directory again must store its data again, not reuse the cached chunk lists."""
    store = tmp_path / "store"
    src = write_tree(tmp_path / "src", {"f.bin": os.urandom(3 << 20), "g.txt": b"g\n"})
    old = time.time() - 10
    for p in (src / "f.bin", src / "g.txt"):
        os.utime(p, (old, old))
    time.sleep(1.1)  # ctime must be older than the read by the racy-clean margin
    first = snapshot(store, src)
    assert run_cli(store, "rm", first).returncode == 0
    assert run_cli(store, "gc").returncode == 0
    second = snapshot(store, src)
    assert second == first  # same tree, no parent: same id
    assert_fsck_ok(store)
    assert_checks_out(store, second, src, tmp_path / "out")


# -- rm racing children onto the layer it removes ------------------------------------------

# A child of layer argv[3], made once a line arrives on stdin (after the store is open
# and the parent resolved): a prepare (copy driver) or a snapshot of directory argv[4].
CHILD = """
import sys
from pylayers import Layers, Store
from pylayers.errors import PylayersError
from pylayers.mounts import Snapshotter
with Store.open(sys.argv[1]) as s:
    layers = Layers(s)
    parent = layers.resolve(sys.argv[3])
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        if sys.argv[2] == "prepare":
            Snapshotter(layers, "copy").prepare("on-" + sys.argv[3], parent.hex())
        else:
            layers.snapshot(sys.argv[4], parent)
    except PylayersError as e:
        print(f"refused: {e}", flush=True)
        sys.exit(1)
print("made", flush=True)
"""

PREPARE = """
import sys
from pylayers import Layers, Store
from pylayers.errors import PylayersError
from pylayers.mounts import Snapshotter
with Store.open(sys.argv[1]) as s:
    try:
        Snapshotter(Layers(s), "copy").prepare(sys.argv[2], sys.argv[3])
    except PylayersError as e:
        print(f"refused: {e}", flush=True)
        sys.exit(1)
print("prepared", flush=True)
"""

# `rm` whose check takes a while: it sleeps after deciding, inside its transaction. If
# the check and the delete were not one transaction, children started meanwhile would
# land on the layer before it is deleted.
SLOW_RM = """
import sys, time
from pylayers import Layers, Store
from pylayers.layers import repo
real = repo.Layers.in_use_in
def slow(t, lid, owners=()):
    why = real(t, lid, owners)
    print("checked", flush=True)
    time.sleep(float(sys.argv[3]))
    return why
repo.Layers.in_use_in = staticmethod(slow)
with Store.open(sys.argv[1]) as s:
    print(Layers(s).remove(sys.argv[2])[0], flush=True)
"""


def start_prepare(store: Path, key: str, parent: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PREPARE, str(store), key, parent],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=store.parent)


def assert_nothing_stands_on_a_missing_layer(store: Path, tmp_path: Path) -> None:
    """Every layer's parent and every snapshot's layers exist, and stay usable after
    gc: no chunk a child or a snapshot needs was freed."""
    from pylayers.mounts import Snapshotter

    proc = run_cli(store, "gc")
    assert proc.returncode == 0, proc.stderr
    assert_fsck_ok(store)  # fsck: parents present, every chunk of every layer indexed
    with Store.open(store, create=False) as s:
        layers = Layers(s)
        ids = set(layers.all_ids())
        for _lid, rec in layers.records():
            assert rec.parent is None or rec.parent in ids
        for i, info in enumerate(Snapshotter(layers).walk()):
            for h in (info.parent_layer, info.layer):
                if h:
                    assert bytes.fromhex(h) in ids, info
                    layers.checkout(bytes.fromhex(h), tmp_path / f"snapco{i}{h[:6]}")


def test_children_started_while_rm_decides_find_the_parent_gone(tmp_path: Path) -> None:
    """rm decides, then (in its transaction) waits; a prepare and a snapshot on the
    layer, resolved before, try to commit meanwhile. They must wait for rm and then
    fail cleanly: the parent was removed. (With check and delete in two
    transactions, both would land on the layer before it is deleted.)"""
    store = tmp_path / "store"
    base = snapshot(store, write_tree(tmp_path / "base", {"a": b"base\n" * 100}))
    child_src = write_tree(tmp_path / "child", {"a": b"base\n" * 100, "b": b"new\n"})
    kids = [subprocess.Popen([sys.executable, "-c", CHILD, str(store), kind, base,
                              str(child_src)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=tmp_path) for kind in ("prepare", "snapshot")]
    rm = None
    try:
        for k in kids:
            assert k.stdout.readline() == "ready\n", k.stderr.read()
        rm = subprocess.Popen([sys.executable, "-c", SLOW_RM, str(store), base, "3"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=tmp_path)
        assert rm.stdout.readline() == "checked\n", rm.stderr.read()
        # rm has decided the layer is unused and holds its write transaction
        for k in kids:
            k.stdin.write("go\n")
            k.stdin.flush()
        results = [k.communicate(timeout=120) for k in kids]
        rest, err = rm.communicate(timeout=120)
    finally:
        for p in [*kids, rm]:
            if p is not None and p.poll() is None:
                p.kill()
    assert rm.returncode == 0 and rest == "layer\n", err
    for k, (out, err) in zip(kids, results, strict=True):
        assert k.returncode == 1 and "Traceback" not in err, (out, err)
        assert out.startswith("refused: ") and "removed meanwhile" in out, out
    assert_nothing_stands_on_a_missing_layer(store, tmp_path)


def test_rm_racing_snapshot_and_prepare_on_the_same_layer(tmp_path: Path) -> None:
    """Free-running rounds: rm, `snapshot --parent` and a prepare on one layer, all
    started at once. Whatever wins, nothing may stand on a removed layer."""
    store = tmp_path / "store"
    for r in range(5):
        rnd = random.Random(r)
        base_src = write_tree(tmp_path / f"base{r}", {"a": rnd.randbytes(3000)})
        base = snapshot(store, base_src)
        child = write_tree(tmp_path / f"child{r}", {"a": (base_src / "a").read_bytes(),
                                                    "b": rnd.randbytes(2000)})
        procs = [start_cli(store, "rm", base),
                 start_cli(store, "snapshot", "--parent", base, str(child)),
                 start_prepare(store, f"snap{r}", base)]
        (rm_rc, _, rm_err), (snap_rc, _, snap_err), (prep_rc, _, prep_err) = \
            [finish(p) for p in procs]
        for rc, err in ((rm_rc, rm_err), (snap_rc, snap_err), (prep_rc, prep_err)):
            assert "Traceback" not in err and (rc == 0 or len(err.strip().splitlines()) <= 2)
        if rm_rc == 0:  # removed: neither child may exist
            assert snap_rc != 0 and prep_rc != 0, (snap_err, prep_err)
        else:
            assert "cannot remove layer" in rm_err, rm_err
            assert snap_rc == 0 or prep_rc == 0, (snap_err, prep_err)
    assert_nothing_stands_on_a_missing_layer(store, tmp_path)
