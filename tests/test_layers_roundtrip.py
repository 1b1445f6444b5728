"""Snapshot -> checkout round trips, exactly: every kind of entry, every piece of
metadata (owner, odd modes, ns mtimes, xattrs incl. trusted.*, capabilities and ACLs),
hardlinks, sparse files and awkward names; incremental layers after every kind of
edit; dedup of metadata-only changes and small edits; the stat cache; content ids.

Real trees in tmp_path, the real CLI in a subprocess, the Python API where it shows
what the CLI cannot (scan statistics, entries); nothing of pylayers is mocked. A test
whose tree needs root (devices, ownership, trusted.* xattrs) or a tool (setfacl, setcap)
skips with the reason where it is missing (treeutil.build says which).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import blake3
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from treeutil import (  # noqa: E402
    BlockDev,
    CharDev,
    Dir,
    Fifo,
    File,
    Hardlink,
    Meta,
    Node,
    Remove,
    Sparse,
    Symlink,
    Write,
    assert_same_tree,
    build,
    checkout,
    describe_tree,
    need_tools,
    run_cli,
    snapshot,
    tree_differences,
)

import pylayers  # noqa: E402
from pylayers.layers.manifest import REG, WHITEOUT  # noqa: E402

MiB = 1 << 20
T = 1_600_000_000_123_456_789  # an mtime with all nine ns digits in use


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def rich_specs() -> list:
    """A tree with every kind of entry and metadata pylayers claims to keep."""
    deep = "/".join(f"d{i}" for i in range(40))
    specs: list = [
        File("empty"),
        File("small", b"hello\n", mode=0o644, uid=1234, gid=5678, mtime_ns=T + 1),
        File("big", rand(5 * MiB + 12345, 1), mode=0o600, mtime_ns=T + 2),
        File("zero", b"no permissions at all", mode=0o000, mtime_ns=T + 3),
        File("suid", b"#!/bin/sh\n", mode=0o4755, mtime_ns=T + 4),
        File("sgid", b"#!/bin/sh\n", mode=0o2711, uid=1234, gid=5678),
        File("odd", b"x", mode=0o7007),
        File("old", b"from before 1970", mtime_ns=-1_000_000_000_000 + 7),
        File("future", b"from 2096", mtime_ns=4_000_000_000_999_999_999),
        Dir("ro", mode=0o555, mtime_ns=T + 5),
        File("ro/inside", b"in a read-only directory", mtime_ns=T + 6),
        Dir("ro/sub", mode=0o500, uid=1234, gid=5678, mtime_ns=T + 7),
        File("ro/sub/f", b"deeper"),
        Dir("sticky", mode=0o1777, mtime_ns=T + 8),
        Dir("setgid", mode=0o2775, uid=1234, gid=5678, mtime_ns=T + 9),
        File("setgid/f", b"f", uid=1234, gid=5678),
        Dir("empty_dir", mode=0o700, mtime_ns=T + 10),
        # symlinks: relative, dangling, absolute, into a directory, owned, with a
        # trusted.* xattr (user.* is not allowed on symlinks)
        Symlink("link_rel", target="small", uid=1234, gid=5678, mtime_ns=T + 11),
        Symlink("link_dangling", target="nowhere/at/all", mtime_ns=T + 12),
        Symlink("link_abs", target="/etc/passwd"),
        Symlink("link_dir", target="ro/sub"),
        Symlink("link_x", target=b"\xff" * 300, xattrs={"trusted.on-a-link": b"yes"}),
        Symlink("link_nl", target=b"line1\nline2\x1b[0m"),
        # hardlinks: three names for one inode, across directories
        Dir("hl"),
        File("hl/a", b"shared inode\n" * 100, mode=0o640, uid=7, gid=8, mtime_ns=T + 13,
             xattrs={"user.k": b"v"}),
        Hardlink("hl/b", "hl/a"),
        Dir("other"),
        Hardlink("other/c", "hl/a"),
        File("other/pair1", b"pair", mtime_ns=T + 14),
        Hardlink("other/pair2", "other/pair1"),
        # devices and FIFOs
        Dir("dev", mode=0o755),
        CharDev("dev/null", major=1, minor=3, mode=0o666, mtime_ns=T + 15),
        CharDev("dev/big", major=4095, minor=1048575, mode=0o600, uid=1, gid=2),
        BlockDev("dev/loop0", major=7, minor=0, mode=0o660, gid=6, mtime_ns=T + 16),
        Fifo("dev/fifo", mode=0o620, uid=1234, gid=5678, mtime_ns=T + 17,
             xattrs={"trusted.fifo": b"\x00"}),
        # xattrs: user, trusted (binary), and a capability that must survive the chown
        File("xattrs", b"xattrs", uid=1234, gid=5678, mtime_ns=T + 18,
             xattrs={"user.comment": b"hello", "user.empty": b"",
                     "trusted.blob": bytes(range(256)), "user.z" * 20: b"v" * 1000}),
        File("cap", b"\x7fELF pretend", mode=0o755, uid=1234, gid=5678, mtime_ns=T + 19,
             cap="cap_net_raw,cap_net_bind_service+ep"),
        # POSIX ACLs, access and default; files made inside inherit from the default
        File("acl_file", b"acl", acl="u:1234:rw-,g:5678:r--,m::rw-", mtime_ns=T + 20),
        Dir("acl_dir", acl="u:1234:rwx", default_acl="u:1234:r-x,g:5678:rwx",
            mtime_ns=T + 21),
        File("acl_dir/inherited", b"inherits the default ACL"),
        Dir("acl_dir/sub"),
        # sparse: 64 MiB with a few written blocks
        Sparse("sparse", size=64 * MiB, mtime_ns=T + 22,
               writes=[(0, rand(4096, 2)), (10 * MiB, b"\x01" * 4096),
                       (33 * MiB + 8192, rand(8192, 3)), (64 * MiB - 4096, b"end")]),
        Sparse("sparse_hole_only", size=3 * MiB),
        Sparse("sparse_tail", size=8 * MiB, writes=[(0, b"head"), (5 * MiB + 1000, rand(5000, 4))]),
        # names: not UTF-8, newline, 255 bytes, quotes, component order neighbours
        File(b"not-utf8-\xff\xfe\x80", b"latin-1 name"),
        Dir(b"dir-\xe9"),
        File(b"dir-\xe9/\x01ctrl\ttab", b"ctrl"),
        File("new\nline", b"newline in the name"),
        File("x" * 255, b"longest name"),
        File("quote\"back\\slash 'sp ace'", b"q"),
        Dir("a"),
        File("a/b", b"a/b"),
        File("a.b", b"a.b"),
        File("a-b", b"a-b"),
        File("a0", b"a0"),
        # deep nesting
        Dir(deep.split("/")[0]),
    ]
    parts = deep.split("/")
    for i in range(1, len(parts)):
        specs.append(Dir("/".join(parts[: i + 1]), mtime_ns=T + 100 + i))
    specs.append(File(deep + "/leaf", b"leaf", mtime_ns=T + 99))
    specs.append(Dir("", mode=0o751, uid=1234, gid=5678, mtime_ns=T + 1000,
                     xattrs={"user.root": b"root xattr"}))
    return specs


@pytest.fixture(scope="module")
def rich(tmp_path_factory) -> tuple[Path, Path, str, dict]:
    """(store, source, layer id, description of the source) for the rich tree."""
    base = tmp_path_factory.mktemp("rich")
    src = base / "src"
    build(src, rich_specs())
    desc = describe_tree(src)
    store = base / "store"
    lid = snapshot(store, src, "--tag", "rich")
    return store, src, lid, desc


def test_rich_tree_is_what_the_test_means(rich) -> None:
    """The source really holds what the round trip claims to cover (so a failure to
    build it cannot pass as a round trip)."""
    _store, _src, _lid, d = rich
    kinds = {n.kind for n in d.values()}
    assert kinds == {"file", "dir", "symlink", "char", "block", "fifo"}
    assert d[b"hl/a"].links == (b"hl/a", b"hl/b", b"other/c") and d[b"hl/a"].nlink == 3
    assert d[b"sparse"].blocks * 512 < 1 * MiB and d[b"sparse"].size == 64 * MiB
    assert d[b"zero"].mode == 0 and d[b"suid"].mode == 0o4755 and d[b"ro"].mode == 0o555
    assert (d[b"small"].uid, d[b"small"].gid) == (1234, 5678)
    names = dict(d[b"cap"].xattrs)
    assert b"security.capability" in names
    assert b"system.posix_acl_access" in dict(d[b"acl_file"].xattrs)
    assert {b"system.posix_acl_access", b"system.posix_acl_default"} <= \
        set(dict(d[b"acl_dir"].xattrs))
    assert b"system.posix_acl_access" in dict(d[b"acl_dir/inherited"].xattrs)
    assert b"trusted.blob" in dict(d[b"xattrs"].xattrs)
    assert d[b"big"].size > 4 * MiB
    assert d[b"dir-\xe9/\x01ctrl\ttab"].kind == "file"
    assert d[b"ro"].mtime_ns == T + 5 and d[b""].mtime_ns == T + 1000


def test_checkout_is_identical_to_the_source(rich, tmp_path: Path) -> None:
    store, src, lid, desc = rich
    dest = tmp_path / "out"
    checkout(store, lid, dest)
    got = describe_tree(dest)
    diffs = tree_differences(desc, got)
    assert not diffs, "\n".join(diffs[:40])
    # the hardlinks really are one inode, and the sparse file stayed sparse
    assert os.stat(dest / "hl/a").st_ino == os.stat(dest / "hl/b").st_ino \
        == os.stat(dest / "other/c").st_ino
    assert got[b"sparse"].blocks == desc[b"sparse"].blocks
    # and the source was not touched by the snapshot
    assert_same_tree(desc, src)


def test_checkout_into_an_existing_empty_directory(rich, tmp_path: Path) -> None:
    store, _src, _lid, desc = rich
    dest = tmp_path / "empty"
    dest.mkdir()
    checkout(store, "rich", dest)
    assert_same_tree(desc, dest)


def test_checkout_inherits_nothing_from_the_destination(rich, tmp_path: Path) -> None:
    """A default ACL on DEST (or on the directory DEST is made in) must not reach the
    checked-out entries, and DEST's own xattrs give way to the layer root's."""
    need_tools("setfacl")
    store, _src, lid, desc = rich
    dest = tmp_path / "dest"
    dest.mkdir()
    subprocess.run(["setfacl", "-m", "u:4321:rwx", "-d", "-m", "u:4321:rwx", str(dest)],
                   check=True)
    os.setxattr(dest, "user.stale", b"from before")
    checkout(store, lid, dest)
    assert_same_tree(desc, dest)
    parent = tmp_path / "parent"
    parent.mkdir()
    subprocess.run(["setfacl", "-d", "-m", "u:4321:rwx", str(parent)], check=True)
    checkout(store, lid, parent / "new")
    assert_same_tree(desc, parent / "new")


def test_linked_checkout_equals_the_source_but_for_link_counts(rich, tmp_path: Path) -> None:
    """`checkout --link`: every field but the link count (and so the inode groups of
    files that were single) as a plain checkout; hardlink groups stay groups; a second
    linked checkout shares each file's inode with the first (the file cache)."""
    store, _src, lid, desc = rich
    one, two = tmp_path / "one", tmp_path / "two"
    for dest in (one, two):
        proc = run_cli(store, "checkout", "--link", lid, dest)
        assert proc.returncode == 0, proc.stderr
    for dest in (one, two):
        got = describe_tree(dest)
        fields = tuple(f for f in Node._fields if f not in ("nlink", "links"))
        diffs = tree_differences(desc, got, fields)
        assert not diffs, "\n".join(diffs[:40])
        for path, node in desc.items():
            if node.kind == "file":
                # a group of hardlinks stays that group; a single file links only the
                # cache (and the other checkout), no other path of this tree
                assert got[path].links == (node.links or (path,)), path
                assert got[path].nlink >= 2, path
    for name in ("small", "big", "hl/a", "xattrs", "sparse", "zero"):
        assert os.stat(one / name).st_ino == os.stat(two / name).st_ino, name
    assert os.stat(one / "hl/b").st_ino == os.stat(two / "other/c").st_ino
    # directories, symlinks and devices are made, not linked
    assert os.stat(one / "ro").st_ino != os.stat(two / "ro").st_ino


