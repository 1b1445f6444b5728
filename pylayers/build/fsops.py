"""File operations of build steps inside a mounted root file system, never leaving it.

The root is a mount point on the host: a symlink in the image (`/etc -> /host/etc`)
must be resolved inside the root, as the image's own processes would see it, never on
the host. `resolve` does that (as securejoin does), and every write goes through a
directory resolved so.

Also here: COPY's copier (context or another stage's tree into the root), ADD's tar
unpacker, user and group lookup in the image's /etc/passwd and /etc/group, and the
mtime clamp applied to each step's changes before commit.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from collections.abc import Callable, Mapping
from pathlib import Path

from ..errors import InvalidArgument, NotFound
from ..layers.scan import read_xattrs

MAX_LINKS = 40


def resolve(root: str, path: str, *, follow_last: bool = True) -> str:
    """The host path of the image path `path` under `root`, symlinks resolved inside the
    root (`..` stops at it). Components that do not exist are appended as they are."""
    parts = [p for p in path.split("/") if p and p != "."]
    done: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        host = os.path.join(root, *done, part)
        try:
            st = os.lstat(host)
        except FileNotFoundError:
            done.append(part)
            done.extend(p for p in parts if p not in ("", "."))
            return _join(root, _clean(done))
        if stat.S_ISLNK(st.st_mode) and (parts or follow_last):
            links += 1
            if links > MAX_LINKS:
                raise InvalidArgument(f"{path}: too many levels of symbolic links")
            target = os.readlink(host)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p and p != "."] + parts
            continue
        done.append(part)
    return _join(root, done)


def _clean(parts: list[str]) -> list[str]:
    out: list[str] = []
    for p in parts:
        if p == "..":
            if out:
                out.pop()
        else:
            out.append(p)
    return out


def _join(root: str, parts: list[str]) -> str:
    return os.path.join(root, *parts) if parts else root


def makedirs(root: str, path: str, uid: int = 0, gid: int = 0, mode: int = 0o755) -> str:
    """mkdir -p of the image path `path` (new directories owned by uid:gid); its host
    path."""
    parts = [p for p in path.split("/") if p and p != "."]
    cur = "/"
    for p in parts:
        cur = os.path.join(cur, p)
        host = resolve(root, cur)
        try:
            os.mkdir(host, mode)
        except FileExistsError:
            if not os.path.isdir(host):
                raise InvalidArgument(f"{cur} exists in the image and is not a directory") \
                    from None
            continue
        os.chmod(host, mode)
        os.lchown(host, uid, gid)
    return resolve(root, path)


# -- users and groups ----------------------------------------------------------------------


def _table(root: str, name: str) -> list[list[str]]:
    try:
        with open(resolve(root, f"/etc/{name}"), encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n").split(":") for line in f if ":" in line]
    except OSError:
        return []


def lookup_user(root: str, spec: str) -> tuple[int, int, tuple[int, ...], str]:
    """USER's `user[:group]` in the image: (uid, gid, supplementary gids, home)."""
    user, _, group = spec.partition(":")
    passwd = _table(root, "passwd")
    groups = _table(root, "group")
    home = "/"
    if user.isdigit():
        uid = int(user)
        row = next((r for r in passwd if len(r) > 3 and r[2] == user), None)
        gid = int(row[3]) if row and row[3].isdigit() else 0
        name = row[0] if row else None
        home = row[5] if row and len(row) > 5 else ("/root" if uid == 0 else "/")
    else:
        row = next((r for r in passwd if r[0] == user and len(r) > 3), None)
        if row is None and user == "root":
            row = ["root", "x", "0", "0", "", "/root"]
        if row is None or not row[2].isdigit():
            raise NotFound(f"user {user!r}: no such user in the image's /etc/passwd")
        uid, gid, name = int(row[2]), int(row[3]) if row[3].isdigit() else 0, user
        home = row[5] if len(row) > 5 else "/"
    if group:
        gid = lookup_group(groups, group)
    extra = tuple(sorted({int(r[2]) for r in groups if len(r) > 3 and r[2].isdigit()
                          and name is not None and name in r[3].split(",")} | {gid}))
    return uid, gid, extra, home


def lookup_group(groups: list[list[str]], group: str) -> int:
    if group.isdigit():
        return int(group)
    row = next((r for r in groups if r[0] == group and len(r) > 2), None)
    if row is None or not row[2].isdigit():
        raise NotFound(f"group {group!r}: no such group in the image's /etc/group")
    return int(row[2])


