"""gc, fsck and du are library calls (`pylayers.gc`, `pylayers.fsck`, `pylayers.du`)
that the CLI only prints: the same store state gives the same result either way, and
every subsystem's garbage is collected by both (committed snapshots nothing references
and their layers, build cache keys of removed layers, dead chunks, driver caches).

Real stores in tmp_path; the CLI is the installed `pylayers` command in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pylayers
from pylayers import Layers, Store
from pylayers.build.cachekeys import BuildCache, cache_key
from pylayers.mounts import Snapshotter

PYLAYERS = Path(sys.executable).parent / "pylayers"


def cli(store: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(PYLAYERS), "--store", str(store), *args], capture_output=True,
                          timeout=120, cwd=cwd or store.parent)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout.decode()


def _garbage_store(root: Path) -> Path:
    """A store holding one of each kind of garbage: a committed snapshot nothing
    references (and its layer), a build cache key whose layer was removed, chunks of a
    removed layer; and things gc must keep (a tagged layer, a rooted snapshot)."""
    store_path = root / "store"
    src = root / "src"
    src.mkdir(parents=True)
    (src / "keep").write_bytes(os.urandom(50_000))
    with Store.open(store_path) as store:
        layers = Layers(store)
        base = layers.snapshot(src, tag="base").layer_id
        sn = Snapshotter(layers)
        for key, rooted in (("step", False), ("rooted", True)):
            sn.prepare(f"{key}-active", "base", driver="copy")
            fs = sn.root / sn.stat(f"{key}-active").dir_id / "fs"
            (fs / key).write_bytes(os.urandom(40_000))
            sn.commit(key, f"{key}-active",
                      labels={"pylayers.gc.root": "test"} if rooted else None)
        (src / "gone").write_bytes(os.urandom(60_000))
        gone = layers.snapshot(src, parent=base).layer_id
        cache = BuildCache(store)
        cache.put(cache_key(base, "RUN gone", store=store), gone)
    # the removed layer: through the CLI, as a user would
    ok(cli(store_path, "rm", gone.hex()))
    return store_path


def _state(store_path: Path) -> dict:
    with Store.open(store_path) as store:
        with store.read() as t:
            return {"chunks": sorted(cid for cid, _ in t.chunks.items()),
                    "layers": sorted(t.layers.ids()),
                    "snapshots": sorted(k for k, _ in t.snapshots.items()),
                    "cachekeys": t.cachekeys.count(),
                    "tags": sorted(t.tags.items())}


def test_library_gc_and_cli_gc_do_the_same(tmp_path: Path) -> None:
    a = _garbage_store(tmp_path / "a")
    b = tmp_path / "b" / "store"
    shutil.copytree(a, b, symlinks=True)
    before = _state(a)
    assert _state(b) == before

    with Store.open(a, exclusive=True) as store:
        lib = pylayers.gc(store).to_json()
    via_cli = json.loads(ok(cli(b, "gc", "--json")))

    assert lib["snapshots"] == via_cli["snapshots"] == ["step"]
    assert len(lib["layers"]) == 1 and lib["layers"] == via_cli["layers"]
    assert lib["cache_keys"] == via_cli["cache_keys"] == 1
    assert lib["chunks"] == via_cli["chunks"] > 0
    assert lib["pack_bytes_freed"] == via_cli["pack_bytes_freed"]
    after_a, after_b = _state(a), _state(b)
    assert after_a == after_b
    assert len(after_a["chunks"]) < len(before["chunks"])
    assert after_a["snapshots"] == ["rooted"]
    assert after_a["cachekeys"] == 0
    # what is left is whole
    for store in (a, b):
        ok(cli(store, "fsck"))
        with Store.open(store) as st:
            assert pylayers.fsck(st).ok


def test_gc_says_what_it_freed(tmp_path: Path) -> None:
    store = _garbage_store(tmp_path)
    out = ok(cli(store, "gc"))
    assert "removed 1 unreferenced snapshots, 1 layers, 1 build cache keys" in out, out
    assert "freed" in out
    again = json.loads(ok(cli(store, "gc", "--json")))
    assert again["chunks"] == 0 and again["snapshots"] == [] and again["layers"] == []


def test_library_gc_refuses_a_shared_store(tmp_path: Path) -> None:
    """gc deleting chunks while another process writes would lose its data."""
    store = _garbage_store(tmp_path)
    with Store.open(store) as st, pytest.raises(pylayers.FailedPrecondition,
                                                match="exclusive"):
        pylayers.gc(st)
    assert _state(store)["snapshots"] == ["rooted", "step"]


def test_library_du_and_cli_du_agree(tmp_path: Path) -> None:
    store = _garbage_store(tmp_path)
    via_cli = json.loads(ok(cli(store, "du", "--json")))
    with Store.open(store) as st:
        lib = pylayers.du(st).to_json()
    for k in ("layers", "chunks", "logical_bytes", "pack_bytes", "dedup_ratio"):
        assert lib[k] == via_cli[k], k
    assert via_cli["pack_bytes"] + via_cli["index_bytes"] <= via_cli["stored_bytes"]


def test_layers_package_does_not_import_build() -> None:
    """layers/ sits below build/: its maintenance module no longer prunes the build
    cache itself (pylayers.maintenance does)."""
    import ast

    import pylayers.layers as pkg
    for path in Path(pkg.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_bytes())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not ("build" in node.module.split(".") and node.level >= 2), path