def test_ls_shows_every_entry_on_one_line(rich) -> None:
    store, _src, lid, desc = rich
    for d in (b"", b"hl", b"dev", b"dir-\xe9"):
        proc = run_cli(store, "ls", lid, os.fsdecode(b"/" + d))
        assert proc.returncode == 0, proc.stderr
        children = [p for p in desc if p and p.rpartition(b"/")[0] == d]
        assert len(proc.stdout.splitlines()) == len(children), proc.stdout
    line = run_cli(store, "ls", lid, "/link_nl").stdout.decode()
    assert line.rstrip("\n").endswith(' /link_nl -> "line1\\nline2\\033[0m"'), line


def test_api_checkout_matches_too(rich, tmp_path: Path) -> None:
    store, _src, lid, desc = rich
    with pylayers.Store.open(store, create=False) as st:
        layers = pylayers.Layers(st)
        layers.checkout(layers.resolve(lid[:10]), tmp_path / "api")
    assert_same_tree(desc, tmp_path / "api")


def test_at_least_as_faithful_as_gnu_tar(rich, tmp_path: Path) -> None:
    """Every attribute GNU tar (--xattrs --acls -S, numeric owners, posix format) keeps
    for a path, the pylayers checkout keeps as well."""
    need_tools("tar")
    store, src, lid, desc = rich
    archive = tmp_path / "src.tar"
    subprocess.run(["tar", "--format=posix", "--xattrs", "--xattrs-include=*", "--acls",
                    "-S", "--numeric-owner", "-C", str(src), "-cf", str(archive), "."],
                   check=True, capture_output=True)
    untarred = tmp_path / "untarred"
    untarred.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--acls", "-S",
                    "--numeric-owner", "--same-owner", "-p", "-C", str(untarred), "-xf",
                    str(archive)], check=True, capture_output=True)
    by_tar = describe_tree(untarred)
    dest = tmp_path / "out"
    checkout(store, lid, dest)
    ours = describe_tree(dest)
    kept_by_tar = 0
    worse = []
    for path, node in desc.items():
        if path not in by_tar:
            continue
        assert path in ours, path
        for f in node._fields:
            if getattr(by_tar[path], f) == getattr(node, f):
                kept_by_tar += 1
                if getattr(ours[path], f) != getattr(node, f):
                    worse.append(f"{path!r}: {f}: tar kept {getattr(node, f)!r}, "
                                 f"pylayers gave {getattr(ours[path], f)!r}")
    assert not worse, "\n".join(worse)
    assert set(desc) <= set(ours)
    # the comparison means something: tar kept most attributes of most paths
    assert kept_by_tar > 0.8 * len(desc) * len(desc[b""]._fields)


