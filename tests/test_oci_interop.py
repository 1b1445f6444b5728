"""Interop with independent OCI tools: an image made by umoci from a busybox-static
rootfs (two layers: the second deletes, replaces and recreates, so it carries
whiteouts) imported by pylayers and compared entry by entry with `umoci unpack`'s
rootfs; an image exported by pylayers unpacked by umoci and copied by skopeo (to an
image layout and to a docker archive, and back into pylayers); every comparison by
`describe_tree` (type, mode, owner, size, mtime, content, xattrs, hardlinks)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from treeutil import describe_tree, need_root, tree_differences  # noqa: E402

import pylayers  # noqa: E402
from pylayers.oci import export_image, import_source  # noqa: E402

TOOLS = {"umoci": "umoci", "skopeo": "skopeo", "busybox": "busybox-static",
         "setfattr": "attr"}


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(", ".join(f"{t} is not installed (Debian: {TOOLS[t]})" for t in missing))


def run(*args: str | Path, cwd: Path | None = None) -> None:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 0, f"{args}: {proc.stderr}"


def same(a: Path, b: Path) -> None:
    diffs = tree_differences(describe_tree(a), describe_tree(b))
    assert not diffs, "trees differ:\n" + "\n".join(diffs[:40])


@pytest.fixture
def umoci_image(tmp_path) -> Path:
    """oci layout `img`, tag `bb`: a busybox-static rootfs (symlinks, a hardlink, an
    xattr, a device, a sticky directory, another owner), then a layer deleting,
    replacing and recreating entries."""
    need("umoci", "busybox", "setfattr")
    need_root("umoci repack and unpack keep owners and devices only as root")
    img = tmp_path / "img"
    run("umoci", "init", "--layout", img)
    run("umoci", "new", "--image", f"{img}:bb")
    b1 = tmp_path / "b1"
    run("umoci", "unpack", "--image", f"{img}:bb", b1)
    r = b1 / "rootfs"
    for d in ("bin", "etc", "tmp", "home/u"):
        (r / d).mkdir(parents=True)
    shutil.copy2(shutil.which("busybox"), r / "bin/busybox")
    for name in ("sh", "ls", "cat"):
        os.symlink("busybox", r / "bin" / name)
    (r / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    os.setxattr(r / "etc/passwd", "user.origin", b"umoci\x00test")
    os.link(r / "etc/passwd", r / "etc/passwd.hl")
    os.chmod(r / "tmp", 0o1777)
    (r / "home/u/f").write_text("u\n")
    for p in (r / "home/u", r / "home/u/f"):
        os.chown(p, 1000, 1000)
    os.mknod(r / "null", 0o666 | 0o020000, os.makedev(1, 3))
    run("umoci", "repack", "--image", f"{img}:bb", b1)
    b2 = tmp_path / "b2"
    run("umoci", "unpack", "--image", f"{img}:bb", b2)
    r = b2 / "rootfs"
    shutil.rmtree(r / "tmp")
    os.unlink(r / "etc/passwd.hl")
    (r / "etc/new").mkdir()
    os.unlink(r / "bin/ls")
    (r / "bin/ls").write_text("not a link any more\n")
    shutil.rmtree(r / "home/u")
    (r / "home/u").mkdir()
    (r / "home/u/g").write_text("new\n")
    run("umoci", "repack", "--image", f"{img}:bb", b2)
    return img


def test_umoci_image_imported_as_umoci_unpacks_it(tmp_path, umoci_image):
    with pylayers.Store.open(tmp_path / "store") as store:
        layers = pylayers.Layers(store)
        res = import_source(layers, f"oci:{umoci_image}:bb", tag="bb")
        assert len(res.layers) == 2 and res.config_digest
        layers.checkout(res.top, tmp_path / "co")
        layers.checkout(res.layers[0], tmp_path / "co1")
    run("umoci", "unpack", "--image", f"{umoci_image}:bb", tmp_path / "ref")
    same(tmp_path / "ref/rootfs", tmp_path / "co")
    assert (tmp_path / "co/bin/ls").read_text() == "not a link any more\n"
    assert not (tmp_path / "co/tmp").exists() and (tmp_path / "co1/tmp").is_dir()
    assert os.listdir(tmp_path / "co/home/u") == ["g"]


def test_pylayers_image_unpacked_by_umoci_and_copied_by_skopeo(tmp_path, umoci_image):
    """pylayers' export of the imported image: umoci unpacks the tree pylayers checks
    out; skopeo copies it (layout to layout, and to a docker archive) and pylayers
    imports the copies back to the very same layers."""
    need("skopeo")
    with pylayers.Store.open(tmp_path / "store") as store:
        layers = pylayers.Layers(store)
        res = import_source(layers, f"oci:{umoci_image}:bb")
        layers.checkout(res.top, tmp_path / "co")
        for how in ("none", "gzip", "zstd"):
            out = tmp_path / f"out-{how}"
            export_image(layers, res.top, f"oci:{out}:v1", how)
            if how == "zstd":  # Debian's umoci reads no zstd layers: skopeo recompresses
                run("skopeo", "copy", "--dest-compress", "--dest-compress-format", "gzip",
                    f"oci:{out}:v1", f"oci:{out}-gz:v1")
                out = tmp_path / "out-zstd-gz"
            run("umoci", "unpack", "--image", f"{out}:v1", tmp_path / f"un-{how}")
            same(tmp_path / "co", tmp_path / f"un-{how}/rootfs")
        run("skopeo", "copy", f"oci:{tmp_path / 'out-gzip'}:v1", f"oci:{tmp_path / 'copy'}:v1")
        run("skopeo", "copy", f"oci:{tmp_path / 'out-gzip'}:v1",
            f"docker-archive:{tmp_path / 'copy.tar'}:example/bb:v1")
        export_image(layers, res.top, f"docker-archive:{tmp_path / 'ours.tar'}:ex/bb:1",
                     "none")
        run("skopeo", "copy", f"docker-archive:{tmp_path / 'ours.tar'}",
            f"oci:{tmp_path / 'fromours'}:v1")
    for source in (f"oci:{tmp_path / 'copy'}:v1", f"docker-archive:{tmp_path / 'copy.tar'}",
                   f"oci:{tmp_path / 'fromours'}:v1"):
        with pylayers.Store.open(tmp_path / "store2") as store:
            back = import_source(pylayers.Layers(store), source)
        assert back.layers == res.layers, source
    run("umoci", "unpack", "--image", f"{tmp_path / 'fromours'}:v1", tmp_path / "un-ours")
    same(tmp_path / "co", tmp_path / "un-ours/rootfs")


def test_export_twice_byte_identical_and_skopeo_inspects(tmp_path, umoci_image):
    need("skopeo")
    with pylayers.Store.open(tmp_path / "store") as store:
        layers = pylayers.Layers(store)
        top = import_source(layers, f"oci:{umoci_image}:bb").top
        a = export_image(layers, top, f"oci:{tmp_path / 'a'}:v1", "zstd", 1_700_000_000)
        b = export_image(layers, top, f"oci:{tmp_path / 'b'}:v1", "zstd", 1_700_000_000)
    assert a == b
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*"))
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*"))
    for f in files:
        if (tmp_path / "a" / f).is_file():
            assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    proc = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{tmp_path / 'a'}:v1"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and a.layers[0] in proc.stdout


def test_changed_hardlink_group_exported_whole(tmp_path):
    """A layer that changes a hardlinked file's content changes every name of the
    inode: its changeset carries the group's other names too, so umoci (any tar
    extractor) shows the new content under each name, still linked."""
    need("umoci")
    need_root("umoci unpack keeps owners only as root")
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    (src / "a/first").write_bytes(b"old content\n")
    os.link(src / "a/first", src / "b/second")
    os.link(src / "a/first", src / "b/third")
    (src / "other").write_bytes(b"unchanged\n")
    with pylayers.Store.open(tmp_path / "store") as store:
        layers = pylayers.Layers(store)
        base = layers.snapshot(src).layer_id
        st = (src / "a/first").stat()
        with open(src / "b/second", "r+b") as f:  # in place: the inode stays shared
            f.write(b"NEW")
        os.utime(src / "a/first", ns=(st.st_atime_ns, st.st_mtime_ns))  # content alone
        top = layers.snapshot(src, parent=base).layer_id
        export_image(layers, top, f"oci:{tmp_path / 'img'}:v2", "none")
    run("umoci", "unpack", "--image", f"{tmp_path / 'img'}:v2", tmp_path / "un")
    root = tmp_path / "un/rootfs"
    same(src, root)
    for name in ("a/first", "b/second", "b/third"):
        assert (root / name).read_bytes() == b"NEW content\n", name
    assert (root / "a/first").stat().st_ino == (root / "b/third").stat().st_ino
    with pylayers.Store.open(tmp_path / "store2") as store:  # and back into pylayers
        layers = pylayers.Layers(store)
        back = import_source(layers, f"oci:{tmp_path / 'img'}:v2")
        layers.checkout(back.top, tmp_path / "co")
    same(src, tmp_path / "co")
