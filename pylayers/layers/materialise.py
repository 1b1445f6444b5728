"""Materialising one entry: creating a file, symlink, device or fifo from its `Entry`
and giving it the entry's metadata. Checkout (a whole tree into a directory) and the
overlay driver (a layer's own entries into a lower directory) both build on these.

Order matters: data, then owner (chown clears setuid bits and file capabilities),
then mode, then xattrs, then times. All-zero blocks of a file become holes, so
sparse files stay sparse. These raise OSError as the system call gave it, except for
owners and xattrs, which get a PylayersError naming what was refused; callers add
the entry's path to what they report.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterable

from ..errors import PylayersError, short_path
from ..userns import unmapped_owner
from .manifest import BLK, CHR, FIFO, SYMLINK, Entry


def set_xattrs(path: bytes | int, e: Entry) -> None:
    """Set the entry's xattrs on `path` (not followed if a symlink), or the open fd."""
    for name, value in e.xattrs:
        try:
            if isinstance(path, int):
                os.setxattr(path, name, value)
            else:
                os.setxattr(path, name, value, follow_symlinks=False)
        except OSError as err:
            where = short_path(path) if not isinstance(path, int) else f"/{short_path(e.path)}"
            raise PylayersError(f"cannot set xattr {name.decode(errors='replace')} on "
                                f"{where}: {err.strerror}") from None


def drop_xattrs(path: bytes) -> None:
    """Remove the xattrs a checkout restores (all but security.*, which the system may
    own, e.g. SELinux labels) from the existing directory `path`."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.ENOTSUP, errno.ENODATA):
            return
        raise PylayersError(f"cannot list xattrs of {short_path(path)}: "
                            f"{err.strerror}") from None
    for name in names:
        if name.startswith("security."):
            continue
        try:
            os.removexattr(path, name, follow_symlinks=False)
        except OSError as err:
            if err.errno in (errno.ENOTSUP, errno.ENODATA):
                continue
            raise PylayersError(f"cannot remove xattr {name} of {short_path(path)}: "
                                f"{err.strerror}") from None


def _chown(path: bytes, e: Entry, fd: int | None = None, dir_fd: int | None = None) -> None:
    """Give `path` (relative to `dir_fd` if given, or the open `fd` of it) the entry's
    owner; a clear error where this process cannot: not root, or in a user namespace
    that does not map the id (as rootless podman says)."""
    try:
        if fd is not None:
            os.fchown(fd, e.uid, e.gid)
        else:
            os.chown(path, e.uid, e.gid, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as err:
        where = f"/{short_path(e.path)}"
        if err.errno == errno.EINVAL:
            problem = unmapped_owner(e.uid, e.gid)
            if problem is not None:
                raise PylayersError(f"{problem} (owner of {where})") from None
        if err.errno == errno.EPERM:
            raise PylayersError(f"cannot make uid {e.uid}, gid {e.gid} the owner of {where}: "
                                "operation not permitted (only root can)") from None
        raise


def apply_metadata(path: bytes, e: Entry, fd: int | None = None) -> None:
    """Give the existing `path` (or the open `fd` of it) the entry's owner, mode,
    xattrs and mtime, in that order: chown clears setuid bits and file capabilities, so
    it goes before chmod and setxattr. A symlink gets owner, xattrs and mtime only."""
    if e.kind == SYMLINK:
        _chown(path, e)
        set_xattrs(path, e)
        os.utime(path, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)
        return
    _chown(path, e, fd)
    if fd is not None:
        os.fchmod(fd, e.mode)
    else:
        os.chmod(path, e.mode, follow_symlinks=False)
    set_xattrs(fd if fd is not None else path, e)
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

    def write(self, data: bytes | memoryview) -> None:
        if not isinstance(data, bytes):
            data = bytes(data)
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
        # no block starting with a zero (one byte in `block` looked at), or else no run
        # of a block's length of zeros anywhere (one substring search): no all-zero
        # block to look for, instead of a Python loop over the blocks
        dense = not all_zero and (0 not in view[:whole:self.block].tobytes()
                                  or self.zero_block not in data)
        self._emit(view[:whole], all_zero, dense)
        self.carry += view[whole:]

    def finish(self) -> None:
        if self.carry:
            self._emit(memoryview(bytes(self.carry)))
            self.carry.clear()
        if self.hole:
            os.ftruncate(self.fd, self.pos)


def write_file(path: bytes, e: Entry, read_chunk: Callable[[bytes], bytes]) -> None:
    """Create the regular file `path` from its chunks, each read by `read_chunk(id)`,
    then give it its metadata."""
    write_file_from(path, e, (read_chunk(cid) for cid, _length in e.chunk_list()))


def write_file_from(path: bytes, e: Entry, chunks: Iterable[bytes | memoryview],
                    dir_fd: int | None = None) -> None:
    """Create the regular file `path` (relative to the directory open at `dir_fd`, if
    given) from the bytes of its chunks, then its metadata; on any error, remove it
    again."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 e.mode & 0o777, dir_fd=dir_fd)
    if e.inline:  # the content is in the entry: there are no chunks to read
        chunks = (e.data,)
    try:
        # made with the entry's permission bits (less the umask, or a default ACL's):
        # its owner and mode are set only where they differ, which, for a tree owned
        # by whoever checks it out, is nowhere (two system calls a file fewer)
        st = os.fstat(fd)
        block = max(st.st_blksize, 512)
        if e.inline or e.chunk_count() == 1:  # most files: one piece, often nothing to skip
            (data,) = chunks
            if not isinstance(data, bytes):
                data = bytes(data)
            if _dense(data, block):
                _write_all(fd, memoryview(data))
                _fd_metadata(path, e, fd, st)
                return
            chunks = (data,)
        out = _SparseWriter(fd, block)
        for data in chunks:
            out.write(data)
        out.finish()
        _fd_metadata(path, e, fd, st)
    except BaseException:
        # a chunk that could not be read, a full disk: no half-written file is left
        # under the entry's name for anyone to take as whole
        os.close(fd)
        fd = -1
        with contextlib.suppress(OSError):
            os.unlink(path, dir_fd=dir_fd)
        raise
    finally:
        if fd >= 0:
            os.close(fd)


