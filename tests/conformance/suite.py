"""Conformance suite for the snapshotter and its drivers, after containerd's snapshotter
testsuite (snapshots/testsuite), as a factory: `snapshotter_suite(DriverClass)` returns
the suite's tests and fixtures for one driver, and each driver's test module
(test_copy.py, test_overlay.py) puts them in its namespace:

    globals().update(snapshotter_suite(CopyDriver))

The mounts that `prepare` and `view` return are performed for real (`mount_all`) on
a temporary mount point; declarative changes (`File`, `Dir`, `Remove`, `Rename`,
`Chmod`, `Chown`, `SetXattr`, `Link`...) are applied to the mounted tree and, in the
same order, to a plain reference directory that nothing of pylayers touches. After the
unmount and the commit, the committed layer's checkout must describe (by lstat: type,
mode, owner, size, content hash, link target, xattrs except overlayfs's own, mtimes of
everything but directories, and which names share an inode) exactly as the reference
does. Each layer is also checked while mounted (the active snapshot shows its parent's
tree, then the changes) and through a read-only view.

Mounting needs root (and, for the overlay driver, the kernel's overlayfs); a probe
per module (the driver's `unavailable()`, a bind mount, and the driver module's own
probe) finds whether the driver's mounts work here, and its tests skip with the reason
where they do not. Every mount a test makes is unmounted in the fixture's teardown
(lazily as a last resort).

A new driver gets the whole suite with a test module of three lines (see
test_copy.py); `breaks_hardlinks=True` where its copy-ups, like overlayfs's with
index=off, give a changed name of a lower hardlink group an inode of its own.
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import blake3
import pytest

from pylayers import Layers, Store
from pylayers.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PylayersError,
)
from pylayers.mounts import DRIVERS, Kind, Snapshotter, mount_all, unmount
from pylayers.mounts.drivers import Driver

T0 = 1_600_000_000_123_456_789  # the mtime (ns) every created entry gets unless told
OVERLAY_XATTRS = ("trusted.overlay.",)  # overlayfs's own (without its userxattr option)
MIB = 1 << 20


# --- declarative changes ------------------------------------------------------------
# Each change applies itself to a root directory: the mounted snapshot, or the
# reference tree. Entries get explicit owner, mode and mtime, so the two agree.

def _set_meta(p: Path, uid: int, gid: int, mode: int | None, xattrs: dict[str, bytes],
              mtime: int | None) -> None:
    os.chown(p, uid, gid, follow_symlinks=False)  # before chmod: chown clears setuid
    if mode is not None:
        os.chmod(p, mode)
    for name, value in xattrs.items():
        os.setxattr(p, name, value, follow_symlinks=False)
    if mtime is not None:
        os.utime(p, ns=(mtime, mtime), follow_symlinks=False)


@dataclass
class File:
    """Create (or rewrite in place, truncating) a regular file."""

    path: str
    content: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = T0
    xattrs: dict[str, bytes] = field(default_factory=dict)

    def apply(self, root: Path) -> None:
        p = root / self.path
        with open(p, "wb") as f:
            f.write(self.content)
        _set_meta(p, self.uid, self.gid, self.mode, self.xattrs, self.mtime)


@dataclass
class Write:
    """Overwrite bytes of an existing file in place."""

    path: str
    offset: int
    data: bytes
    mtime: int = T0 + 1

    def apply(self, root: Path) -> None:
        p = root / self.path
        fd = os.open(p, os.O_WRONLY)
        try:
            os.pwrite(fd, self.data, self.offset)
        finally:
            os.close(fd)
        os.utime(p, ns=(self.mtime, self.mtime))


@dataclass
class Dir:
    """Create a directory (or take the existing one) and set its metadata."""

    path: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)

    def apply(self, root: Path) -> None:
        p = root / self.path
        if not p.is_dir():
            os.mkdir(p)
        _set_meta(p, self.uid, self.gid, self.mode, self.xattrs, None)


@dataclass
class Symlink:
    path: str
    target: str
    uid: int = 0
    gid: int = 0
    mtime: int = T0

    def apply(self, root: Path) -> None:
        p = root / self.path
        os.symlink(self.target, p)
        _set_meta(p, self.uid, self.gid, None, {}, self.mtime)


@dataclass
class Fifo:
    path: str
    mode: int = 0o640

    def apply(self, root: Path) -> None:
        p = root / self.path
        os.mkfifo(p)
        _set_meta(p, 0, 0, self.mode, {}, T0)


@dataclass
class CharDev:
    path: str
    major: int = 1
    minor: int = 3

    def apply(self, root: Path) -> None:
        p = root / self.path
        os.mknod(p, stat.S_IFCHR | 0o666, os.makedev(self.major, self.minor))
        _set_meta(p, 0, 0, 0o666, {}, T0)


@dataclass
class Link:
    """A hardlink `path` to the existing file `target`."""

    path: str
    target: str

    def apply(self, root: Path) -> None:
        os.link(root / self.target, root / self.path, follow_symlinks=False)


@dataclass
class Remove:
    """rm -rf."""

    path: str

    def apply(self, root: Path) -> None:
        p = root / self.path
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            os.unlink(p)


def _copy_entry(src: Path, dst: Path) -> None:
    """What mv(1) does across file systems, for one entry and what is under it."""
    st = os.lstat(src)
    if stat.S_ISDIR(st.st_mode):
        os.mkdir(dst)
        for name in sorted(os.listdir(src)):
            _copy_entry(src / name, dst / name)
    elif stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISREG(st.st_mode):
        shutil.copyfile(src, dst)
    else:
        os.mknod(dst, st.st_mode, st.st_rdev)
    xattrs = {n: os.getxattr(src, n, follow_symlinks=False)
              for n in os.listxattr(src, follow_symlinks=False)}
    _set_meta(dst, st.st_uid, st.st_gid,
              None if stat.S_ISLNK(st.st_mode) else stat.S_IMODE(st.st_mode), xattrs, None)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


@dataclass
class Rename:
    """mv: rename(2), or copy and delete where it fails with EXDEV (overlayfs refuses to
    rename a directory that comes from a lower layer unless redirect_dir is on)."""

    src: str
    dst: str

    def apply(self, root: Path) -> None:
        try:
            os.rename(root / self.src, root / self.dst)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            _copy_entry(root / self.src, root / self.dst)
            Remove(self.src).apply(root)


@dataclass
class Chmod:
    path: str
    mode: int

    def apply(self, root: Path) -> None:
        os.chmod(root / self.path, self.mode)


@dataclass
class Chown:
    path: str
    uid: int
    gid: int

    def apply(self, root: Path) -> None:
        os.chown(root / self.path, self.uid, self.gid, follow_symlinks=False)


@dataclass
class SetXattr:
    path: str
    name: str
    value: bytes

    def apply(self, root: Path) -> None:
        os.setxattr(root / self.path, self.name, self.value, follow_symlinks=False)


@dataclass
class DelXattr:
    path: str
    name: str

    def apply(self, root: Path) -> None:
        os.removexattr(root / self.path, self.name, follow_symlinks=False)


@dataclass
class Touch:
    path: str
    mtime: int

    def apply(self, root: Path) -> None:
        os.utime(root / self.path, ns=(self.mtime, self.mtime), follow_symlinks=False)


@dataclass
class Acl:
    """setfacl -m SPEC (-d: the default ACL of a directory)."""

    path: str
    spec: str
    default: bool = False

    def apply(self, root: Path) -> None:
        cmd = ["setfacl", *(["-d"] if self.default else []), "-m", self.spec,
               str(root / self.path)]
        subprocess.run(cmd, check=True, capture_output=True)


def vfs_cap(*caps: int) -> bytes:
    """A security.capability value (revision 2, effective): these caps permitted."""
    mask = sum(1 << c for c in caps)
    return struct.pack("<IIIII", 0x02000001, mask & 0xFFFFFFFF, 0, mask >> 32, 0)


def apply_changes(root: Path, changes: list) -> None:
    for c in changes:
        c.apply(root)


# --- describing trees ---------------------------------------------------------------

class Node(NamedTuple):
    kind: str
    mode: int
    uid: int
    gid: int
    size: int  # regular files and symlinks
    data: object  # BLAKE3 of a file, a symlink's target, a device's numbers
    xattrs: tuple[tuple[str, bytes], ...]  # without overlayfs's private ones
    mtime_ns: int | None  # None for directories (their mtimes follow their history)
    links: tuple[str, ...]  # the names of this tree sharing the file's inode, if several


_KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
          stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo"}


def _hash(p: Path) -> str:
    h = blake3.blake3()
    with open(p, "rb") as f:
        while block := f.read(4 * MIB):
            h.update(block)
    return h.hexdigest()


def describe(root: Path, *, links: bool = True) -> dict[str, Node]:
    """Every path under `root` ("" for the root itself) by lstat. `links=False` leaves
    out which names share an inode, for a tree changed through an overlay mount: its
    copy-ups break hardlinks (index=off), which the reference directory keeps."""
    stats: dict[str, os.stat_result] = {}

    def walk(rel: str) -> None:
        p = root / rel if rel else root
        st = os.lstat(p)
        stats[rel] = st
        if stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(p)):
                walk(f"{rel}/{name}" if rel else name)

    walk("")
    inodes: dict[tuple[int, int], list[str]] = {}
    for rel, st in stats.items():
        if stat.S_ISREG(st.st_mode):
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
    out = {}
    for rel, st in stats.items():
        p = root / rel if rel else root
        fmt = stat.S_IFMT(st.st_mode)
        size, data, group = 0, None, ()
        if fmt == stat.S_IFREG:
            size, data = st.st_size, _hash(p)
            names = inodes[(st.st_dev, st.st_ino)]
            if links and len(names) > 1:  # not nlink: a cache may hold more links
                group = tuple(sorted(names))
        elif fmt == stat.S_IFLNK:
            size, data = st.st_size, os.readlink(p)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            data = (os.major(st.st_rdev), os.minor(st.st_rdev))
        xattrs = tuple(sorted((n, os.getxattr(p, n, follow_symlinks=False))
                              for n in os.listxattr(p, follow_symlinks=False)
                              if not n.startswith(OVERLAY_XATTRS)))
        out[rel] = Node(_KINDS[fmt], stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size,
                        data, xattrs, None if fmt == stat.S_IFDIR else st.st_mtime_ns, group)
    return out


def assert_same(actual: dict[str, Node], expected: dict[str, Node], what: str) -> None:
    problems = []
    for path in sorted(actual.keys() | expected.keys()):
        shown = "/" + path
        if path not in expected:
            problems.append(f"{shown}: unexpected ({actual[path].kind})")
        elif path not in actual:
            problems.append(f"{shown}: missing ({expected[path].kind})")
        else:
            for name in Node._fields:
                a, e = getattr(actual[path], name), getattr(expected[path], name)
                if a != e:
                    problems.append(f"{shown}: {name} is {a!r}, expected {e!r}")
    assert not problems, f"{what} differs from the reference:\n  " + "\n  ".join(problems[:30])


# --- mounting -------------------------------------------------------------------------

def _try(cmd: list[str]) -> str | None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    return None if res.returncode == 0 else \
        ((res.stderr or res.stdout).strip() or "failed").splitlines()[0]


def probe_bind_mount(base: Path) -> str | None:
    """None where a read-only bind mount works here, else why not."""
    for d in ("src", "bind"):
        (base / d).mkdir()
    err = _try(["mount", "-t", "none", "-o", "rbind,ro", str(base / "src"), str(base / "bind")])
    if err is None:
        subprocess.run(["umount", str(base / "bind")], capture_output=True)
        return None
    return f"cannot bind-mount here (mount: {err})"


class Env:
    """A store, its Snapshotter for one driver, and the mounts a test made."""

    def __init__(self, base: Path, driver: type[Driver], breaks_hardlinks: bool) -> None:
        self.base = base
        self.driver_cls = driver
        self.driver = driver.name
        self.drivers = {**DRIVERS, driver.name: driver}
        # copy-ups break a lower file's hardlinks (overlayfs with index=off)
        self.breaks_hardlinks = breaks_hardlinks
        self.store_path = base / "store"
        self.mounted: list[Path] = []
        self._n = itertools.count()
        self.open()

    def open(self) -> None:
        self.store = Store.open(self.store_path)
        self.layers = Layers(self.store)
        self.sn = Snapshotter(self.layers, self.driver, drivers=self.drivers)

    @property
    def driver_path(self) -> str:
        """module:class of the driver, for a script to import it."""
        return f"{self.driver_cls.__module__}:{self.driver_cls.__qualname__}"

    def drop_caches(self) -> None:
        """Whatever the driver caches goes (rebuilt on the next mount): its collector
        with no layer alive."""
        self.driver_cls(self.layers).collect(set())

    def reopen(self) -> None:
        self.store.close()
        self.open()

    def fresh(self, prefix: str) -> Path:
        p = self.base / f"{prefix}-{next(self._n)}"
        p.mkdir()
        return p

    def mount(self, mounts, target: Path | None = None) -> Path:
        target = target or self.fresh("mnt")
        assert mounts, "a snapshot must have at least one mount"
        mount_all(mounts, target)
        self.mounted += [target] * len(mounts)
        return target

    def umount(self, target: Path) -> None:
        while target in self.mounted:
            unmount(target)
            del self.mounted[len(self.mounted) - 1 - self.mounted[::-1].index(target)]

    def cleanup(self) -> None:
        for target in reversed(self.mounted):
            if subprocess.run(["umount", str(target)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(target)], capture_output=True)
        self.mounted.clear()
        self.store.close()

    def layer(self, name: str) -> bytes:
        info = self.sn.stat(name)
        assert info.kind == Kind.COMMITTED and info.layer
        return bytes.fromhex(info.layer)

    def checkout(self, name: str) -> Path:
        dest = self.base / f"checkout-{next(self._n)}"
        self.layers.checkout(self.layer(name), dest)
        return dest

    def reference(self) -> Path:
        ref = self.fresh("ref")
        os.chmod(ref, 0o755)
        return ref


def assert_read_only(mnt: Path) -> None:
    """Every kind of write to a mounted view fails with EROFS."""
    existing = next((p for p in sorted(mnt.rglob("*")) if p.is_file() and not p.is_symlink()),
                    None)
    attempts = [lambda: open(mnt / "new-file", "wb"), lambda: os.mkdir(mnt / "new-dir"),
                lambda: os.chmod(mnt, 0o700), lambda: os.setxattr(mnt, "user.x", b"1"),
                lambda: os.symlink("x", mnt / "new-link")]
    if existing is not None:
        attempts += [lambda: open(existing, "ab"), lambda: os.unlink(existing),
                     lambda: os.rename(existing, mnt / "renamed")]
    for attempt in attempts:
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS, info.value


def check_view(env: Env, parent: str, expected: dict[str, Node]) -> None:
    key = f"view-of-{parent}-{next(env._n)}"
    mnt = env.mount(env.sn.view(key, parent))
    assert env.sn.stat(key).kind == Kind.VIEW
    assert_same(describe(mnt), expected, f"view of {parent}")
    assert_read_only(mnt)
    env.umount(mnt)
    env.sn.remove(key)


def run_chain(env: Env, steps: list[list], *, parent: str | None = None,
              ref: Path | None = None, prefix: str = "layer",
              views: bool = True) -> tuple[list[str], Path]:
    """Prepare, mount, change, unmount and commit one layer per step, on `parent`; the
    reference directory `ref` (the parent's tree) gets the same changes. Checks the
    active mount before and after the changes, the committed checkout and a view.
    Returns the committed names and the reference."""
    if ref is None:
        ref = env.reference()
    names = []
    for i, changes in enumerate(steps):
        key, name = f"{prefix}-{i}-active", f"{prefix}-{i}"
        mnt = env.mount(env.sn.prepare(key, parent))
        if parent is None:
            changes = [Dir(""), *changes]  # the new root's mode follows the umask
        else:
            assert_same(describe(mnt), describe(ref), f"new active snapshot on {parent}")
        apply_changes(mnt, changes)
        apply_changes(ref, changes)
        expected = describe(ref)
        links = not env.breaks_hardlinks
        assert_same(describe(mnt, links=links), describe(ref, links=links),
                    f"active snapshot {key} after step {i}")
        env.umount(mnt)
        layer_id = env.sn.commit(name, key)
        info = env.sn.stat(name)
        assert (info.kind, info.parent, info.layer) == (Kind.COMMITTED, parent, layer_id.hex())
        with pytest.raises(NotFound):
            env.sn.stat(key)
        assert_same(describe(env.checkout(name)), expected, f"checkout of {name} (step {i})")
        if views:
            check_view(env, name, expected)
        names.append(name)
        parent = name
    return names, ref


# --- scenarios (containerd's testsuite cases, and more) -------------------------------

BIG = bytes(range(256)) * 64

SCENARIOS = {
    # checkLayerFileUpdate / checkUpdatedFiles
    "updated_files": [
        [Dir("etc", 0o777), File("etc/hosts", b"mydomain 10.0.0.1"),
         File("etc/profile", b"PATH=/usr/bin")],
        [File("etc/hosts", b"mydomain 10.0.0.2", mtime=T0 + 5),
         File("etc/profile", b"PATH=/usr/bin", mode=0o666), Dir("root", 0o700),
         File("root/.bashrc", b"PATH=/usr/sbin:/usr/bin")],
        [Remove("etc/profile"), Remove("root/.bashrc")],
    ],
    # checkFileFromLowerLayer: appended to and rewritten in later layers
    "file_from_lower_layer": [
        [Dir("dir1", 0o700), File("dir1/f", b"Hello"), Dir("dir2", 0o700),
         File("dir2/f", BIG)],
        [Write("dir1/f", 5, b", world"), Write("dir2/f", 1000, b"XY")],
        [File("dir1/f", b"short"), Touch("dir2/f", T0 + 99)],
    ],
    # checkFileFromLowerLayer: a lower file moved by hardlinking it elsewhere and
    # deleting the original name, beside a directory removed and a copy made
    "move_through_hardlink": [
        [Dir("dir1", 0o700), File("dir1/f1", b"Hello"), Dir("dir2", 0o700),
         File("dir2/f2", b"...", mode=0o640, uid=4)],
        [Dir("dir3", 0o700), File("dir3/f1", b"Hello"), Remove("dir1"),
         Link("dir3/f2", "dir2/f2"), Remove("dir2/f2")],
        [File("dir3/f2", b"rewritten", mode=0o600)],
    ],
    # checkLayerFileUpdate run within one second: a file rewritten with content of
    # the same size and the same mtime (cp -p, tar), in place and by a new inode,
    # must not be taken for the old one by any cache keyed on size and time
    "same_size_same_second": [
        [File("hosts", b"mydomain 10.0.0.1"), File("profile", b"PATH=/usr/bin"),
         File("inplace", b"AAAA")],
        [File("hosts", b"mydomain 10.0.0.2"), Remove("profile"),
         File("profile", b"PATH=/usr/sbi"), Write("inplace", 0, b"BBBB", mtime=T0)],
        [File("hosts", b"mydomain 10.0.0.3"), Write("inplace", 1, b"C", mtime=T0)],
    ],
    # checkDirectoryPermissionOnCommit: owners of directories changed, removed and
    # made again (with the owner they had, or another)
    "ownership_of_recreated_dirs": [
        [Dir("dir1", 0o700, uid=1, gid=1), Dir("dir2", 0o700, uid=1, gid=1),
         Dir("dir3", 0o700, uid=1, gid=1), Dir("dir4", 0o700), File("dir4/f1", b"..."),
         Dir("dir5", 0o700, uid=1, gid=1), File("dir5/f1", b"...", uid=1, gid=1)],
        [Chown("dir2", 0, 0), Remove("dir3"), Chown("dir4", 1, 1),
         Chown("dir4/f1", 1, 1)],
        [Dir("dir3", 0o700, uid=1, gid=1), Remove("dir5"), Dir("dir5", 0o700, uid=1, gid=1)],
        [Remove("dir1"), Dir("dir1", 0o750, uid=2, gid=3), Remove("dir4"),
         Dir("dir4", 0o700)],
    ],
    # checkRemoveDirectoryInLowerLayer
    "lower_dir_removed": [
        [Dir("lib", 0o700), File("lib/hidden", b"ignore"), Dir("lib/sub"),
         File("lib/sub/deep", b"deep"), Dir("other"), File("other/keep", b"keep")],
        [Remove("lib")],
        [Dir("lib", 0o700), File("lib/not-hidden", b"ignore")],
        [Remove("lib/not-hidden"), File("lib/newfile", b"new")],
    ],
    # checkChown
    "chown": [
        [Dir("opt", 0o700), Dir("opt/a", 0o700), Dir("opt/a/b", 0o700),
         File("opt/a/b/file.txt", b"hello"), Symlink("opt/link", "a/b/file.txt")],
        [Chown("opt", 1, 1), Chown("opt/a", 1, 1), Chown("opt/a/b", 1, 1),
         Chown("opt/a/b/file.txt", 1, 1), Chown("opt/link", 2, 2)],
        [Chown("opt/a/b/file.txt", 1000, 100)],
    ],
    # checkRename, and a renamed directory from a lower layer with contents
    "rename": [
        [Dir("dir1", 0o700), Dir("somefiles", 0o700),
         File("somefiles/f1", b"was here first!"), File("somefiles/f2", b"nothing interesting"),
         Dir("tree", 0o750, uid=5, gid=6, xattrs={"user.d": b"1"}), Dir("tree/sub"),
         File("tree/sub/leaf", b"leaf", mode=0o600, uid=7, xattrs={"user.f": b"2"}),
         Symlink("tree/ln", "sub/leaf")],
        [Rename("dir1", "dir2"), File("somefiles/f1-overwrite", b"new content 1"),
         Rename("somefiles/f1-overwrite", "somefiles/f1"),
         Rename("somefiles/f2", "somefiles/f3"), Rename("tree", "moved")],
        [Rename("moved/sub/leaf", "leaf-at-root"), Rename("dir2", "dir1")],
    ],
    # checkDirectoryPermissionOnCommit: directories copied up keep mode and owner
    "dir_permissions_on_commit": [
        [Dir("dir1", 0o700), Dir("dir2", 0o750, uid=1, gid=1), Dir("dir3", 0o711, uid=2),
         Dir("dir4", 0o1777), Dir("dir5", 0o2775, gid=50), Dir("dir5/nested", 0o700),
         File("dir4/foo", b"something")],
        [File("dir1/file1", b"1"), File("dir2/file2", b"2"), File("dir3/file3", b"3"),
         File("dir4/file4", b"4"), File("dir5/nested/file5", b"5")],
        [Chmod("dir1", 0o755), Chown("dir3", 3, 3), Remove("dir4/foo")],
    ],
    # checkDeletedFilesInChildSnapshot
    "deleted_in_child": [
        [File("foo", b"foo\n"), File("bar", b"bar\n"), Dir("baz"), File("baz/qux", b"q")],
        [Remove("foo"), Remove("baz/qux")],
        [Remove("bar"), Remove("baz")],
        [File("foo", b"back\n")],
    ],
    "type_changes": [
        [File("x", b"file"), Dir("d"), File("d/child", b"c"), Dir("d/sub"),
         File("d/sub/grandchild", b"g"), Symlink("s", "x"), Fifo("p"), CharDev("null"),
         File("f2d", b"file to dir")],
        [Remove("x"), Dir("x"), File("x/inside", b"i"), Remove("d"), File("d", b"was a dir"),
         Remove("s"), File("s", b"was a symlink"), Remove("p"), Symlink("p", "x/inside"),
         Chmod("null", 0o600)],
        [Remove("x"), Symlink("x", "d"), Remove("d"), Dir("d"), File("d/again", b"a"),
         Remove("null"), Fifo("null")],
    ],
    # rm -rf a lower directory, then mkdir it again: the old children must not come
    # back, also when one of the new children equals an old one exactly
    "opaque_directory": [
        [Dir("d", 0o750), File("d/a", b"same"), File("d/b", b"old b"), Dir("d/sub"),
         File("d/sub/c", b"old c"), Dir("keep"), File("keep/k", b"k")],
        [Remove("d"), Dir("d", 0o750), File("d/a", b"same"), File("d/new", b"new")],
        [File("d/x", b"x"), File("keep/k2", b"k2")],
        [Remove("d/a"), Dir("d/sub"), File("d/sub/z", b"z")],
        [Remove("d/sub"), Dir("d/sub", 0o700)],
    ],
    # the same, where the new directory equals the old one exactly (tar restores mtimes)
    "opaque_directory_restored": [
        [Dir("d"), File("d/a", b"a"), Touch("d", T0)],
        [Remove("d"), Dir("d"), File("d/x", b"x"), Touch("d", T0)],
        [Remove("d"), Dir("d"), Touch("d", T0)],
        [File("d/y", b"y")],
    ],
    "hardlinks": [
        [File("f", b"shared", mode=0o640, uid=3), Link("g", "f"), Dir("sub"),
         Link("sub/h", "f"), File("solo", b"solo"), File("twin", b"shared", mode=0o640, uid=3),
         File("sub/twin", b"shared", mode=0o640, uid=3)],
        [Link("f2", "f"), Remove("sub/h"), File("new", b"n"), Link("new2", "new")],
        [Remove("f")],
        [Remove("g"), File("g", b"replaced"), Link("sub/n3", "new")],
        [Rename("f2", "f3"), Remove("new")],
    ],
    "xattrs_and_ownership": [
        [File("f", b"x", mode=0o4755, uid=1000, gid=1000,
              xattrs={"user.a": b"1", "trusted.t": b"t", "user.big": b"v" * 2000}),
         Dir("d", 0o2775, uid=2000, gid=3000, xattrs={"user.dir": b"1"}),
         Symlink("s", "f", uid=4000, gid=4000), SetXattr("s", "trusted.lnk", b"1"),
         File("plain", b"p"), File("empty", b"", mode=0o600, uid=65534, gid=65534)],
        [SetXattr("f", "user.a", b"2"), DelXattr("f", "trusted.t"), Chown("plain", 5, 6),
         SetXattr("d", "user.new", b"n"), Chown("s", 7, 8), Chmod("f", 0o755)],
        [Chown("d", 0, 0), Chmod("d", 0o700), DelXattr("d", "user.dir"),
         SetXattr("plain", "user.p", b"\x00\xff")],
    ],
    # user.overlay.* is an ordinary xattr namespace for a mount that does not use
    # overlayfs's userxattr option: kept, and never read as a marker
    "user_overlay_xattrs": [
        [Dir("d"), File("d/child", b"c"), File("f", b"f")],
        [SetXattr("f", "user.overlay.note", b"kept"), SetXattr("d", "user.overlay.opaque", b"y")],
        [File("d/new", b"n")],
    ],
    # POSIX ACLs (a default ACL passes on to what is made inside) and file capabilities
    "acls_and_capabilities": [
        [Dir("shared"), Acl("shared", "u:1234:rwx"), Acl("shared", "g:55:r-x", default=True),
         File("shared/old", b"o"), File("ping", b"\x7fELF", mode=0o755,
                                          xattrs={"security.capability": vfs_cap(13)})],
        [File("shared/new", b"inherits the default ACL"), Acl("shared/old", "u:99:r--"),
         SetXattr("ping", "security.capability", vfs_cap(10, 13)), Dir("shared/sub")],
        [Chown("ping", 0, 5), Remove("shared/old")],  # chown clears the capability
    ],
    # the root directory's own metadata
    "root_metadata": [
        [File("a", b"a")],
        [Chmod("", 0o750), Chown("", 5, 6), SetXattr("", "user.root", b"r")],
        [File("b", b"b")],
        [Chmod("", 0o755), Chown("", 0, 0), DelXattr("", "user.root")],
    ],
    # names the kernel's mount table and overlayfs options would have to escape
    "odd_names": [
        [Dir("with space"), File("with space/a b", b"1"), File("tab\there", b"2"),
         File("new\nline", b"3"), File("colon:name", b"4"), File("comma,name", b"5"),
         File("ünïcödé", b"6"), File(os.fsdecode(b"not-utf8-\xff\xfe"), b"7"),
         Dir("d\\back"), File("d\\back/x", b"8")],
        [Remove("tab\there"), Rename("new\nline", "new\nname"),
         Remove(os.fsdecode(b"not-utf8-\xff\xfe")), Remove("with space"),
         Dir("with space"), File("with space/c,d:e", b"9")],
    ],
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_scenario(env, scenario):
    steps = SCENARIOS[scenario]
    if any(isinstance(c, Acl) for step in steps for c in step) and not shutil.which("setfacl"):
        pytest.skip("setfacl is not installed (Debian: acl)")
    run_chain(env, steps)


def test_prepare_commit_chain(env):
    steps = [
        [Dir("etc"), File("etc/hosts", b"127.0.0.1 localhost\n"),
         File("etc/shadow", b"root:*:", mode=0o640, gid=42), Dir("bin"),
         File("bin/sh", b"\x7fELF" * 5000, mode=0o755), Symlink("bin/bash", "sh"),
         Dir("tmp", 0o1777)],
        [File("etc/hosts", b"127.0.0.1 localhost\n::1 localhost\n", mtime=T0 + 10),
         Chmod("etc/shadow", 0o600), Dir("home"), Dir("home/user", uid=1000, gid=1000),
         File("home/user/.profile", b"export X=1\n", uid=1000, gid=1000),
         Remove("bin/bash")],
        [Remove("etc"), File("etc", b"now a file"), Symlink("bin/bash", "/bin/sh")],
    ]
    names, _ = run_chain(env, steps)
    ids = [env.layer(n) for n in names]
    assert env.layers.record(ids[0]).parent is None
    assert [env.layers.record(i).parent for i in ids[1:]] == ids[:2]
    assert [i.key for i in env.sn.walk(kind=Kind.ACTIVE)] == []


def test_view_is_read_only_and_shows_parent(env):
    (base,), ref = run_chain(env, [[Dir("d"), File("d/f", b"data"), Symlink("l", "d/f")]],
                             views=False)
    mounts = env.sn.view("v", base)
    mnt = env.mount(mounts)
    assert_same(describe(mnt), describe(ref), "view")
    assert_read_only(mnt)
    assert env.sn.mounts("v") == mounts
    env.sn.view("v2", base)
    with pytest.raises(FailedPrecondition):
        env.sn.commit("from-view", "v")
    with pytest.raises(FailedPrecondition):
        env.sn.prepare("on-view", "v")  # a view cannot be a parent
    env.umount(mnt)
    env.sn.remove("v")
    env.sn.remove("v2")
    # a view of nothing: an empty read-only directory
    mnt = env.mount(env.sn.view("empty-view"))
    assert os.listdir(mnt) == []
    with pytest.raises(OSError) as info:
        open(mnt / "x", "wb")
    assert info.value.errno == errno.EROFS
    env.umount(mnt)


def test_mounts_hold_absolute_paths(env, monkeypatch):
    """Mounts are data for whoever performs them, wherever that runs: a store opened
    by a relative path still gives absolute paths."""
    (_, base), _ = run_chain(env, [[File("f", b"f")], [File("g", b"g")]], views=False)
    monkeypatch.chdir(env.base)
    with Store.open("store") as store:
        sn = Snapshotter(Layers(store), env.driver, drivers=env.drivers)
        all_mounts = [sn.prepare("rel-active", base), sn.view("rel-view", base),
                      sn.view("rel-view-1", "layer-0")]
    elsewhere = env.fresh("elsewhere")
    monkeypatch.chdir(elsewhere)
    for mounts in all_mounts:
        for m in mounts:
            paths = [m.source] if m.type != "overlay" else []
            for o in m.options:
                name, _, value = o.partition("=")
                if name in ("lowerdir", "upperdir", "workdir"):
                    paths += value.split(":")
            assert paths and all(os.path.isabs(p) for p in paths), m
        mnt = env.mount(mounts)
        assert sorted(os.listdir(mnt)) in (["f", "g"], ["f"])
        env.umount(mnt)


def test_snapshot_of_a_mounted_view(env):
    """What a view shows is what a program reading it keeps: `pylayers snapshot` (or
    tar, cp -a) of the mounted view gives back the layer, with hardlinks where the
    layer has them and nowhere else (equal files are not one inode)."""
    twin = {"mode": 0o640, "uid": 3}
    (base,), ref = run_chain(env, [[File("a", b"same", **twin), File("b", b"same", **twin),
                                    Dir("d"), File("d/c", b"same", **twin), Link("d/l", "a"),
                                    File("e", b"")]], views=False)
    mnt = env.mount(env.sn.view("v", base))
    copy = env.layers.snapshot(mnt).layer_id
    env.umount(mnt)
    dest = env.base / "copy-of-view"
    env.layers.checkout(copy, dest)
    assert_same(describe(dest), describe(ref), "snapshot of a mounted view")


def test_new_snapshot_root_is_0755_whatever_the_umask(env):
    """checkRootPermission: the root of a snapshot on no parent is 0755, under umask 0
    as under 077 (a mkdir would give 0777 or 0700)."""
    for i, mask in enumerate((0, 0o077, 0o022)):
        old = os.umask(mask)
        try:
            mounts = env.sn.prepare(f"root-{i}")
            view = env.sn.view(f"view-{i}")
        finally:
            os.umask(old)
        for m in (mounts, view):
            mnt = env.mount(m)
            assert stat.S_IMODE(os.stat(mnt).st_mode) == 0o755, oct(mask)
            env.umount(mnt)


def test_stat_inside_walk(env):
    """checkStatInWalk: stat of each snapshot while walking gives what walk gave."""
    names, _ = run_chain(env, [[File("f", b"f")], [File("g", b"g")]], views=False)
    base = names[-1]
    env.sn.prepare("a1", base, labels={"x": "1"})
    env.sn.view("v1", base)
    seen = []
    for info in env.sn.walk():
        assert env.sn.stat(info.key) == info
        seen.append(info.key)
    assert sorted(seen) == sorted(["layer-0", "layer-1", "a1", "v1"])


def test_same_key_twice(env):
    """checkSnapshotterPrepareView: a key names one snapshot of any kind; a second
    prepare or view of it is AlreadyExists, and the first is left as it was."""
    (base,), _ = run_chain(env, [[File("f", b"f")]], views=False)
    first = {"p": env.sn.prepare("p", base), "v": env.sn.view("v", base)}
    for key in ("p", "v", base):
        for make in (env.sn.prepare, env.sn.view):
            with pytest.raises(AlreadyExists) as info:
                make(key, base)
            assert repr(key) in str(info.value) and "already exists" in str(info.value)
    assert env.sn.stat("p").kind == Kind.ACTIVE and env.sn.stat("v").kind == Kind.VIEW
    assert env.sn.mounts("p") == first["p"] and env.sn.mounts("v") == first["v"]


def test_update_keeps_created(env):
    """checkUpdate: fresh snapshots of every kind have created == updated; update
    changes labels and `updated`, never `created`, kind, parent or layer."""
    before = time.time()
    env.sn.prepare("c1-a")
    env.sn.commit("c1", "c1-a")
    env.sn.prepare("c2-a", "c1")
    env.sn.commit("c2", "c2-a")
    for key, make in (("a1", env.sn.prepare), ("v1", env.sn.view)):
        make(key, "c2")
    env.sn.prepare("a2")
    env.sn.view("v2")
    after = time.time()
    kinds = {"c1": Kind.COMMITTED, "c2": Kind.COMMITTED, "a1": Kind.ACTIVE,
             "a2": Kind.ACTIVE, "v1": Kind.VIEW, "v2": Kind.VIEW}
    for key, kind in kinds.items():
        info = env.sn.stat(key)
        assert before <= info.created <= after, key
        assert info.created == info.updated and info.kind == kind, key
        time.sleep(0.01)
        updated = env.sn.update(key, {"l1": "v1", "l2": "v2"})
        for got in (updated, env.sn.stat(key)):
            assert got.created == info.created, key
            assert got.updated > info.created, key
            assert (got.kind, got.parent, got.parent_layer, got.layer) == \
                (info.kind, info.parent, info.parent_layer, info.layer), key
            assert got.labels == {**info.labels, "l1": "v1", "l2": "v2"}, key
        env.sn.update(key, {"l1": ""})
        assert env.sn.stat(key).labels == {**info.labels, "l2": "v2"}, key
        assert env.sn.stat(key).created == info.created, key


def test_128_layers_against_a_flat_copy(env):
    """check128LayersMount: 128 layers, each mounted on the last and compared with a
    flattened reference directory before and after its changes, then a view of the
    top compared with it."""
    flat = env.reference()
    first = [Dir(""), File("bottom", b"way at the bottom\n", mode=0o777),
             File("overwriteme", b"FIRST!\n", mode=0o777), Dir("addhere"), Dir("onlyme"),
             File("onlyme/bottom", b"bye!\n", mode=0o777)]
    parent = None
    for i in range(128):
        changes = first if i == 0 else [
            File("overwriteme", f"{i} WAS HERE!\n".encode(), mode=0o777),
            File(f"addhere/file-{i}", b"same\n", mode=0o755), Remove("onlyme"),
            Dir("onlyme"), File(f"onlyme/file-{i}", b"only me!\n", mode=0o777)]
        mnt = env.mount(env.sn.prepare(f"prepare-{i}", parent))
        if i:
            assert_same(describe(mnt), describe(flat), f"layer {i} before its changes")
        apply_changes(mnt, changes)
        apply_changes(flat, changes)
        assert_same(describe(mnt), describe(flat), f"layer {i} after its changes")
        env.umount(mnt)
        env.sn.commit(f"committed-{i}", f"prepare-{i}")
        parent = f"committed-{i}"
    assert len(env.layers.chain(env.layer(parent))) == 128
    check_view(env, parent, describe(flat))


def test_refusals_say_what_was_refused(env):
    """Each refusal has its kind (NotFound, AlreadyExists, FailedPrecondition,
    InvalidArgument) and a message naming what was refused and why."""
    (base,), _ = run_chain(env, [[File("f", b"f")]], views=False)
    env.sn.prepare("child", base)
    env.sn.commit("kid", "child")
    env.sn.prepare("act", base)
    env.sn.view("vw", base)

    def refused(kind, call, *needles):
        with pytest.raises(kind) as info:
            call()
        for needle in needles:
            assert needle in str(info.value), (needle, str(info.value))

    refused(FailedPrecondition, lambda: env.sn.remove(base),
            f"cannot remove snapshot {base!r}", "parent of")
    refused(FailedPrecondition, lambda: env.sn.prepare("x", "act"), "'act'", "active",
            "committed")
    refused(FailedPrecondition, lambda: env.sn.commit("y", "vw"),
            "cannot commit snapshot 'vw'", "view")
    refused(FailedPrecondition, lambda: env.sn.commit("y", "kid"),
            "cannot commit snapshot 'kid'", "committed")
    refused(FailedPrecondition, lambda: env.sn.mounts("kid"), "'kid'", "committed")
    refused(AlreadyExists, lambda: env.sn.commit("kid", "act"), "'kid'", "already exists")
    refused(NotFound, lambda: env.sn.stat("nope"), "'nope'", "does not exist")
    refused(NotFound, lambda: env.sn.remove("nope"), "'nope'", "does not exist")
    refused(InvalidArgument, lambda: env.sn.prepare(""), "snapshot key")
    assert sorted(i.key for i in env.sn.walk()) == sorted([base, "kid", "act", "vw"])


def test_zero_zero_character_device(env, request):
    """A layer holding a 0/0 character device, which overlayfs would read as a
    whiteout: a driver either shows it as the device checkout makes, or refuses the
    layer naming the path; it never shows a different tree."""
    src = env.fresh("src")
    os.chmod(src, 0o755)
    (src / "keep").write_bytes(b"k")
    lower = env.layers.snapshot(src, tag="lower").layer_id
    os.unlink(src / "keep")
    try:
        os.mknod(src / "keep", stat.S_IFCHR | 0o600, os.makedev(0, 0))
        os.mknod(src / "dev00", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    except PermissionError as err:
        pytest.skip(f"cannot make a 0/0 character device here: {err}")
    top = env.layers.snapshot(src, lower, tag="top").layer_id
    env.layers.checkout(top, env.base / "co")
    expected = describe(env.base / "co")
    assert expected["keep"].kind == "char" and expected["dev00"].data == (0, 0)
    for make in (env.sn.view, env.sn.prepare):
        key = f"{make.__name__}-top"
        try:
            mounts = make(key, "top")
        except PylayersError as err:
            assert env.breaks_hardlinks, f"{env.driver} refused: {err}"  # overlay only
            msg = str(err)
            assert "/dev00" in msg or "/keep" in msg, msg
            assert "character device 0/0" in msg and "whiteout" in msg, msg
            assert "\n" not in msg
            with pytest.raises(NotFound):
                env.sn.stat(key)  # nothing left behind
            continue
        mnt = env.mount(mounts)
        assert_same(describe(mnt), expected, f"{make.__name__} of a 0/0 device")
        env.umount(mnt)


def test_remove_rules(env):
    (base,), _ = run_chain(env, [[File("a", b"a")]], views=False)
    mnt = env.mount(env.sn.prepare("child", base))
    File("b", b"b").apply(mnt)
    env.umount(mnt)
    env.sn.commit("child-committed", "child")
    with pytest.raises(FailedPrecondition):
        env.sn.remove(base)  # the parent of child-committed
    assert env.sn.stat(base).kind == Kind.COMMITTED
    # only committed snapshots can be parents
    env.sn.prepare("active", base)
    with pytest.raises(FailedPrecondition):
        env.sn.prepare("on-active", "active")
    with pytest.raises(FailedPrecondition):
        env.sn.view("view-on-active", "active")
    with pytest.raises(NotFound):
        env.sn.stat("on-active")
    # keys are unique across kinds
    for make in (env.sn.prepare, env.sn.view):
        for key in ("active", base):
            with pytest.raises(AlreadyExists):
                make(key, base)
    with pytest.raises(AlreadyExists):
        env.sn.commit(base, "active")
    with pytest.raises(FailedPrecondition):
        env.sn.commit("again", "child-committed")  # not active
    with pytest.raises(NotFound):
        env.sn.remove("no-such-key")
    with pytest.raises(NotFound):
        env.sn.stat("no-such-key")
    # remove an active snapshot, then reuse its key: a fresh snapshot of the parent
    sdir = env.sn.root / env.sn.stat("active").dir_id
    assert sdir.exists()
    mnt = env.mount(env.sn.mounts("active"))
    File("scratch", b"gone with the snapshot").apply(mnt)
    env.umount(mnt)
    env.sn.remove("active")
    assert not sdir.exists()
    mnt = env.mount(env.sn.prepare("active", base))
    assert sorted(os.listdir(mnt)) == ["a"]
    env.umount(mnt)
    env.sn.remove("active")
    # remove the child first, then the parent goes, and its key can be used again
    env.sn.remove("child-committed")
    env.sn.remove(base)
    with pytest.raises(NotFound):
        env.sn.stat(base)
    mnt = env.mount(env.sn.prepare(base))
    assert os.listdir(mnt) == []
    env.umount(mnt)
    assert [i.key for i in env.sn.walk()] == [base]


def test_bad_keys_and_parents(env):
    """Keys the index cannot hold are refused up front, names that cannot exist are not
    found, and an empty parent is a bad reference: each a pylayers error, not LMDB's."""
    (base,), _ = run_chain(env, [[File("f", b"f")]], views=False)
    env.sn.prepare("active", base)
    too_long = "k" * 600
    for bad in ("", too_long, "é" * 300, "nul\x00key"):
        for make in (env.sn.prepare, env.sn.view):
            with pytest.raises(InvalidArgument):
                make(bad, base)
        with pytest.raises(InvalidArgument):
            env.sn.commit(bad, "active")
        for look in (env.sn.stat, env.sn.remove, env.sn.usage, env.sn.mounts):
            with pytest.raises(NotFound):
                look(bad)
        with pytest.raises((InvalidArgument, NotFound)):
            env.sn.prepare("child", bad)
    layers_before = set(env.layers.all_ids())
    for bad_tag in ("with space", "a/", "a//b", "", "-x", "f" * 64):
        with pytest.raises(InvalidArgument):
            env.sn.commit("tagged", "active", tag=bad_tag)
    assert set(env.layers.all_ids()) == layers_before and env.layers.tags() == {}
    assert env.sn.stat("active").kind == Kind.ACTIVE  # the failed commits left it be
    assert sorted(i.key for i in env.sn.walk()) == ["active", base]
    assert list(env.sn.walk(parent="")) == []


def test_write_to_hardlinked_lower_file(env):
    """A write through one name of a hardlink from a lower layer. A file system shows
    it on every name; overlayfs without index=on copies up only the name written (as
    Docker's overlay2 does), so the other names keep the old data. Either way the commit
    must hold what the mount showed, and a valid tree."""
    (base,), ref = run_chain(env, [[File("f", b"old"), Link("g", "f"), File("h", b"h")]],
                             views=False)
    mnt = env.mount(env.sn.prepare("k", base))
    changes = [Write("f", 0, b"NEW"), Chmod("h", 0o600)]
    apply_changes(mnt, changes)
    apply_changes(ref, changes)
    shown = describe(mnt, links=False)
    env.umount(mnt)
    env.sn.commit("c", "k")
    got = describe(env.checkout("c"), links=False)
    assert_same(got, shown, "checkout after a write to a hardlinked file")
    assert got["f"].data == describe(ref)["f"].data
    if not env.breaks_hardlinks:  # a plain directory: the write shows on both names
        assert_same(describe(env.checkout("c")), describe(ref), "checkout")


@pytest.mark.parametrize("change", ["remove", "replace", "rename", "chmod"])
def test_hardlink_target_changed_in_upper(env, change):
    """Removing, replacing, renaming or chmod-ing the first name of a hardlinked file
    from a lower layer: the names left alone stay one valid, linked file with the old
    content, in the commit as in the mount."""
    first = [Dir("d"), File("a", b"linked", uid=9), Link("b", "a"), Link("c", "a"),
             Link("d/e", "a")]
    last = {"remove": [Remove("a")], "replace": [Remove("a"), File("a", b"other")],
            "rename": [Rename("a", "z")], "chmod": [Chmod("a", 0o600)]}[change]
    (base,), ref = run_chain(env, [first], views=False)
    mnt = env.mount(env.sn.prepare("k", base))
    apply_changes(mnt, last)
    apply_changes(ref, last)
    shown = describe(mnt, links=False)
    env.umount(mnt)
    env.sn.commit("c", "k")
    got = describe(env.checkout("c"))
    assert_same({p: n._replace(links=()) for p, n in got.items()}, shown, "checkout")
    expected = describe(ref)
    if not env.breaks_hardlinks:
        assert_same(got, expected, "checkout")
    else:  # overlayfs (index=off) copies up only the name changed, as Docker's does
        assert got["b"].links == ("b", "c", "d/e")
        for name in ("b", "c", "d/e"):  # the names left alone: the old file, unchanged
            assert (got[name].data, got[name].mode, got[name].uid) == \
                (describe(env.checkout(base))["b"].data, 0o644, 9), name
        if change == "chmod":  # the copied-up name alone has the new mode, same data
            assert (got["a"].links, got["a"].mode, got["a"].data) == ((), 0o600,
                                                                     got["b"].data)
            assert expected["b"].mode == 0o600  # where a file system changes every name
        else:
            assert got["b"].data == expected["b"].data
    check_view(env, "c", got)


# --- usage ----------------------------------------------------------------------------

def test_usage(env):
    rnd = os.urandom(4 * MIB + 150 * 1024)
    big, a, b = rnd[:4 * MIB], rnd[4 * MIB:4 * MIB + 100 * 1024], rnd[4 * MIB + 100 * 1024:]
    mnt = env.mount(env.sn.prepare("u1"))
    apply_changes(mnt, [File("big", big), File("a", a), Dir("d"), File("d/b", b),
                        Symlink("s", "a")])
    u = env.sn.usage("u1")
    assert u.size == len(big) + len(a) + len(b)
    assert u.new_bytes == u.size  # random data: nothing to dedup
    assert u.inodes >= 5
    env.umount(mnt)
    layer = env.sn.commit("c1", "u1")
    u = env.sn.usage("c1")
    assert u.size == len(big) + len(a) + len(b)
    assert u.inodes == len(env.layers.entries(layer))
    assert u.size <= u.new_bytes < u.size + 64 * 1024  # the file data and a manifest

    # copied up (chmod) and unchanged: the file is the layer's own, its data is not new
    mnt = env.mount(env.sn.prepare("u2", "c1"))
    Chmod("big", 0o600).apply(mnt)
    with open(mnt / "a", "r+b"):  # opened for writing, nothing written
        pass
    u = env.sn.usage("u2")
    assert u.size == len(big)
    assert u.new_bytes == 0
    env.umount(mnt)
    env.sn.commit("c2", "u2")
    assert env.sn.usage("c2").size == len(big)
    assert env.sn.usage("c2").new_bytes < 16 * 1024  # the manifest only

    # one byte changed in the middle: a few chunks, not the file
    mnt = env.mount(env.sn.prepare("u3", "c2"))
    # a byte the file does not hold there (a fixed one is already there once in 256 runs)
    Write("big", 2 * MIB, bytes([big[2 * MIB] ^ 0xFF])).apply(mnt)
    u = env.sn.usage("u3")
    assert u.size == len(big)
    assert 0 < u.new_bytes <= 3 * env.store.config.chunker.max_size
    env.umount(mnt)
    env.sn.commit("c3", "u3")
    assert 0 < env.sn.usage("c3").new_bytes < 1 * MIB
    # nothing changed at all, and views own nothing
    env.sn.prepare("u4", "c3")
    env.sn.view("v4", "c3")
    for key in ("u4", "v4"):
        assert (env.sn.usage(key).size, env.sn.usage(key).new_bytes) == (0, 0)


def test_big_file_one_byte_change_costs_chunks(env):
    """A 1 GB file copied up and changed by one byte costs a few chunks, not 1 GB (here
    64 MiB): the copy-up rewrites the file, the commit re-chunks it."""
    size = 64 * MIB
    data = bytearray(os.urandom(size))
    mnt = env.mount(env.sn.prepare("k1"))
    File("big", bytes(data)).apply(mnt)
    env.umount(mnt)
    first = env.sn.commit("c1", "k1")
    assert env.layers.record(first).new_bytes >= size
    mnt = env.mount(env.sn.prepare("k2", "c1"))
    at = size // 2 + 12345
    data[at] ^= 0xFF  # a change whatever the random byte was
    Write("big", at, bytes([data[at]])).apply(mnt)
    assert env.sn.usage("k2").new_bytes < MIB
    env.umount(mnt)
    second = env.sn.commit("c2", "k2")
    assert env.layers.record(second).new_bytes < MIB
    assert env.sn.usage("c2").new_bytes < MIB
    out = env.checkout("c2")
    assert _hash(out / "big") == blake3.blake3(bytes(data)).hexdigest()


# --- long chains, concurrency ----------------------------------------------------------

def test_chain_of_50_layers(env):
    """50 layers, each changing a file (and now and then removing, renaming or making
    something): the last one's checkout, and a view of it, equal a flattened copy."""
    steps = []
    for i in range(50):
        step = [File(f"f{i % 7}", f"layer {i}\n".encode() * (i + 1), mtime=T0 + i)]
        if i % 10 == 3:
            step += [Dir(f"dir{i}"), File(f"dir{i}/inner", b"in")]
        if i % 10 == 8:
            step += [Remove(f"dir{i - 5}"), Rename(f"f{(i + 1) % 7}", f"moved{i}")]
        steps.append(step)
    (parent,), ref = run_chain(env, steps[:1], prefix="c0", views=False)
    for i in range(1, 49):
        parent = _quick_layer(env, steps[i], parent, ref, i)
    (parent,), ref = run_chain(env, steps[49:], parent=parent, ref=ref, prefix="c49",
                               views=False)
    assert len(env.layers.chain(env.layer(parent))) == 50
    check_view(env, parent, describe(ref))
    mnt = env.mount(env.sn.prepare("on-top", parent))
    assert_same(describe(mnt), describe(ref), "50-layer mount")
    env.umount(mnt)


def _quick_layer(env: Env, step: list, parent: str, ref: Path, i: int) -> str:
    mnt = env.mount(env.sn.prepare(f"q{i}", parent))
    apply_changes(mnt, step)
    apply_changes(ref, step)
    env.umount(mnt)
    env.sn.commit(f"c{i}", f"q{i}")
    return f"c{i}"


def _base_with_files(env: Env, name: str, n: int = 60) -> Path:
    steps = [[Dir("d"), *(File(f"d/f{i:03}", os.urandom(3000 + i)) for i in range(n)),
              File("same1", b"identical"), File("same2", b"identical")]]
    (_,), ref = run_chain(env, steps, prefix=name, views=False)
    return ref


def test_concurrent_prepares_threads(env):
    """Threads of one process prepare snapshots on one parent at once, its lower
    directories and cached files not made yet (several rounds: the races are short)."""
    ref = _base_with_files(env, "base")
    n = 8
    errors: list[BaseException] = []
    results: dict[str, list] = {}

    def worker(barrier: threading.Barrier, key: str) -> None:
        try:
            barrier.wait()
            results[key] = env.sn.prepare(key, "base-0")
        except BaseException as e:  # noqa: B036 - reported below
            errors.append(e)

    for r in range(10):
        env.drop_caches()
        barrier = threading.Barrier(n)
        threads = [threading.Thread(target=worker, args=(barrier, f"t{r}-{i}"))
                   for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
    expected = describe(ref)
    for key, mounts in sorted(results.items())[-n:]:
        mnt = env.mount(mounts)
        assert_same(describe(mnt), expected, f"snapshot {key}")
        env.umount(mnt)
    assert sorted(i.key for i in env.sn.walk(kind=Kind.ACTIVE)) == sorted(results)

    # the same key from several threads at once: exactly one wins
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def same_key() -> None:
        barrier.wait()
        try:
            env.sn.prepare("contended", "base-0")
            outcomes.append("ok")
        except AlreadyExists:
            outcomes.append("exists")

    threads = [threading.Thread(target=same_key) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["exists"] * 5 + ["ok"]
    dirs = {i.dir_id for i in env.sn.walk(kind=Kind.ACTIVE)}
    assert {p.name for p in env.sn.root.iterdir()} == dirs  # no directory left behind


# Scripts get the driver as module:class (Env.driver_path) and make their Snapshotter
# with snapshotter(layers, driver).
SCRIPT_PRELUDE = textwrap.dedent("""
    import importlib
    from pylayers.mounts import DRIVERS, Snapshotter

    def snapshotter(layers, path):
        module, _, name = path.partition(":")
        cls = getattr(importlib.import_module(module), name)
        return Snapshotter(layers, cls.name, drivers={**DRIVERS, cls.name: cls})
""")

PREPARE_SCRIPT = SCRIPT_PRELUDE + textwrap.dedent("""
    import sys, time
    from pylayers import Layers, Store
    store, driver, key, parent, start = sys.argv[1:6]
    with Store.open(store) as s:
        snaps = snapshotter(Layers(s), driver)
        time.sleep(max(0.0, float(start) - time.time()))
        snaps.prepare(key, parent)
""")


def test_concurrent_prepares_processes(env):
    ref = _base_with_files(env, "pbase")
    env.drop_caches()
    start = time.time() + 1.5
    procs = [subprocess.Popen([sys.executable, "-c", PREPARE_SCRIPT, str(env.store_path),
                               env.driver_path, f"p{i}", "pbase-0", str(start)],
                              cwd=env.base, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    expected = describe(ref)
    for i in range(4):
        mnt = env.mount(env.sn.mounts(f"p{i}"))
        assert_same(describe(mnt), expected, f"snapshot p{i}")
        env.umount(mnt)


# --- metadata, persistence, crashes ------------------------------------------------------

def test_stat_update_walk(env):
    env.sn.prepare("a1", labels={"team": "x", "pylayers.gc.root": "1"})
    mnt = env.mount(env.sn.mounts("a1"))
    File("f", b"f").apply(mnt)
    env.umount(mnt)
    env.sn.commit("base", "a1", labels={"committed": "yes"})
    info = env.sn.stat("base")
    assert info.kind == Kind.COMMITTED and info.parent is None
    assert info.labels == {"team": "x", "pylayers.gc.root": "1", "committed": "yes"}
    assert info.driver == env.driver
    env.sn.prepare("act", "base", labels={"team": "y"})
    env.sn.view("vw", "base", labels={"team": "x", "kind": "view"})
    env.sn.prepare("lonely")
    info = env.sn.stat("act")
    assert (info.kind, info.parent, info.labels) == (Kind.ACTIVE, "base", {"team": "y"})
    assert info.created <= info.updated

    time.sleep(0.01)
    updated = env.sn.update("act", {"team": "z", "new": "1"})
    assert updated.labels == {"team": "z", "new": "1"}
    assert updated.updated > updated.created
    assert env.sn.stat("act").labels == {"team": "z", "new": "1"}
    env.sn.update("act", {"new": ""})  # an empty value deletes
    assert env.sn.stat("act").labels == {"team": "z"}
    with pytest.raises(NotFound):
        env.sn.update("missing", {"a": "b"})

    def keys(**filters) -> list[str]:
        return sorted(i.key for i in env.sn.walk(**filters))

    assert keys() == ["act", "base", "lonely", "vw"]
    assert keys(kind=Kind.ACTIVE) == ["act", "lonely"]
    assert keys(kind=Kind.VIEW) == ["vw"]
    assert keys(kind=Kind.COMMITTED) == ["base"]
    assert keys(parent="base") == ["act", "vw"]
    assert keys(labels={"team": "x"}) == ["base", "vw"]
    assert keys(labels={"team": "*"}) == ["act", "base", "vw"]
    assert keys(labels={"team": "x", "kind": "view"}) == ["vw"]
    assert keys(labels={"nope": "*"}) == []
    assert keys(kind=Kind.VIEW, parent="base", labels={"team": "x"}) == ["vw"]


def test_state_survives_reopening(env):
    (base,), ref = run_chain(env, [[File("f", b"1"), Dir("d")]], views=False)
    of_base = describe(ref)
    mnt = env.mount(env.sn.prepare("act", base, labels={"l": "1"}))
    File("d/new", b"new").apply(mnt)
    File("d/new", b"new").apply(ref)
    env.umount(mnt)
    env.sn.view("vw", base)
    before = {i.key: i for i in env.sn.walk()}
    env.store.close()
    env.drop_caches()  # caches: rebuilt on the next mount
    env.open()  # a new Store, Layers and Snapshotter
    assert {i.key: i for i in env.sn.walk()} == before
    mnt = env.mount(env.sn.mounts("act"))
    assert (mnt / "d" / "new").read_bytes() == b"new"
    env.umount(mnt)
    env.sn.commit("after", "act")
    assert_same(describe(env.checkout("after")), describe(ref), "commit after reopening")
    assert env.sn.stat("after").labels == {"l": "1"}
    mnt = env.mount(env.sn.mounts("vw"))
    assert_same(describe(mnt), of_base, "view after reopening")
    env.umount(mnt)
    env.sn.remove("vw")
    assert sorted(i.key for i in env.sn.walk()) == sorted([base, "after"])


CRASH_SCRIPT = SCRIPT_PRELUDE + textwrap.dedent("""
    import subprocess, sys, time
    from pylayers import Layers, Store
    store, driver, key, parent, target, phase = sys.argv[1:7]
    s = Store.open(store)
    snaps = snapshotter(Layers(s), driver)
    for m in snaps.prepare(key, parent):
        subprocess.run(m.command(target), check=True)
    with open(target + "/written-before-crash", "wb") as f:
        f.write(b"still here")
    if phase == "commit":
        subprocess.run(["umount", target], check=True)
        # die after the layer is stored but before the snapshot records change
        real_driver = snaps._driver
        def driver(name):
            d = real_driver(name)
            real_commit = d.commit
            def commit(*a, **k):
                import os, signal
                real_commit(*a, **k)
                os.kill(os.getpid(), signal.SIGKILL)
            d.commit = commit
            return d
        snaps._driver = driver
        snaps.commit("never-recorded", key)
    print("ready", flush=True)
    time.sleep(60)
""")


def _crash(env: Env, key: str, parent: str, phase: str) -> Path:
    target = env.fresh("crash-mnt")
    env.mounted.append(target)  # the child mounts it: unmount it in teardown if need be
    proc = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, str(env.store_path),
                             env.driver_path, key, parent, str(target), phase],
                            cwd=env.base, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        if phase == "prepare":
            line = proc.stdout.readline()
            assert line.strip() == "ready", proc.stderr.read()
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    if phase == "commit":
        env.mounted.remove(target)  # it unmounted before dying
    return target


def test_crash_between_prepare_and_commit(env):
    (base,), ref = run_chain(env, [[File("f", b"base")]], views=False)
    # killed while its snapshot is mounted: commit it later
    target = _crash(env, "doomed", base, "prepare")
    info = env.sn.stat("doomed")
    assert info.kind == Kind.ACTIVE
    env.umount(target)
    mnt = env.mount(env.sn.mounts("doomed"))
    assert (mnt / "written-before-crash").read_bytes() == b"still here"
    env.umount(mnt)
    env.sn.commit("rescued", "doomed")
    File("written-before-crash", b"still here").apply(ref)
    out = describe(env.checkout("rescued"), links=False)
    assert out["written-before-crash"].data == describe(ref)["written-before-crash"].data
    # killed the same way: remove it later, and reuse the key
    target = _crash(env, "doomed2", base, "prepare")
    env.umount(target)
    sdir = env.sn.root / env.sn.stat("doomed2").dir_id
    env.sn.remove("doomed2")
    assert not sdir.exists()
    env.sn.prepare("doomed2", base)
    env.sn.remove("doomed2")


PREPARE_CRASH_SCRIPT = SCRIPT_PRELUDE + textwrap.dedent("""
    import os, signal, sys
    import pylayers.layers.checkout as checkout
    import pylayers.layers.materialise as materialise
    import pylayers.mounts.overlay.lower as lower
    from pylayers import Layers, Store
    store, driver, key, parent = sys.argv[1:5]
    calls = []

    def dying(real):  # die in the middle of filling the snapshot (or its lowers)
        def wrapper(*args):
            calls.append(1)
            if len(calls) == 5:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args)
        return wrapper

    lower.write_file = dying(materialise.write_file)  # lower dirs
    checkout.write_file_from = dying(checkout.write_file_from)  # a copy's checkout
    checkout.write_file = dying(checkout.write_file)  # its one-call path for small files
    snapshotter(Layers(Store.open(store)), driver).prepare(key, parent)
""")


def test_crash_inside_prepare(env):
    """Killed while the snapshot's directory (or its parent's lower directories) is
    being filled: the record is there, remove cleans it up, and the next prepare on
    the same parent is whole."""
    (base,), ref = run_chain(env, [[File(f"f{i}", os.urandom(100 + i)) for i in range(20)]],
                             views=False)
    env.drop_caches()
    proc = subprocess.run([sys.executable, "-c", PREPARE_CRASH_SCRIPT, str(env.store_path),
                           env.driver_path, "torn", base], cwd=env.base, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert env.sn.stat("torn").kind == Kind.ACTIVE
    env.sn.remove("torn")
    assert list(env.sn.root.iterdir()) == []
    mnt = env.mount(env.sn.prepare("torn", base))
    assert_same(describe(mnt), describe(ref), "prepare after a crash")
    env.umount(mnt)


def test_layers_are_driver_neutral(env):
    """A layer committed through this driver is the parent of a snapshot of every
    other registered driver that works here, and the other way round."""
    others = {n: cls.unavailable() for n, cls in env.drivers.items() if n != env.driver}
    if not others or all(others.values()):
        pytest.skip(f"no other driver works here: {others}")
    for other in (n for n, reason in others.items() if reason is None):
        (base,), ref = run_chain(env, SCENARIOS["type_changes"][:1], views=False,
                                 prefix=f"base-{other}")
        mnt = env.mount(env.sn.prepare(f"k-{other}", base, driver=other))
        assert env.sn.stat(f"k-{other}").driver == other
        assert_same(describe(mnt), describe(ref), f"{other} on {base}")
        changes = SCENARIOS["type_changes"][1]
        apply_changes(mnt, changes)
        apply_changes(ref, changes)
        env.umount(mnt)
        env.reopen()  # the snapshot's own driver is used, not the Snapshotter's default
        env.sn.commit(f"c-{other}", f"k-{other}")
        assert_same(describe(env.checkout(f"c-{other}")), describe(ref), "checkout")
        check_view(env, f"c-{other}", describe(ref))


def test_crash_inside_commit(env):
    """Killed after the layer is stored but before the snapshot records change: the
    active snapshot is still there, and committing it again gives the same layer."""
    (base,), _ = run_chain(env, [[File("f", b"base")]], views=False)
    _crash(env, "half", base, "commit")
    assert env.sn.stat("half").kind == Kind.ACTIVE
    with pytest.raises(NotFound):
        env.sn.stat("never-recorded")
    before = set(env.layers.all_ids())
    layer = env.sn.commit("done", "half")
    assert layer in before  # stored by the killed process
    assert (env.checkout("done") / "written-before-crash").read_bytes() == b"still here"


# --- the factory --------------------------------------------------------------------

def snapshotter_suite(driver: type[Driver], *, breaks_hardlinks: bool = False,
                      probe=None) -> dict[str, object]:
    """The suite for one driver class, as names to put in a test module's globals:
    every test above and the `env` fixture they take (a store, a Snapshotter whose
    default driver is `driver`, and the mounts made). `breaks_hardlinks`: the
    driver's copy-ups break a lower file's hardlinks (overlayfs with index=off).
    `probe(base) -> str | None`: the driver's own check that its mounts work here,
    beyond its `unavailable()` and a bind mount (a scratch directory is given)."""

    @pytest.fixture(scope="module")
    def mount_support(tmp_path_factory) -> str | None:
        reason = driver.unavailable()
        if reason is None:
            reason = probe_bind_mount(tmp_path_factory.mktemp("bind-probe"))
        if reason is None and probe is not None:
            reason = probe(tmp_path_factory.mktemp("driver-probe"))
        return reason

    @pytest.fixture
    def env(tmp_path, mount_support):
        if mount_support is not None:
            pytest.skip(f"{driver.name} driver: {mount_support}")
        e = Env(tmp_path, driver, breaks_hardlinks)
        try:
            yield e
        finally:
            e.cleanup()

    tests = {name: obj for name, obj in globals().items()
             if name.startswith("test_") and callable(obj)}
    return {**tests, "env": env, "mount_support": mount_support}
