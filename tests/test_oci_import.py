"""Import and export of OCI images and layer tarballs (issue 11, first slice): layer
tarballs made by other tools (GNU tar, Python's tarfile) imported and checked out
exactly; whiteouts and opaque markers; an exported image's structure (diffIDs, chain,
whiteout order, reproducible bytes) and its round trip through import."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from ocitar import DirM, Link, Reg, Sym, compress, make_tar, members_of  # noqa: E402
from treeutil import (  # noqa: E402
    Dir,
    File,
    Hardlink,
    Remove,
    Symlink,
    assert_same_tree,
    build,
    describe_tree,
    need_tools,
    run_cli,
    tree_differences,
)

import pylayers  # noqa: E402
from pylayers.errors import CorruptData, InvalidArgument, UnsafePath  # noqa: E402
from pylayers.layers.manifest import DIR, WHITEOUT  # noqa: E402
from pylayers.oci import export_image, import_source  # noqa: E402

T = 1_700_000_000_000_000_000


@pytest.fixture
def layers(tmp_path):
    store = pylayers.Store.open(tmp_path / "store")
    yield pylayers.Layers(store)
    store.close()


def tree_paths(layers, lid) -> dict[bytes, object]:
    return {e.path: e for e in layers.tree(lid)}


def base_specs() -> list:
    return [
        Dir("etc", mode=0o755), Dir("usr"), Dir("usr/bin", mode=0o755), Dir("d"),
        File("etc/motd", b"hello\n", mode=0o644, mtime_ns=T + 123),
        File("etc/big", os.urandom(300_000), mode=0o600, mtime_ns=T),
        File("d/a", b"a"), File("d/b", b"b"), File("d/+plus", b"p"), Dir("d/sub"),
        File("d/sub/c", b"c"),
        Symlink("usr/bin/sh", target="/bin/busybox"),
        Hardlink("etc/motd.link", "etc/motd"),
        File("x" * 200, b"long name"), File(b"caf\xe9", b"latin-1 name"),
        File("etc/xa", b"x", xattrs={"user.test": b"\x00\xffbinary"}),
        Dir("", mode=0o755, mtime_ns=T),
    ]


@pytest.mark.parametrize("how", ["none", "gzip", "zstd"])
def test_gnu_tar_layer_imports_exactly(tmp_path, layers, how):
    """A layer tarball made by GNU tar (PAX, xattrs, hardlinks, long and non-UTF-8
    names), plain or compressed, checks out equal to the tree it was made from."""
    need_tools("tar")
    src = tmp_path / "src"
    build(src, base_specs())
    blob = subprocess.run(["tar", "--format=pax", "--xattrs", "--xattrs-include=*",
                           "--numeric-owner", "-C", src, "-cf", "-", "."],
                          check=True, capture_output=True).stdout
    path = tmp_path / "layer.tar"
    path.write_bytes(compress(blob, how))
    res = import_source(layers, str(path), tag="imported")
    assert layers.resolve("imported") == res.top and res.layers == [res.top]
    layers.checkout(res.top, tmp_path / "out")
    assert_same_tree(src, tmp_path / "out")


def test_changeset_whiteouts_and_opaque(tmp_path, layers):
    """`.wh.NAME` deletes the parent's NAME (a directory with everything under it);
    `.wh..wh..opq` hides the parent's contents of its directory (the layer's own
    entries there stay); entries the parent has stay unless replaced."""
    src = tmp_path / "src"
    build(src, base_specs())
    base = layers.snapshot(src).layer_id
    blob = make_tar([
        DirM("d/"), Reg("d/.wh..wh..opq"), Reg("d/new", data=b"new"),
        Reg(".wh.usr"), Reg("etc/.wh.big"), Reg("etc/motd", data=b"changed\n"),
    ])
    (tmp_path / "l.tar").write_bytes(blob)
    top = import_source(layers, str(tmp_path / "l.tar"), parent=base).top
    own = {e.path: e for e in layers.entries(top)}
    assert own[b"d"].kind == DIR and own[b"d"].opaque
    assert own[b"usr"].kind == WHITEOUT and own[b"etc/big"].kind == WHITEOUT
    tree = tree_paths(layers, top)
    assert b"d/a" not in tree and b"d/sub" not in tree and tree[b"d/new"]
    assert b"usr" not in tree and b"usr/bin/sh" not in tree and b"etc/big" not in tree
    assert b"etc/xa" in tree and layers.read_file(tree[b"etc/motd"]) == b"changed\n"
    # the parent's hardlink to the replaced file keeps its old content
    link = tree[b"etc/motd.link"]
    assert layers.read_file(link if link.kind != 4 else tree[link.target]) == b"hello\n"
    layers.checkout(top, tmp_path / "out")
    assert (tmp_path / "out/etc/motd.link").read_bytes() == b"hello\n"


def test_same_layer_whiteout_rules(tmp_path, layers):
    """Whiteouts apply to the parent only, wherever they are in the archive: a
    whiteout with an entry of the same name in the layer keeps the entry (a directory
    becomes opaque); a later duplicate entry wins, as tar extracts."""
    src = tmp_path / "src"
    build(src, [Dir("d"), File("d/old", b"o"), File("f", b"1")])
    base = layers.snapshot(src).layer_id
    blob = make_tar([DirM("d/"), Reg("d/n", data=b"n"), Reg(".wh.d"),
                     Reg("f", data=b"first"), Reg("f", data=b"last"), Reg(".wh.f")])
    (tmp_path / "l.tar").write_bytes(blob)
    top = import_source(layers, str(tmp_path / "l.tar"), parent=base).top
    tree = tree_paths(layers, top)
    assert sorted(tree) == [b"", b"d", b"d/n", b"f"]
    assert tree[b"d"].opaque and layers.read_file(tree[b"f"]) == b"last"


def test_implied_directories_and_tar_paths(tmp_path, layers):
    """`./` and leading `/` are dropped, `a/../b` is b, and a directory the archive
    does not list is made 0755 root-owned; a base layer gets a root."""
    blob = make_tar([Reg("./x/y/z", data=b"z"), Reg("/abs", data=b"a"),
                     Reg("q/../r", data=b"r")])
    (tmp_path / "l.tar").write_bytes(blob)
    top = import_source(layers, str(tmp_path / "l.tar")).top
    tree = tree_paths(layers, top)
    assert sorted(tree) == [b"", b"abs", b"r", b"x", b"x/y", b"x/y/z"]
    assert (tree[b"x"].kind, tree[b"x"].mode, tree[b"x"].uid) == (DIR, 0o755, 0)


def test_hardlink_groups_in_component_order(tmp_path, layers):
    """The archive's first name of an inode need not be first in component order."""
    blob = make_tar([Reg("z/file", data=b"data", mode=0o640), Link("a/link", target="z/file"),
                     Link("m", target="a/link")])
    (tmp_path / "l.tar").write_bytes(blob)
    top = import_source(layers, str(tmp_path / "l.tar")).top
    layers.checkout(top, tmp_path / "out")
    d = describe_tree(tmp_path / "out")
    assert d[b"a/link"].links == (b"a/link", b"m", b"z/file")
    assert d[b"z/file"].mode == 0o640 and d[b"m"].nlink == 3