# -- incremental layers ---------------------------------------------------------------


def edit_specs() -> list:
    return [
        Write("small", 2, b"LL"),  # modify in place
        File("big", rand(5 * MiB + 12345, 1)[: 3 * MiB] + b"!" + rand(2 * MiB, 9)),
        Remove("empty"),  # delete a file
        Remove("d0"),  # delete a deep directory tree
        Remove("acl_dir"), File("acl_dir", b"a file where a directory was"),  # dir -> file
        Remove("zero"), Dir("zero", mode=0o705), File("zero/inside", b"file -> dir"),
        Remove("link_rel"), File("link_rel", b"symlink -> file"),
        Remove("hl/a"),  # the inode's first name goes: hl/b becomes the file
        Meta("suid", mode=0o755),  # chmod only
        Meta("sgid", uid=42, gid=43),  # chown only
        Meta("other/pair1", mtime_ns=T + 5000),  # touch only (both names of the inode)
        Meta("xattrs", xattrs={"user.comment": b"changed"}),  # xattr only
        Meta("ro", mode=0o755),  # chmod only, a directory
        Dir("added", mtime_ns=T + 6000),
        File("added/one", b"new file"),
        Dir("added/sub"),
        File("added/sub/two", rand(300_000, 4)),
        Hardlink("added/sub/three", "added/sub/two"),
        File("ro/sub/g", b"added to a read-only dir"),
        Write("sparse", 20 * MiB, b"\x02" * 4096),
        Meta("", mtime_ns=T + 7000),
    ]