def chown_ids(root: str, spec: str) -> tuple[int, int]:
    """COPY --chown's `user[:group]`: a user alone gives its primary group (names are
    looked up in the image)."""
    user, sep, group = spec.partition(":")
    if user.isdigit() and (not sep or group.isdigit()):
        return int(user), int(group) if sep else int(user)
    uid, gid, _groups, _home = lookup_user(root, user)
    if sep:
        gid = lookup_group(_table(root, "group"), group)
    return uid, gid


# -- copying -------------------------------------------------------------------------------


class Copier:
    """Copies files into the root as COPY does: owner root (or --chown), mode kept (or
    --chmod), xattrs kept, mtime `epoch_ns`; symlinks copied as links."""

    def __init__(self, root: str, uid: int, gid: int, chmod: int | None, epoch_ns: int,
                 skip: Callable[[str], bool] | None = None) -> None:
        self.root, self.uid, self.gid = root, uid, gid
        self.chmod, self.epoch_ns, self.skip = chmod, epoch_ns, skip
        self.files = 0

    def copy(self, src: Path, dest: str) -> None:
        """Copy the host path `src` (a file, a link, or a directory's contents) to the
        image path `dest`."""
        st = os.stat(src)
        if stat.S_ISDIR(st.st_mode):
            makedirs(self.root, dest, self.uid, self.gid)
            self._dir_meta(src, resolve(self.root, dest), st)
            self._tree(src, dest)
        else:
            parent = os.path.dirname(dest.rstrip("/")) or "/"
            makedirs(self.root, parent, self.uid, self.gid)
            self._one(str(src), dest, os.stat(src))

    def write(self, data: bytes, dest: str, mode: int = 0o644) -> None:
        """Create the file `dest` (an image path) holding `data`: COPY of a
        here-document, ADD of a download. Its mode is `mode` unless --chmod."""
        parent = os.path.dirname(dest.rstrip("/")) or "/"
        makedirs(self.root, parent, self.uid, self.gid)
        host = resolve(self.root, dest, follow_last=False)
        if os.path.isdir(host) and not os.path.islink(host):
            _remove(host)
        elif os.path.lexists(host):
            os.unlink(host)
        fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.lchown(host, self.uid, self.gid)
        os.chmod(host, self.chmod if self.chmod is not None else mode)
        os.utime(host, ns=(self.epoch_ns, self.epoch_ns), follow_symlinks=False)
        self.files += 1

    def _tree(self, src: Path, dest: str) -> None:
        with os.scandir(src) as it:
            children = sorted(it, key=lambda d: d.name)
        for d in children:
            if self.skip is not None and self.skip(d.path):
                continue
            st = d.stat(follow_symlinks=False)
            target = dest.rstrip("/") + "/" + d.name
            if stat.S_ISDIR(st.st_mode):
                host = resolve(self.root, target, follow_last=False)
                if os.path.lexists(host) and not os.path.isdir(host):
                    _remove(host)
                if not os.path.lexists(host):
                    os.mkdir(host, 0o700)
                self._dir_meta(Path(d.path), host, st)
                self._tree(Path(d.path), target)
            else:
                self._one(d.path, target, st)

    def _mode(self, st: os.stat_result) -> int:
        return self.chmod if self.chmod is not None else stat.S_IMODE(st.st_mode)

    def _dir_meta(self, src: Path, host: str, st: os.stat_result) -> None:
        os.lchown(host, self.uid, self.gid)
        os.chmod(host, self._mode(st))
        _copy_xattrs(os.fsencode(src), os.fsencode(host))
        os.utime(host, ns=(self.epoch_ns, self.epoch_ns), follow_symlinks=False)

    def _one(self, src: str, dest: str, st: os.stat_result) -> None:
        host = resolve(self.root, dest, follow_last=False)
        if os.path.isdir(host) and not os.path.islink(host):
            _remove(host)
        elif os.path.lexists(host):
            os.unlink(host)
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            os.symlink(os.readlink(src), host)
        elif stat.S_ISREG(mode):
            fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                with open(src, "rb") as f:
                    while chunk := f.read(1 << 20):
                        os.write(fd, chunk)
            finally:
                os.close(fd)
        elif stat.S_ISFIFO(mode):
            os.mkfifo(host, 0o600)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            os.mknod(host, stat.S_IFMT(mode) | 0o600, st.st_rdev)
        else:
            return  # a socket: nothing to copy
        os.lchown(host, self.uid, self.gid)
        if not stat.S_ISLNK(mode):
            os.chmod(host, self._mode(st))
            _copy_xattrs(os.fsencode(src), os.fsencode(host))
        os.utime(host, ns=(self.epoch_ns, self.epoch_ns), follow_symlinks=False)
        self.files += 1


