"""Writing a tree out to a directory with all its metadata.

Order matters: data, then owner (chown clears setuid bits and file capabilities),
then mode, then xattrs, then times; directories get their metadata last, deepest
first, so read-only directories can still be filled and their mtimes stay put.
All-zero blocks become holes, so sparse files stay sparse.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ..errors import InvalidArgument, PylayersError
from ..userns import unmapped_owner
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


def _drop_xattrs(path: bytes) -> None:
    """Remove the xattrs a checkout restores (all but security.*, which the system may
    own, e.g. SELinux labels) from the existing directory `path`."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.ENOTSUP, errno.ENODATA):
            return
        raise PylayersError(f"cannot list xattrs of {os.fsdecode(path)}: "
                            f"{err.strerror}") from None
    for name in names:
        if name.startswith("security."):
            continue
        try:
            os.removexattr(path, name, follow_symlinks=False)
        except OSError as err:
            if err.errno in (errno.ENOTSUP, errno.ENODATA):
                continue
            raise PylayersError(f"cannot remove xattr {name} of {os.fsdecode(path)}: "
                                f"{err.strerror}") from None


def _chown(path: bytes, e: Entry, fd: int | None = None) -> None:
    """Give `path` the entry's owner; a clear error where this process cannot: not
    root, or in a user namespace that does not map the id (as rootless podman says)."""
    try:
        if fd is not None:
            os.fchown(fd, e.uid, e.gid)
        else:
            os.chown(path, e.uid, e.gid, follow_symlinks=False)
    except OSError as err:
        where = f"/{os.fsdecode(e.path)}"
        if err.errno == errno.EINVAL:
            problem = unmapped_owner(e.uid, e.gid)
            if problem is not None:
                raise PylayersError(f"{problem} (owner of {where})") from None
        if err.errno == errno.EPERM:
            raise PylayersError(f"cannot make uid {e.uid}, gid {e.gid} the owner of {where}: "
                                "operation not permitted (only root can)") from None
        raise


def _meta(path: bytes, e: Entry, fd: int | None = None) -> None:
    if e.kind == SYMLINK:
        _chown(path, e)
        _set_xattrs(path, e)
        os.utime(path, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)
        return
    _chown(path, e, fd)
    if fd is not None:
        os.fchmod(fd, e.mode)
    else:
        os.chmod(path, e.mode, follow_symlinks=False)
    _set_xattrs(path, e)
    if fd is not None:
        os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
    else:
        os.utime(path, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)


class _SparseWriter:
    """Writes a file's bytes in order, leaving every all-zero, block-aligned block of
    the file as a hole (whatever the chunk boundaries), as `tar -S` does: a sparse
    file's holes come back where they were, not rounded out to whole chunks."""

    def __init__(self, fd: int, block: int) -> None:
        self.fd = fd
        self.block = block
        self.zero_block = _zero_block(block)
        self.zero = memoryview(self.zero_block)
        self.carry = bytearray()  # the start of the current block, not yet complete
        self.pos = 0  # bytes given so far
        self.hole = False

    def _emit(self, view: memoryview, all_zero: bool = False, dense: bool = False) -> None:
        """Write `view` (starting at a block boundary), skipping all-zero blocks.
        `dense`: the caller knows no block of it is all zeros."""
        block, zero = self.block, self.zero
        n = len(view)
        if all_zero:
            if n:
                os.lseek(self.fd, n, os.SEEK_CUR)
                self.hole = True
            return
        if dense:
            self._write(view)
            return
        run = 0  # start of the pending run of blocks to write
        for i in range(0, n, block):
            end = min(i + block, n)
            if view[i] or view[end - 1] or view[i:end] != zero[: end - i]:
                continue
            self._write(view[run:i])
            os.lseek(self.fd, end - i, os.SEEK_CUR)
            self.hole = True
            run = end
        self._write(view[run:])

    def _write(self, view: memoryview) -> None:
        _write_all(self.fd, view)

    def write(self, data: bytes) -> None:
        # most chunks are not all zeros, and show it in their first or last byte
        all_zero = (not data or not data[0] and not data[-1]) and data.count(0) == len(data)
        view = memoryview(data)
        self.pos += len(view)
        if self.carry:
            need = self.block - len(self.carry)
            self.carry += view[:need]
            view = view[need:]
            if len(self.carry) < self.block:
                return
            self._emit(memoryview(bytes(self.carry)))
            self.carry.clear()
        whole = len(view) - len(view) % self.block
        # no run of a block's length of zeros anywhere: no all-zero block to look for
        # (one fast substring search instead of a Python loop over the blocks)
        dense = not all_zero and self.zero_block not in data
        self._emit(view[:whole], all_zero, dense)
        self.carry += view[whole:]

    def finish(self) -> None:
        if self.carry:
            self._emit(memoryview(bytes(self.carry)))
            self.carry.clear()
        if self.hole:
            os.ftruncate(self.fd, self.pos)


def write_file(path: bytes, e: Entry, read_chunk: Callable[[bytes], bytes]) -> None:
    write_file_from(path, e, (read_chunk(cid) for cid, _length in e.chunk_list()))


def write_file_from(path: bytes, e: Entry, chunks: Iterable[bytes]) -> None:
    """Create the regular file `path` from the bytes of its chunks, then its metadata."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        block = max(os.fstat(fd).st_blksize, 512)
        if e.chunk_count() == 1:  # most files: one chunk, and often nothing to skip
            (data,) = chunks
            if _dense(data, block):
                _write_all(fd, memoryview(data))
                _meta(path, e, fd)
                return
            chunks = (data,)
        out = _SparseWriter(fd, block)
        for data in chunks:
            out.write(data)
        out.finish()
        _meta(path, e, fd)
    finally:
        os.close(fd)


_ZERO_BLOCKS: dict[int, bytes] = {}


def _zero_block(block: int) -> bytes:
    zero = _ZERO_BLOCKS.get(block)
    if zero is None:
        zero = _ZERO_BLOCKS[block] = bytes(block)
    return zero


def _dense(data: bytes, block: int) -> bool:
    """Whether `data`, as a whole file, has no block (the partial last one included)
    that is all zeros: then _SparseWriter would write it all, as is."""
    if _zero_block(block) in data:
        return False
    tail = len(data) % block
    return not tail or data.count(0, len(data) - tail) != tail


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


def checkout_tree(tree: list[Entry], dest: Path,
                  read_chunks: Callable[[Iterable[bytes]], Iterator[bytes]],
                  progress: Callable[[int], None] | None = None) -> None:
    """Write `tree` into the empty directory `dest`. `read_chunks` gives the bytes of
    a sequence of chunk ids, in order (Store.read_ahead reads ahead on a thread)."""
    validate_tree(tree)
    prepare_destination(dest)
    stream = read_chunks(cid for e in tree if e.kind == REG for cid, _n in e.chunk_list())
    try:
        _write_tree(tree, dest, stream, progress)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def _write_tree(tree: list[Entry], dest: Path, stream: Iterator[bytes],
                progress: Callable[[int], None] | None) -> None:
    base = os.fsencode(dest.resolve())
    # DEST becomes the layer's root: its own xattrs go (the root's are set at the end),
    # above all a default ACL, which every entry made inside would otherwise inherit.
    _drop_xattrs(base)
    dirs: list[tuple[bytes, Entry]] = []
    for e in tree:
        path = base + b"/" + e.path if e.path else base
        try:
            if e.kind == DIR:
                if e.path:
                    os.mkdir(path, 0o700)
                dirs.append((path, e))
            elif e.kind == REG:
                write_file_from(path, e, (next(stream) for _ in range(e.chunk_count())))
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