def test_second_layer_after_edits(tmp_path: Path) -> None:
    src = tmp_path / "src"
    build(src, rich_specs())
    before = describe_tree(src)
    store = tmp_path / "store"
    first = snapshot(store, src, "--tag", "one")
    build(src, edit_specs())
    after = describe_tree(src)
    assert after != before
    second = snapshot(store, src, "--parent", "one")
    assert second != first
    checkout(store, second, tmp_path / "co2")
    assert_same_tree(after, tmp_path / "co2")
    checkout(store, first, tmp_path / "co1")
    assert_same_tree(before, tmp_path / "co1")
    checkout(store, second + "~1", tmp_path / "co1b")
    assert_same_tree(before, tmp_path / "co1b")
    # the second layer holds only what changed, with whiteouts for what went
    with pylayers.Store.open(store, create=False) as st:
        layers = pylayers.Layers(st)
        own = {e.path: e for e in layers.entries(bytes.fromhex(second))}
    assert b"big" in own and b"suid" in own and b"added/sub/two" in own
    assert b"a/b" not in own and b"dev/null" not in own and b"sparse_tail" not in own
    assert own[b"empty"].kind == WHITEOUT and own[b"d0"].kind == WHITEOUT
    assert own[b"hl/a"].kind == WHITEOUT and own[b"hl/b"].kind == REG
    assert not any(p.startswith(b"d0/") for p in own)  # one whiteout for a tree