def _remove(host: str) -> None:
    import shutil

    if os.path.isdir(host) and not os.path.islink(host):
        shutil.rmtree(host)
    else:
        os.unlink(host)


def _copy_xattrs(src: bytes, dst: bytes) -> None:
    for name, value in read_xattrs(src):
        try:
            os.setxattr(dst, name, value, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EPERM):
                raise


# -- ADD: local tar archives -----------------------------------------------------------


def is_archive(path: Path) -> bool:
    try:
        return path.is_file() and tarfile.is_tarfile(path)
    except OSError:
        return False


def unpack(root: str, archive: Path, dest: str) -> int:
    """Unpack a local tar archive (plain, gzip, bzip2, xz) into the image directory
    `dest` as ADD does: owners, modes and mtimes from the archive. Members leading out
    of `dest` are refused. Returns the members unpacked."""
    base = makedirs(root, dest)
    count = 0
    with tarfile.open(archive) as tar:
        for m in tar:
            name = os.path.normpath("/" + m.name).lstrip("/")
            if not name or name == ".":
                continue
            if name.startswith(".."):
                raise InvalidArgument(f"ADD {archive.name}: member {m.name!r} leads out of "
                                      "the destination")
            image_path = dest.rstrip("/") + "/" + name
            parent = os.path.dirname(image_path)
            makedirs(root, parent)
            host = resolve(root, image_path, follow_last=False)
            if not os.path.realpath(os.path.dirname(host)).startswith(
                    os.path.realpath(base)):
                raise InvalidArgument(f"ADD {archive.name}: member {m.name!r} leads out of "
                                      "the destination through a symlink")
            if os.path.lexists(host) and not (m.isdir() and os.path.isdir(host)):
                _remove(host)
            if m.isdir():
                if not os.path.isdir(host):
                    os.mkdir(host, 0o700)
            elif m.isreg():
                src = tar.extractfile(m)
                assert src is not None
                fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                             0o600)
                try:
                    while chunk := src.read(1 << 20):
                        os.write(fd, chunk)
                finally:
                    os.close(fd)
            elif m.issym():
                os.symlink(m.linkname, host)
            elif m.islnk():
                link = os.path.normpath("/" + m.linkname).lstrip("/")
                if link.startswith(".."):
                    raise InvalidArgument(f"ADD {archive.name}: hardlink {m.name!r} leads "
                                          "out of the destination")
                os.link(resolve(root, dest.rstrip("/") + "/" + link, follow_last=False), host)
            elif m.isfifo():
                os.mkfifo(host, 0o600)
            elif m.ischr() or m.isblk():
                kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
                os.mknod(host, kind | 0o600, os.makedev(m.devmajor, m.devminor))
            else:
                continue
            if not m.islnk():
                os.lchown(host, m.uid, m.gid)
                if not m.issym():
                    os.chmod(host, m.mode & 0o7777)
                os.utime(host, ns=(int(m.mtime) * 10**9,) * 2, follow_symlinks=False)
            count += 1
    return count


# -- mtimes ----------------------------------------------------------------------------


def clamp_mtimes(top: str, before: Mapping[bytes, int], epoch_ns: int) -> int:
    """Set to `epoch_ns` the mtime of every entry under `top` (a snapshot's own
    directory) that the step changed (its mtime differs from `before`, the parent's
    mtimes by path) and that is later than `epoch_ns`. Returns how many it set."""
    count = 0

    def visit(host: bytes, rel: bytes) -> None:
        nonlocal count
        st = os.lstat(host)
        if st.st_mtime_ns > epoch_ns and before.get(rel) != st.st_mtime_ns:
            os.utime(host, ns=(epoch_ns, epoch_ns), follow_symlinks=False)
            count += 1
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(host) as it:
                names = [d.name for d in it]
            for n in names:
                visit(os.path.join(host, n), rel + b"/" + n if rel else n)

    root = os.fsencode(top)
    visit(root, b"")
    # the directories' own mtimes last: setting a child's mtime does not move them
    return count


def image_path(workdir: str, path: str) -> str:
    """`path` made absolute against `workdir`, normalised (a trailing `/` kept)."""
    full = path if path.startswith("/") else workdir.rstrip("/") + "/" + path
    norm = os.path.normpath(full)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    return norm + ("/" if path.endswith("/") and norm != "/" else "")
