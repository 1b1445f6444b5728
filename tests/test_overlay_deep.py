"""Images of any depth mount with the overlay driver (buildkit#3067: images past ~127
layers build but cannot run). A chain of 500 layers, made through the Snapshotter,
mounts with the overlay driver (each lower directory passed alone through the new mount
API's `lowerdir+`, where mount(8) takes one page of options, about 220 relative
lowerdirs), and its files read correctly; mount(8)'s form still mounts what fits; a
501st layer, past overlayfs's 500 lower directories, is refused in one line when the
snapshot is made.

Needs root and overlayfs; the deep mount needs Linux 6.8 (`lowerdir+`)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pylayers import Layers, Store
from pylayers.errors import FailedPrecondition
from pylayers.mounts import Kind, Snapshotter, is_mounted, mount_all, unmount
from pylayers.mounts.overlay import OverlayDriver
from pylayers.mounts.types import OVERLAY_MAX_LOWERS

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or OverlayDriver.unavailable() is not None,
                                reason="mounts overlayfs: needs root and overlayfs")


def lowerdir_plus() -> str | None:
    """Why this kernel has no `lowerdir+` (Linux 6.8), or None."""
    release = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    return None if release >= (6, 8) else f"Linux {os.uname().release} has no lowerdir+"


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> tuple[Layers, list[bytes]]:
    """A store whose chain is OVERLAY_MAX_LOWERS + 1 layers deep: layer i adds f<i>
    (content i) and rewrites `top`; every tenth deletes f<i-5>."""
    root = tmp_path_factory.mktemp("deep")
    store = Store.open(root / "store")
    layers = Layers(store)
    src = root / "src"
    src.mkdir()
    ids: list[bytes] = []
    parent = None
    for i in range(OVERLAY_MAX_LOWERS + 1):
        (src / f"f{i}").write_text(f"{i}\n")
        (src / "top").write_text(f"layer {i}\n")
        if i % 10 == 9:
            os.unlink(src / f"f{i - 5}")
        parent = layers.snapshot(src, parent=parent).layer_id
        ids.append(parent)
    yield layers, ids
    store.close()


def mounted(layers: Layers, layer: bytes, target: Path, readonly: bool, how=None):
    snaps = Snapshotter(layers, "overlay")
    key = f"deep-{os.urandom(4).hex()}"
    mounts = (snaps.view if readonly else snaps.prepare)(key, layer.hex())
    assert mounts[0].type == "overlay"
    target.mkdir(exist_ok=True)
    if how is None:
        mount_all(mounts, target)
    else:
        how(mounts, target)
    return snaps, key


def check_tree(target: Path, depth: int) -> None:
    names = set(os.listdir(target))
    want = {f"f{i}" for i in range(depth)} - {f"f{i - 5}" for i in range(depth) if i % 10 == 9}
    assert names == want | {"top"}
    assert (target / "top").read_text() == f"layer {depth - 1}\n"
    for i in (0, 3, depth // 2, depth - 1):
        if f"f{i}" in want:
            assert (target / f"f{i}").read_text() == f"{i}\n"


@pytest.mark.parametrize("readonly", [True, False], ids=["view", "active"])
def test_a_500_layer_chain_mounts_with_the_overlay_driver(chain, tmp_path, readonly) -> None:
    if (why := lowerdir_plus()) is not None:
        pytest.skip(why)
    layers, ids = chain
    target = tmp_path / "mnt"
    snaps, key = mounted(layers, ids[OVERLAY_MAX_LOWERS - 1], target, readonly)
    try:
        with open("/proc/self/mountinfo") as f:
            line = next(x for x in f if f" {target} " in x)
        assert line.count("lowerdir+=") == OVERLAY_MAX_LOWERS  # one lower at a time
        check_tree(target, OVERLAY_MAX_LOWERS)
        if not readonly:  # the upper directory takes a write, and commit reads it back
            (target / "new").write_text("new\n")
            os.unlink(target / "f0")
    finally:
        unmount(target)
    if not readonly:
        top = snaps.commit(None, key)
        tree = {e.path for e in layers.tree(top)}
        assert b"new" in tree and b"f0" not in tree and b"f1" in tree
    else:
        snaps.remove(key)


def test_mount8_form_still_mounts_a_chain_that_fits_a_page(chain, tmp_path) -> None:
    """The fallback for kernels before 6.8: mount(8) with lowerdirs relative to their
    common parent (Mount.command), here 150 deep (past a page as absolute paths)."""
    layers, ids = chain

    def by_mount8(mounts, target):
        cmd = mounts[0].command(str(target))
        assert cmd[0] == "sh"  # the relative form
        subprocess.run(cmd, check=True, capture_output=True)

    target = tmp_path / "mnt"
    snaps, key = mounted(layers, ids[149], target, True, by_mount8)
    try:
        check_tree(target, 150)
    finally:
        unmount(target)
        snaps.remove(key)


def test_past_500_layers_the_overlay_driver_refuses_in_one_line(chain, tmp_path) -> None:
    layers, ids = chain
    snaps = Snapshotter(layers, "overlay")
    with pytest.raises(FailedPrecondition, match=r"501 layers deep; overlayfs stacks at "
                                                 r"most 500 lower directories"):
        snaps.view("too-deep", ids[-1].hex())
    assert [i.key for i in snaps.walk() if i.kind != Kind.COMMITTED] == []
    # the copy driver has no such limit
    copy = Snapshotter(layers, "copy")
    mounts = copy.view("deep-copy", ids[-1].hex())
    assert not any(is_mounted(m.source) for m in mounts)
    assert (Path(mounts[0].source) / "top").read_text() == f"layer {len(ids) - 1}\n"
    copy.remove("deep-copy")