def _new_chunks(store: Path, before: set[bytes]) -> tuple[set[bytes], set[bytes], int]:
    """(chunks added since `before`, chunks of manifests, the store's chunk total)."""
    with pylayers.Store.open(store, create=False) as st:
        layers = pylayers.Layers(st)
        now = {cid for cid, _ in st.iter_chunk_locations()}
        manifest = {cid for lid in layers.all_ids() for cid, _ in layers.record(lid).manifest}
        sizes = {cid: loc.length for cid, loc in st.iter_chunk_locations()}
    added = now - before
    return added, manifest, sum(sizes[c] for c in added - manifest)


def _chunks(store: Path) -> set[bytes]:
    with pylayers.Store.open(store, create=False) as st:
        return {cid for cid, _ in st.iter_chunk_locations()}


@pytest.mark.parametrize("change", [
    Meta("f", mode=0o700), Meta("f", uid=99, gid=98), Meta("f", mtime_ns=T + 42),
    Meta("f", xattrs={"user.new": b"x"}), Meta("d", mode=0o711), Meta("big", mode=0o400),
], ids=["chmod", "chown", "touch", "setxattr", "chmod-dir", "chmod-big"])
def test_metadata_only_change_stores_no_file_data(tmp_path: Path, change) -> None:
    src = tmp_path / "src"
    build(src, [File("f", rand(200_000, 5), mtime_ns=T), Dir("d"), File("d/g", b"g"),
                File("big", rand(3 * MiB, 6), mtime_ns=T)])
    store = tmp_path / "store"
    first = snapshot(store, src)
    before = _chunks(store)
    build(src, [change])
    second = snapshot(store, src, "--parent", first)
    assert second != first
    added, manifest, data_bytes = _new_chunks(store, before)
    assert added <= manifest, "a metadata-only change stored file data"
    assert data_bytes == 0
    with pylayers.Store.open(store, create=False) as st:
        layers = pylayers.Layers(st)
        rec = layers.record(bytes.fromhex(second))
        own = layers.entries(bytes.fromhex(second))
    assert rec.new_bytes <= sum(n for _, n in rec.manifest)
    assert [e.path for e in own] == [change.path.encode()]
    checkout(store, second, tmp_path / "co")
    assert_same_tree(src, tmp_path / "co")


def test_same_bytes_different_metadata_share_chunks(tmp_path: Path) -> None:
    data = rand(2 * MiB, 7)
    src = tmp_path / "src"
    build(src, [File("one", data, mode=0o600, uid=1, gid=2, mtime_ns=T),
                Dir("sub", mode=0o700),
                File("sub/two", data, mode=0o755, uid=3, gid=4, mtime_ns=T + 1,
                     xattrs={"user.x": b"y"})])
    store = tmp_path / "store"
    lid = snapshot(store, src)
    with pylayers.Store.open(store, create=False) as st:
        layers = pylayers.Layers(st)
        tree = {e.path: e for e in layers.tree(bytes.fromhex(lid))}
        rec = layers.record(bytes.fromhex(lid))
        total = st.chunk_count()
    one, two = tree[b"one"], tree[b"sub/two"]
    assert one.kind == two.kind == REG
    assert one.chunks == two.chunks and one.content == two.content
    assert len(one.chunk_list()) > 4
    assert total == len(set(one.chunk_list())) + len(rec.manifest)
    assert rec.new_bytes < len(data) + 64 * 1024
    checkout(store, lid, tmp_path / "co")
    assert_same_tree(src, tmp_path / "co")


