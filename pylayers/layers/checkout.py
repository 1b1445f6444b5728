"""Writing a tree out to a directory with all its metadata.

Order matters: data, then owner (chown clears setuid bits and file capabilities),
then mode, then xattrs, then times; directories get their metadata last, deepest
first, so read-only directories can still be filled and their mtimes stay put.
All-zero chunks become holes, so sparse files stay sparse.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

from ..errors import InvalidArgument, PylayersError
from .manifest import BLK, CHR, DIR, FIFO, HARDLINK, REG, SYMLINK, Entry
from .tree import validate_tree


def prepare_destination(dest: Path) -> None:
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise InvalidArgument(f"{dest} exists and is not a directory")
    if dest.exists():
        if any(dest.iterdir()):
            raise InvalidArgument(f"{dest} is not empty")
    else:
        try:
            dest.mkdir(parents=True)
        except OSError as e:
            raise InvalidArgument(f"cannot create {dest}: {e.strerror}") from None


def _set_xattrs(path: bytes, e: Entry) -> None:
    for name, value in e.xattrs:
        try:
            os.setxattr(path, name, value, follow_symlinks=False)
        except OSError as err:
            raise PylayersError(f"cannot set xattr {name.decode(errors='replace')} on "
                                f"{os.fsdecode(path)}: {err.strerror}") from None


def _meta(path: bytes, e: Entry, fd: int | None = None) -> None:
    if e.kind == SYMLINK:
        os.chown(path, e.uid, e.gid, follow_symlinks=False)
        _set_xattrs(path, e)
        os.utime(path, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)
        return
    if fd is not None:
        os.fchown(fd, e.uid, e.gid)
        os.fchmod(fd, e.mode)
    else:
        os.chown(path, e.uid, e.gid, follow_symlinks=False)
        os.chmod(path, e.mode, follow_symlinks=False)
    _set_xattrs(path, e)
    if fd is not None:
        os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
    else:
        os.utime(path, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)


def write_file(path: bytes, e: Entry, read_chunk: Callable[[bytes], bytes]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        pos = 0
        hole = False
        for cid, length in e.chunk_list():
            data = read_chunk(cid)
            if data.count(0) == length:  # all zeros: leave a hole
                os.lseek(fd, length, os.SEEK_CUR)
                hole = True
            else:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
            pos += length
        if hole:
            os.ftruncate(fd, pos)
        _meta(path, e, fd)
    finally:
        os.close(fd)


def checkout_tree(tree: list[Entry], dest: Path, read_chunk: Callable[[bytes], bytes],
                  progress: Callable[[int], None] | None = None) -> None:
    """Write `tree` into the empty directory `dest`."""
    validate_tree(tree)
    prepare_destination(dest)
    base = os.fsencode(dest.resolve())
    dirs: list[tuple[bytes, Entry]] = []
    for e in tree:
        path = base + b"/" + e.path if e.path else base
        try:
            if e.kind == DIR:
                if e.path:
                    os.mkdir(path, 0o700)
                dirs.append((path, e))
            elif e.kind == REG:
                write_file(path, e, read_chunk)
                if progress is not None:
                    progress(e.size)
            elif e.kind == HARDLINK:
                os.link(base + b"/" + e.target, path, follow_symlinks=False)
            elif e.kind == SYMLINK:
                os.symlink(e.target, path)
                _meta(path, e)
            elif e.kind in (CHR, BLK, FIFO):
                kind = {CHR: 0o020000, BLK: 0o060000, FIFO: 0o010000}[e.kind]
                os.mknod(path, kind | 0o600, os.makedev(*e.rdev) if e.kind != FIFO else 0)
                _meta(path, e)
        except OSError as err:
            if err.errno == errno.EPERM and e.kind in (CHR, BLK):
                raise PylayersError(f"cannot create device /{os.fsdecode(e.path)}: "
                                    "permission denied (needs root)") from None
            raise PylayersError(f"cannot write /{os.fsdecode(e.path)}: {err.strerror}") from None
    for path, e in reversed(dirs):
        try:
            _meta(path, e)
        except OSError as err:
            raise PylayersError(f"cannot set metadata of {os.fsdecode(path)}: "
                                f"{err.strerror}") from None
