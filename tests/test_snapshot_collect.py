"""The snapshotter's collection of unreferenced committed snapshots (containerd's gc
rule) removes a build step's layer, but never a layer a user made with `snapshot`,
even when a build step committed the very same layer (same tree, same parent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pylayers import Layers, NotFound, Store
from pylayers.mounts import Snapshotter


def build_step(sn: Snapshotter, key: str, content: bytes) -> bytes:
    """A step on no parent with the copy driver: write one file, commit as `key`."""
    sn.prepare(f"{key}-active", None, driver="copy")
    fs = sn.root / sn.stat(f"{key}-active").dir_id / "fs"
    (fs / "f").write_bytes(content)
    os.utime(fs / "f", ns=(10**18, 10**18))
    return sn.commit(key, f"{key}-active")


def test_collect_removes_a_step_layer_but_not_a_snapshot_of_the_same_tree(
        tmp_path: Path) -> None:
    with Store.open(tmp_path / "store") as store:
        layers = Layers(store)
        sn = Snapshotter(layers)
        lone = build_step(sn, "lone", b"only a build made me")
        twin = build_step(sn, "twin", b"a user snapshotted me too")
        # the user snapshots a checkout of the step's tree: the same layer id
        layers.checkout(twin, tmp_path / "out")
        assert layers.snapshot(tmp_path / "out").layer_id == twin
        assert layers.record(twin).kept and not layers.record(lone).kept

        assert sorted(sn.collect()) == ["lone", "twin"]
        with pytest.raises(NotFound):  # the lone step's layer went with its snapshot
            layers.record(lone)
        layers.checkout(twin, tmp_path / "again")  # the user's layer is whole
        assert (tmp_path / "again" / "f").read_bytes() == b"a user snapshotted me too"