def layered(tmp_path, layers) -> tuple[bytes, Path]:
    """Three layers: a base, edits with deletions and a replaced directory, a third."""
    src = tmp_path / "src"
    build(src, base_specs())
    l1 = layers.snapshot(src).layer_id
    build(src, [Remove("d/sub"), Remove("etc/big"), Remove("usr"), File("usr", b"now a file"),
                File("etc/motd", b"v2\n"), Remove("d/+plus"), File("d/+new", b"n")])
    l2 = layers.snapshot(src, parent=l1).layer_id
    build(src, [File("etc/motd", b"v3\n"), Symlink("d/s", target="../etc")])
    l3 = layers.snapshot(src, parent=l2).layer_id
    return l3, src


def test_export_layout_structure(tmp_path, layers):
    top, _src = layered(tmp_path, layers)
    res = export_image(layers, top, f"oci:{tmp_path / 'img'}:v3", "gzip")
    img = tmp_path / "img"
    assert json.loads((img / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((img / "index.json").read_text())
    (desc,) = index["manifests"]
    assert desc["annotations"]["org.opencontainers.image.ref.name"] == "v3"
    assert desc["digest"] == res.manifest_digest

    def blob(d: str) -> bytes:
        data = (img / "blobs/sha256" / d[7:]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == d[7:]
        return data

    manifest = json.loads(blob(res.manifest_digest))
    config = json.loads(blob(manifest["config"]["digest"]))
    assert [x["digest"] for x in manifest["layers"]] == res.layers and len(res.layers) == 3
    raw = [__import__("gzip").decompress(blob(d)) for d in res.layers]
    assert config["rootfs"]["diff_ids"] == [
        "sha256:" + hashlib.sha256(r).hexdigest() for r in raw]
    assert all(x["mediaType"].endswith("tar+gzip") for x in manifest["layers"])
    # layer 2: whiteouts before their siblings, right after their directory
    names = [m.name for m in members_of(raw[1])]
    assert names.index("d/.wh.sub") < min(i for i, n in enumerate(names)
                                          if n.startswith("d/") and ".wh." not in n)
    assert names.index("d/.wh.+plus") < names.index("d/+new")
    assert names.index("etc/.wh.big") < names.index("etc/motd")
    for n in (".wh.usr",):
        assert n not in names  # a directory replaced by a file needs no whiteout
    assert "usr" in names
    first_root = [i for i, n in enumerate(names) if "/" not in n.rstrip("/") and n != "./"]
    assert all(i < j for i, j in zip(first_root, first_root[1:], strict=False))


def test_export_reproducible_and_round_trip(tmp_path, layers):
    """The same layers export to byte-identical blobs; importing the image gives the
    same layer ids (the changesets carry everything a manifest holds) and tree."""
    top, src = layered(tmp_path, layers)
    for how in ("none", "gzip", "zstd"):
        a = export_image(layers, top, f"oci:{tmp_path / ('a' + how)}", how)
        b = export_image(layers, top, f"oci:{tmp_path / ('b' + how)}", how)
        assert a == b
        for d in a.layers + [a.config_digest, a.manifest_digest]:
            assert (tmp_path / ("a" + how) / "blobs/sha256" / d[7:]).read_bytes() == \
                   (tmp_path / ("b" + how) / "blobs/sha256" / d[7:]).read_bytes()
        assert len(set(a.diff_ids)) == 3
    with pylayers.Store.open(tmp_path / "other") as st2:
        other = pylayers.Layers(st2)
        res = import_source(other, f"oci:{tmp_path / 'azstd'}", tag="back")
        assert res.layers == list(reversed(layers.chain(top)))
        other.checkout(res.top, tmp_path / "out")
    diffs = tree_differences(describe_tree(src), describe_tree(tmp_path / "out"))
    assert not diffs, diffs


def test_source_date_epoch_clamps(tmp_path, layers):
    top, _ = layered(tmp_path, layers)
    sde = 1_600_000_000
    res = export_image(layers, top, f"oci:{tmp_path / 'img'}", "none", source_date_epoch=sde)
    blob = (tmp_path / "img/blobs/sha256" / res.layers[0][7:]).read_bytes()
    infos = members_of(blob)
    assert infos and all(i.mtime <= sde for i in infos)
    cfg = json.loads((tmp_path / "img/blobs/sha256" / res.config_digest[7:]).read_bytes())
    assert cfg["created"] == "2020-09-13T12:26:40Z"


def test_docker_archive_round_trip(tmp_path, layers):
    top, src = layered(tmp_path, layers)
    export_image(layers, top, f"docker-archive:{tmp_path / 'img.tar'}:example/app:1", "none")
    with tarfile.open(tmp_path / "img.tar") as tf:
        manifest = json.load(tf.extractfile("manifest.json"))
    assert manifest[0]["RepoTags"] == ["example/app:1"] and len(manifest[0]["Layers"]) == 3
    again = tmp_path / "again.tar"
    export_image(layers, top, f"docker-archive:{again}:example/app:1", "none")
    assert again.read_bytes() == (tmp_path / "img.tar").read_bytes()
    with pylayers.Store.open(tmp_path / "other") as st2:
        other = pylayers.Layers(st2)
        res = import_source(other, f"docker-archive:{tmp_path / 'img.tar'}", tag="d")
        assert res.top == top
        other.checkout(res.top, tmp_path / "out")
    assert_same_tree(src, tmp_path / "out")


def test_config_kept_beside_top_layer(tmp_path, layers):
    """An imported image's config comes back on export with its own fields and the
    rootfs of the exported layers."""
    top, _ = layered(tmp_path, layers)
    export_image(layers, top, f"oci:{tmp_path / 'img'}", "gzip")
    # give the image a config of its own, as a build tool would
    img = tmp_path / "img"
    index = json.loads((img / "index.json").read_text())
    mdig = index["manifests"][0]["digest"]
    manifest = json.loads((img / "blobs/sha256" / mdig[7:]).read_bytes())
    cfg = json.loads((img / "blobs/sha256" / manifest["config"]["digest"][7:]).read_bytes())
    cfg["config"] = {"Entrypoint": ["/bin/sh"], "Env": ["A=1"]}
    data = json.dumps(cfg).encode()
    d = hashlib.sha256(data).hexdigest()
    (img / "blobs/sha256" / d).write_bytes(data)
    manifest["config"] = {"mediaType": manifest["config"]["mediaType"],
                          "digest": "sha256:" + d, "size": len(data)}
    mdata = json.dumps(manifest).encode()
    md = hashlib.sha256(mdata).hexdigest()
    (img / "blobs/sha256" / md).write_bytes(mdata)
    index["manifests"] = [{"mediaType": manifest["mediaType"], "digest": "sha256:" + md,
                           "size": len(mdata)}]
    (img / "index.json").write_text(json.dumps(index))
    with pylayers.Store.open(tmp_path / "other") as st2:
        other = pylayers.Layers(st2)
        res = import_source(other, f"oci:{img}")
        assert res.config_digest == "sha256:" + d
        out = export_image(other, res.top, f"oci:{tmp_path / 'out'}", "gzip")
        back = json.loads((tmp_path / "out/blobs/sha256" / out.config_digest[7:]).read_bytes())
    assert back["config"] == {"Entrypoint": ["/bin/sh"], "Env": ["A=1"]}
    assert back["rootfs"]["diff_ids"] == out.diff_ids


def test_cli_import_export(tmp_path):
    store = tmp_path / "store"
    src = tmp_path / "src"
    build(src, [File("a", b"a"), Dir("d"), File("d/b", b"b")])
    proc = run_cli(store, "snapshot", src, "--tag", "base")
    assert proc.returncode == 0
    proc = run_cli(store, "export", "base", f"oci:{tmp_path / 'img'}:latest",
                   "--compression", "zstd", text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("sha256:")
    proc = run_cli(tmp_path / "s2", "import", f"oci:{tmp_path / 'img'}:latest", "-t", "x",
                   text=True)
    assert proc.returncode == 0, proc.stderr
    lid = proc.stdout.split()[-1]
    assert run_cli(tmp_path / "s2", "checkout", "x", tmp_path / "out").returncode == 0
    assert_same_tree(src, tmp_path / "out")
    assert len(lid) == 64
    proc = run_cli(tmp_path / "s2", "import", f"oci:{tmp_path / 'img'}:nope", text=True)
    assert proc.returncode == 3 and proc.stderr.count("\n") == 1  # NotFound
    assert "no image named 'nope'" in proc.stderr


def test_refusals_are_typed(tmp_path, layers):
    (tmp_path / "bad.tar").write_bytes(make_tar([Reg("../x", data=b"x")]))
    with pytest.raises(UnsafePath):
        import_source(layers, str(tmp_path / "bad.tar"))
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(CorruptData):
        import_source(layers, str(tmp_path / "junk.tar"))
    with pytest.raises(InvalidArgument):
        import_source(layers, f"oci:{tmp_path}", parent=b"\0" * 32)
    assert layers.all_ids() == [] and layers.tags() == {}
    _ = (io, Sym)


def test_gc_removes_the_configs_of_removed_images_only(tmp_path):
    """An image's config goes with its top layer at gc; another image's stays."""
    from pylayers.oci import config as image_config

    store = tmp_path / "store"
    src = tmp_path / "src"
    build(src, [File("a", b"a"), Dir("d"), File("d/b", b"b")])
    assert run_cli(store, "snapshot", src, "--tag", "base").returncode == 0
    assert run_cli(store, "export", "base", f"oci:{tmp_path / 'img'}:one").returncode == 0
    build(src, [File("c", b"c")])
    assert run_cli(store, "snapshot", src, "--tag", "two").returncode == 0
    assert run_cli(store, "export", "two", f"oci:{tmp_path / 'img'}:two").returncode == 0
    s2 = tmp_path / "s2"
    tops = {}
    for name in ("one", "two"):
        proc = run_cli(s2, "import", f"oci:{tmp_path / 'img'}:{name}", "-t", name, text=True)
        assert proc.returncode == 0, proc.stderr
        tops[name] = bytes.fromhex(proc.stdout.split()[-1])
    with pylayers.Store.open(s2) as st:
        assert all(image_config.load(st, t) is not None for t in tops.values())
    assert run_cli(s2, "rm", "one").returncode == 0  # the tag
    assert run_cli(s2, "rm", tops["one"].hex()).returncode == 0  # the layer
    proc = run_cli(s2, "gc", "--json", text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["image_configs"] == 1
    with pylayers.Store.open(s2) as st:
        assert image_config.load(st, tops["one"]) is None
        assert image_config.load(st, tops["two"]) is not None
    proc = run_cli(s2, "gc", "--json", text=True)
    assert json.loads(proc.stdout)["image_configs"] == 0