def test_same_tree_twice_on_the_same_parent_gives_the_same_id(tmp_path: Path) -> None:
    src = tmp_path / "src"
    build(src, [File("f", b"content", mtime_ns=T), Dir("d", mtime_ns=T),
                File("d/g", rand(500_000, 8), mtime_ns=T), Meta("", mtime_ns=T)])
    store = tmp_path / "store"
    a1 = snapshot(store, src)
    a2 = snapshot(store, src)
    assert a1 == a2
    build(src, [File("d/h", b"new"), Meta("d", mtime_ns=T + 1), Meta("", mtime_ns=T)])
    b1 = snapshot(store, src, "--parent", a1)
    # a metadata change and its undo move ctimes: this one is a full scan
    build(src, [Meta("f", mode=0o600), Meta("f", mode=0o644)])
    b2 = snapshot(store, src, "--parent", a1)
    b3 = snapshot(store, src, "--parent", a1[:8])
    assert b1 == b2 == b3 != a1
    # a snapshot onto itself as parent is an empty layer, again with a stable id
    c1 = snapshot(store, src, "--parent", b1)
    c2 = snapshot(store, src, "--parent", b1)
    assert c1 == c2 not in (a1, b1)
    with pylayers.Store.open(store, create=False) as st:
        assert pylayers.Layers(st).entries(bytes.fromhex(c1)) == []


