"""A Snapshotter with `background_removal` (the builder's): a committed or removed
snapshot's directory leaves its place at once (renamed to `.removing-<dir>`), is
deleted by a thread, and is gone after `wait_removals()`; a leftover one (a killed
process) is an orphan `cleanup` removes; the layer committed is the same as without it.
Runs with the copy driver: no mounts, no root."""

from __future__ import annotations

import os
from pathlib import Path

from pylayers import Layers, Store
from pylayers.mounts import Snapshotter

T = 1_700_000_000_000_000_000


def fill(root: Path, n: int) -> None:
    """Four directories of `n` files each, every mtime fixed (so the same layer id)."""
    for d in range(4):
        (root / f"d{d}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / f"d{d}" / f"f{i}").write_text(f"{d}/{i}\n")
            os.utime(root / f"d{d}" / f"f{i}", ns=(T, T))
        os.utime(root / f"d{d}", ns=(T, T))
    os.utime(root, ns=(T, T))


def test_background_removal_commits_the_same_layer_and_leaves_nothing(tmp_path) -> None:
    with Store.open(tmp_path / "store") as store:
        layers = Layers(store)
        ids = []
        for background in (False, True):
            snaps = Snapshotter(layers, "copy", background_removal=background)
            key = f"step-{background}"
            mounts = snaps.prepare(key)
            fill(Path(mounts[0].source), 50)
            sdir = Path(mounts[0].source).parent
            ids.append(snaps.commit(f"done-{background}", key))
            assert not sdir.exists()  # left its place at once
            snaps.wait_removals()
            assert sorted(os.listdir(snaps.root)) == []
        assert ids[0] == ids[1]
        # remove() of an active snapshot and of a view, the same way
        snaps = Snapshotter(layers, "copy", background_removal=True)
        for key, make in (("a", snaps.prepare), ("v", snaps.view)):
            make(key, ids[0].hex())
            snaps.remove(key)
        snaps.wait_removals()
        assert sorted(os.listdir(snaps.root)) == []


def test_a_leftover_removal_is_an_orphan_cleanup_removes(tmp_path) -> None:
    with Store.open(tmp_path / "store") as store:
        snaps = Snapshotter(Layers(store), "copy", background_removal=True)
        mounts = snaps.prepare("kept")
        fill(Path(mounts[0].source), 3)
        left = snaps.root / ".removing-0123"  # as a process killed mid-removal leaves it
        fill(left, 3)
        assert snaps.cleanup() == [".removing-0123"]
        assert not left.exists()
        assert Path(mounts[0].source).is_dir()  # a live snapshot's directory stays