def _fd_metadata(path: bytes, e: Entry, fd: int, st: os.stat_result) -> None:
    """`apply_metadata` for a file this process just made (whose fstat `st` is): the
    same order (owner, mode, xattrs, mtime), each step skipped where it would change
    nothing. It was made without setuid, setgid or sticky bits, so a chown clears none
    and an equal mode needs no chmod."""
    if st.st_uid != e.uid or st.st_gid != e.gid:
        _chown(path, e, fd)
    if stat.S_IMODE(st.st_mode) != e.mode:
        os.fchmod(fd, e.mode)
    if e.xattrs:
        set_xattrs(fd, e)  # type: ignore[arg-type]  # os.setxattr takes an fd
    os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))


_ZERO_BLOCKS: dict[int, bytes] = {}


def _zero_block(block: int) -> bytes:
    zero = _ZERO_BLOCKS.get(block)
    if zero is None:
        zero = _ZERO_BLOCKS[block] = bytes(block)
    return zero


def _dense(data: bytes, block: int) -> bool:
    """Whether `data`, as a whole file, has no block (the partial last one included)
    that is all zeros: then _SparseWriter would write it all, as is."""
    if len(data) >= block and 0 in data[::block] and _zero_block(block) in data:
        # (an all-zero block starts with a zero: the first bytes of the blocks, one
        # byte in `block`, rule most files out without a search through all of them)
        return False
    tail = len(data) % block
    return not tail or data.count(0, len(data) - tail) != tail


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


def make_node(path: bytes, e: Entry) -> None:
    """Create the symlink, character or block device, or fifo `e` at `path`, with its
    metadata. Devices need CAP_MKNOD (EPERM otherwise, as OSError)."""
    if e.kind == SYMLINK:
        os.symlink(e.target, path)
    elif e.kind in (CHR, BLK, FIFO):
        os.mknod(path, e.file_type_bits() | stat.S_IRUSR | stat.S_IWUSR,
                 os.makedev(*e.rdev) if e.kind != FIFO else 0)
    else:
        raise ValueError(f"make_node: not a symlink, device or fifo: {e!r}")
    apply_metadata(path, e)


chown_entry = _chown

__all__ = ["apply_metadata", "chown_entry", "drop_xattrs", "make_node", "set_xattrs", "write_file",
           "write_file_from"]