def test_one_byte_edit_in_a_big_file_adds_a_few_chunks(tmp_path: Path) -> None:
    size = 64 * MiB
    src = tmp_path / "src"
    build(src, [File("huge", rand(size, 10))])
    store = tmp_path / "store"
    first = snapshot(store, src)
    before = _chunks(store)
    with open(src / "huge", "r+b") as f:
        f.seek(size // 2)
        old = f.read(1)
        f.seek(size // 2)
        f.write(bytes([old[0] ^ 0xFF]))
    second = snapshot(store, src, "--parent", first)
    added, manifest, data_bytes = _new_chunks(store, before)
    assert 1 <= len(added - manifest) <= 4
    assert data_bytes < MiB
    with pylayers.Store.open(store, create=False) as st:
        rec = pylayers.Layers(st).record(bytes.fromhex(second))
    assert rec.new_bytes < MiB
    with pylayers.Store.open(store, create=False) as st:
        layers = pylayers.Layers(st)
        e = {x.path: x for x in layers.tree(bytes.fromhex(second))}[b"huge"]
        assert layers.read_file(e) == (src / "huge").read_bytes()


def _age_past_racy_window(root: Path) -> None:
    """Sleep until every ctime under `root` is more than the stat cache's racy window
    (1 s) in the past."""
    newest = max(os.lstat(os.path.join(d, n)).st_ctime_ns
                 for d, dirs, files in os.walk(root) for n in dirs + files)
    newest = max(newest, os.lstat(root).st_ctime_ns)
    wait = (newest + 1_100_000_000 - time.time_ns()) / 1e9
    if wait > 0:
        time.sleep(wait)


def test_stat_cache_skips_unchanged_files_but_sees_a_restored_mtime(tmp_path: Path) -> None:
    size = 8 * MiB
    src = tmp_path / "src"
    build(src, [File("big", rand(size, 11), mtime_ns=T), File("small", b"s" * 100)])
    _age_past_racy_window(src)
    store = tmp_path / "store"
    with pylayers.Store.open(store) as st:
        layers = pylayers.Layers(st)
        r1 = layers.snapshot(src)
        assert r1.stats.bytes_read == size + 100
        # something else changes (so the tree is scanned): the big file is not read
        (src / "new").write_bytes(b"n" * 10)
        r2 = layers.snapshot(src, parent=r1.layer_id)
        assert r2.stats.unchanged_since is None
        assert r2.stats.bytes_read == 10
        assert r2.stats.cache_hits == 2
        # a same-size edit whose mtime is put back: ctime moved, so it is read again
        build(src, [Write("big", size // 3, b"EDITED", keep_mtime=True)])
        assert os.stat(src / "big").st_mtime_ns == T
        assert os.stat(src / "big").st_size == size
        r3 = layers.snapshot(src, parent=r2.layer_id)
        assert r3.stats.bytes_read >= size
        own = {e.path: e for e in layers.entries(r3.layer_id)}
        assert list(own) == [b"big"]
        assert layers.read_file(own[b"big"]) == (src / "big").read_bytes()
        old = {e.path: e for e in layers.tree(r2.layer_id)}[b"big"]
        assert own[b"big"].content != old.content and own[b"big"].mtime_ns == T
    checkout(store, r3.layer_id.hex(), tmp_path / "co")
    assert_same_tree(src, tmp_path / "co")


def test_a_moved_directory_keeps_its_walk_cache(tmp_path: Path) -> None:
    """A walk cache is kept under the directory's path; a directory renamed or moved
    (its files keep their inodes and ctimes) snapshotted onto the layer it was last
    snapshotted as takes that layer's cache: only what changed is read."""
    src = tmp_path / "a" / "proj"
    for i in range(40):
        (src / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 4}" / f"f{i}").write_bytes(rand(2000 + i, i))
    _age_past_racy_window(src)
    with pylayers.Store.open(tmp_path / "store") as st:
        layers = pylayers.Layers(st)
        r1 = layers.snapshot(src)
        moved = tmp_path / "b" / "proj2"
        moved.parent.mkdir()
        os.rename(src, moved)
        (moved / "d1" / "f1").write_bytes(b"edited")
        _age_past_racy_window(moved)
        r2 = layers.snapshot(moved, parent=r1.layer_id)
        assert r2.stats.cache_hits == 39 and r2.stats.bytes_read == 6
        assert [e.path for e in layers.entries(r2.layer_id)] == [b"d1/f1"]
        # no parent named: no cache of another path is taken, every file is read
        copy = tmp_path / "c"
        os.rename(moved, copy)
        r3 = layers.snapshot(copy)
        assert r3.stats.cache_hits == 0 and r3.stats.files == 40
    checkout(tmp_path / "store", r2.layer_id.hex(), tmp_path / "co")
    assert_same_tree(copy, tmp_path / "co")


def _link_groups(root: Path) -> set[tuple[str, ...]]:
    """The sets of paths under `root` that are one file (two or more links in it)."""
    by_inode: dict[tuple[int, int], list[str]] = {}
    for d, _dirs, names in os.walk(root):
        for n in names:
            st = os.lstat(os.path.join(d, n))
            if not os.path.islink(os.path.join(d, n)):
                rel = os.path.relpath(os.path.join(d, n), root)
                by_inode.setdefault((st.st_dev, st.st_ino), []).append(rel)
    return {tuple(sorted(v)) for v in by_inode.values() if len(v) > 1}


def _same_tree_and_links(src: Path, out: Path) -> None:
    """`out` holds `src`'s tree, and the same files are one file there; links to
    files outside `src` (a pnpm store) are not part of a tree."""
    diffs = tree_differences(describe_tree(src), describe_tree(out),
                             tuple(f for f in Node._fields if f not in ("nlink", "links")))
    assert not diffs, diffs[:10]
    assert _link_groups(out) == _link_groups(src)


def test_hardlinked_files_are_cache_hits_and_keep_their_links(tmp_path: Path) -> None:
    """Files of several links (a pnpm node_modules hardlinked to its store, a tree
    copied with `cp -al`) are walk-cache hits when their links are unchanged, as
    files of one link are; a group whose links move (one renamed, one added, one
    gone) is read again, and every checkout holds the same groups as the tree."""
    src, pnpm = tmp_path / "src", tmp_path / "pnpm-store"
    pnpm.mkdir()
    for i in range(20):
        (pnpm / f"f{i}").write_bytes(rand(3000 + i, i))
        (src / "node_modules" / f"pkg{i}").mkdir(parents=True)
        os.link(pnpm / f"f{i}", src / "node_modules" / f"pkg{i}" / "index.js")
    for d in "abc":
        (src / d).mkdir()
    (src / "a" / "x").write_bytes(rand(5000, 99))
    os.link(src / "a" / "x", src / "b" / "y")
    os.link(src / "a" / "x", src / "c" / "z")
    (src / "plain").write_bytes(b"p" * 100)
    _age_past_racy_window(src)
    store = tmp_path / "store"
    with pylayers.Store.open(store) as st:
        layers = pylayers.Layers(st)
        r1 = layers.snapshot(src)
        (src / "plain").write_bytes(b"q" * 100)
        _age_past_racy_window(src)
        r2 = layers.snapshot(src, parent=r1.layer_id)
        # the 20 pnpm files and the group of three are not read again
        assert r2.stats.cache_hits == 23 and r2.stats.bytes_read == 100
        assert [e.path for e in layers.entries(r2.layer_id)] == [b"plain"]
        # the group changes: x renamed into a new directory, a link added, z gone
        (src / "d").mkdir()
        os.rename(src / "a" / "x", src / "d" / "x")
        os.link(src / "b" / "y", src / "e-link")
        os.unlink(src / "c" / "z")
        _age_past_racy_window(src)
        r3 = layers.snapshot(src, parent=r2.layer_id)
        assert r3.stats.cache_hits == 21  # the pnpm files and plain
        assert r3.stats.bytes_read == 5000  # the group, read once
        checkout(store, r3.layer_id.hex(), tmp_path / "co3")
        _same_tree_and_links(src, tmp_path / "co3")
        # a pnpm file edited through its store link: read again
        (pnpm / "f3").write_bytes(b"edited in the store")
        _age_past_racy_window(src)
        r4 = layers.snapshot(src, parent=r3.layer_id)
        assert r4.stats.cache_hits == 23  # the group of three is whole again
        assert [e.path for e in layers.entries(r4.layer_id)] == \
            [b"node_modules/pkg3/index.js"]
    checkout(store, r4.layer_id.hex(), tmp_path / "co4")
    _same_tree_and_links(src, tmp_path / "co4")


CONTENT_ID_FILES = ("empty", "small", "one_chunk", "multi", "blocky", "sparse")


@pytest.fixture
def content_id_tree(tmp_path: Path) -> tuple[Path, dict[bytes, object]]:
    """(source, tree entries by path) of a layer of files of one and many chunks."""
    src = tmp_path / "src"
    build(src, [File("empty"), File("small", b"hello\n"), File("one_chunk", rand(9000, 12)),
                File("multi", rand(3 * MiB + 1, 13)), File("blocky", rand(9 * MiB, 14)),
                Sparse("sparse", size=5 * MiB, writes=[(MiB, b"x")])])
    store = tmp_path / "store"
    lid = snapshot(store, src)
    with pylayers.Store.open(store, create=False) as st:
        tree = {e.path: e for e in pylayers.Layers(st).tree(bytes.fromhex(lid))}
    assert len(tree[b"multi"].chunk_list()) > 1
    return src, tree


def test_content_id_is_the_blake3_of_the_whole_file(content_id_tree) -> None:
    """The documented content id is what `b3sum` prints: BLAKE3 of the file's bytes
    (checked with the blake3 package, which holds to the spec's test vector), not of
    its chunks."""
    assert blake3.blake3(b"").hexdigest() == \
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    src, tree = content_id_tree
    for name in CONTENT_ID_FILES:
        want = blake3.blake3((src / name).read_bytes()).digest()
        assert tree[name.encode()].content == want, name


def test_b3sum_prints_the_stored_content_id(content_id_tree) -> None:
    """The same against the b3sum binary, where it is installed."""
    need_tools("b3sum")
    src, tree = content_id_tree
    for name in CONTENT_ID_FILES:
        out = subprocess.run(["b3sum", "--no-names", str(src / name)], check=True,
                             capture_output=True, text=True).stdout.strip()
        assert tree[name.encode()].content.hex() == out, name


def test_one_chunk_files_keep_their_holes(tmp_path: Path) -> None:
    """Files of one chunk take a shortcut on checkout when no block of them is all
    zeros; a small all-zero file and an all-zero last block still become holes, and
    every byte comes back."""
    from pylayers import Layers, Store

    src = tmp_path / "src"
    src.mkdir()
    files = {
        "zeros_100": bytes(100),
        "zero_tail": os.urandom(4096) + bytes(3000),
        "zero_block_inside": os.urandom(4096) + bytes(4096) + os.urandom(10),
        "dense": os.urandom(9000),
        "tiny": b"x",
        "empty": b"",
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    with Store.open(tmp_path / "store") as store:
        layers = Layers(store)
        lid = layers.snapshot(src).layer_id
        assert all(e.chunk_count() <= 1 for e in layers.tree(lid))
        layers.checkout(lid, tmp_path / "out")
    out = tmp_path / "out"
    for name, data in files.items():
        assert (out / name).read_bytes() == data, name
    block = os.stat(out).st_blksize
    if block == 4096:
        assert os.stat(out / "zeros_100").st_blocks == 0
        assert os.stat(out / "zero_tail").st_blocks * 512 == 4096
        assert os.stat(out / "zero_block_inside").st_blocks * 512 == 2 * 4096
        assert os.stat(out / "dense").st_blocks * 512 >= 9000
