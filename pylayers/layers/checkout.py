"""Writing a tree out to a directory with all its metadata.

Entries are made in component order, each relative to its parent directory's open
descriptor (one path component to resolve, whatever the depth: no PATH_MAX limit on
the destination either); directories get their metadata last, deepest first, so
read-only directories can still be filled and their mtimes stay put. The chunks come
from `read_chunks`, which reads, decompresses and verifies ahead (store/readproc.py:
in a process of its own when the tree is large enough; store/readahead.py) while
this thread writes.

`link_cache`: a linked checkout (`pylayers checkout --link`). Each regular file is a
hardlink to a file cache's copy (LinkCache), written there once: a second checkout of
the same files reads and writes no file data. For read-only use: every linked copy of
a file is one inode, so writing to one in place changes them all (and the cache);
replacing a file (write a new one, rename it over) is safe.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import blake3

from .._native import WRITE_CREATE, WRITE_OWNER, write_file
from ..errors import CorruptData, InvalidArgument, PylayersError, os_error_reason, short_path
from .manifest import BLK, CHR, DIR, FIFO, HARDLINK, REG, SYMLINK, Entry
from .materialise import apply_metadata, chown_entry, drop_xattrs, make_node, write_file_from
from .tree import validate_tree

# Directories held open along the path being written; deeper ones are reached by a
# relative path from the deepest held (a hostile tree 2000 levels deep must not run
# out of descriptors).
MAX_OPEN_DIRS = 128
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK_RECORD = struct.Struct("<32sI")  # one (chunk id, length) record of Entry.chunks
# A file of several chunks up to this size is gathered into one buffer and written in
# one C call (larger ones are written chunk by chunk: memory stays bounded).
GATHER_MAX = 8 << 20
_ONE_CHUNK = _CHUNK_RECORD.size


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


class LinkCache:
    """A file cache for linked checkouts: `root/<xx>/<key>`, one file per path, content
    and metadata (mode, owner, mtime, xattrs). The key includes the path, as the
    overlay driver's file cache does: files of one checkout never share an inode with
    each other (a snapshot of the checkout, or tar, would see them as hardlinks), only
    with the same file at the same path in other checkouts. Files nothing links to
    any more are deleted by `collect` (gc)."""

    DOMAIN = b"pylayers checkout link v1\x00"
    _META = struct.Struct("<IIIqQI")  # mode, uid, gid, mtime_ns, size, path length

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: set[bytes] = set()

    def key(self, e: Entry) -> bytes:
        h = blake3.blake3(self.DOMAIN + e.content)
        h.update(self._META.pack(e.mode, e.uid, e.gid, e.mtime_ns, e.size, len(e.path)))
        h.update(e.path)
        for name, value in e.xattrs:
            h.update(struct.pack("<HI", len(name), len(value)) + name + value)
        return h.hexdigest().encode()

    def path(self, key: bytes) -> bytes:
        return os.fsencode(self.root) + b"/" + key[:2] + b"/" + key

    def subdir(self, key: bytes) -> bytes:
        d = os.fsencode(self.root) + b"/" + key[:2]
        if key[:2] not in self._made:
            os.makedirs(d, exist_ok=True)
            self._made.add(key[:2])
        return d

    def collect(self) -> tuple[int, int]:
        """Delete the cached files no checkout links to (link count 1): (files, bytes
        freed). Run with the store held exclusively (gc), so no checkout is linking."""
        files = freed = 0
        try:
            subs = list(os.scandir(self.root))
        except FileNotFoundError:
            return 0, 0
        for sub in subs:
            if not sub.is_dir(follow_symlinks=False):
                continue
            with os.scandir(sub.path) as it:
                for f in it:
                    try:
                        st = f.stat(follow_symlinks=False)
                        if st.st_nlink == 1 or f.name.startswith("."):  # or a leftover tmp
                            os.unlink(f.path)
                            files += 1
                            freed += st.st_blocks * 512
                    except FileNotFoundError:
                        pass
        return files, freed


def link_cache_root(store_path: Path) -> Path:
    """Where linked checkouts' file cache lives: beside the mount drivers' caches."""
    return store_path / "cache" / "checkout"


def checkout_tree(tree: list[Entry], dest: Path,
                  read_chunks: Callable[[Iterable[tuple[bytes, int]]],
                                        Iterator[bytes | memoryview]],
                  progress: Callable[[int], None] | None = None,
                  link_cache: LinkCache | None = None) -> None:
    """Write `tree` into the empty directory `dest`. `read_chunks` gives the bytes of
    a sequence of (chunk id, length), in order, each good until the next is asked for
    (`store.readproc.read_in_process` reads ahead in a process of its own,
    `store.readahead.read_ahead` on a thread). With `link_cache`, regular files are
    hardlinks into it (those it lacks are written there first): DEST must be on the
    cache's file system."""
    validate_tree(tree)
    prepare_destination(dest)
    keys: dict[bytes, bytes] = {}
    if link_cache is not None:
        try:
            os.makedirs(link_cache.root, exist_ok=True)
            same_fs = os.stat(link_cache.root).st_dev == os.stat(dest).st_dev
        except OSError as err:
            raise PylayersError(f"cannot make the checkout cache {link_cache.root}: "
                                f"{os_error_reason(err, link_cache.root)}") from None
        if not same_fs:
            raise InvalidArgument(
                f"checkout --link: {dest} is not on the file system of the store's "
                f"checkout cache ({link_cache.root}), and hardlinks cannot cross file "
                "systems: check out without --link, or into the store's file system")
        for e in tree:
            if e.kind == REG:
                k = link_cache.key(e)
                if not os.path.exists(link_cache.path(k)):
                    keys[e.path] = k  # to write: its chunks are read
                else:
                    keys[e.path] = b"=" + k  # cached: linked, nothing read
    # every file's (chunk id, length) records in one buffer: a reader process
    # (store/readproc.py) reads them after the fork without touching the tree's
    # entries, whose pages it would copy (11 ms of a 13k-file tree's 15 ms)
    records = b"".join(e.chunks for e in tree if e.kind == REG
                       and not keys.get(e.path, b"").startswith(b"="))
    stream = read_chunks(_CHUNK_RECORD.iter_unpack(records))
    try:
        _Writer(dest, stream, progress, link_cache, keys).write(tree)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


class _Writer:
    def __init__(self, dest: Path, stream: Iterator[bytes | memoryview],
                 progress: Callable[[int], None] | None, link_cache: LinkCache | None,
                 keys: dict[bytes, bytes]) -> None:
        self.base = os.fsencode(dest.resolve())
        self.stream = stream
        self.progress = progress
        self.cache = link_cache
        self.keys = keys
        self.root_fd = -1
        self._buffer: memoryview | None = None  # `_gather`'s
        # (path, fd or -1) of the directories from the root down to the current one
        self.stack: list[tuple[bytes, int]] = []

    def write(self, tree: list[Entry]) -> None:
        # DEST becomes the layer's root: its own xattrs go (the root's are set at the
        # end), above all a default ACL, which every entry made inside would inherit.
        drop_xattrs(self.base)
        self.root_fd = os.open(self.base, _DIR_FLAGS)
        self.stack = [(b"", self.root_fd)]
        dirs: list[Entry] = []
        try:
            for e in tree:
                try:
                    self._entry(e, dirs)
                except OSError as err:
                    where = self.base + b"/" + e.path
                    if err.errno == errno.EPERM and e.kind in (CHR, BLK):
                        raise PylayersError(f"cannot create device /{short_path(e.path)}: "
                                            "permission denied (needs root)") from None
                    raise PylayersError(f"cannot write /{short_path(e.path)}: "
                                        f"{os_error_reason(err, where)}") from None
        finally:
            for _path, fd in self.stack[1:]:
                if fd >= 0:
                    os.close(fd)
            self.stack = self.stack[:1]
        try:
            for e in reversed(dirs):
                self._dir_metadata(e)
        finally:
            os.close(self.root_fd)

    def _parent(self, path: bytes) -> tuple[int, bytes]:
        """(descriptor, name relative to it) for making `path`: its parent directory
        is on the stack (the tree is in component order and validated)."""
        parent, _, name = path.rpartition(b"/")
        stack = self.stack
        while stack[-1][0] != parent:
            _p, fd = stack.pop()
            if fd >= 0:
                os.close(fd)
        fd = stack[-1][1]
        if fd >= 0:
            return fd, name
        for held, hfd in reversed(stack):  # deeper than MAX_OPEN_DIRS
            if hfd >= 0:
                return hfd, path[len(held) + 1:] if held else path
        raise AssertionError("the root is always held")

    def _entry(self, e: Entry, dirs: list[Entry]) -> None:
        kind = e.kind
        if not e.path:
            dirs.append(e)
            return
        dir_fd, name = self._parent(e.path)
        if kind == REG:
            if self.cache is not None:
                self._linked(e, dir_fd, name)
            elif not e.xattrs and (len(e.chunks) <= _ONE_CHUNK or e.size <= GATHER_MAX):
                # most files: one chunk (or none), no xattrs: one C call makes it; a
                # file of several chunks, gathered into one buffer first
                if len(e.chunks) > _ONE_CHUNK:
                    data = self._gather(e)
                else:
                    data = next(self.stream) if e.chunks else e.data  # inline: no chunks
                rc, step = write_file(dir_fd, name, e.mode, e.uid, e.gid, e.mtime_ns, data)
                if rc:
                    try:
                        if step == WRITE_OWNER:
                            chown_entry(name, e, dir_fd=dir_fd)  # raises its clear error
                        raise OSError(-rc, os.strerror(-rc))
                    finally:
                        if step > WRITE_CREATE:  # made, not whole: no half-written file
                            with contextlib.suppress(OSError):
                                os.unlink(name, dir_fd=dir_fd)
            else:
                stream = self.stream
                write_file_from(name, e, (next(stream) for _ in range(e.chunk_count())),
                                dir_fd)
            if self.progress is not None:
                self.progress(e.size)
        elif kind == DIR:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
            dirs.append(e)
            fd = -1
            if len(self.stack) < MAX_OPEN_DIRS:
                fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            self.stack.append((e.path, fd))
        elif kind == HARDLINK:
            os.link(e.target, name, src_dir_fd=self.root_fd, dst_dir_fd=dir_fd,
                    follow_symlinks=False)
        elif kind in (SYMLINK, CHR, BLK, FIFO):
            if e.xattrs:  # lsetxattr takes no directory descriptor: by its full path
                make_node(self.base + b"/" + e.path, e)
            else:
                _node_at(dir_fd, name, e)

    def _gather(self, e: Entry) -> memoryview:
        """The file's chunks, copied one after the other into one buffer (each view
        from the stream is good only until the next is asked for): a view of it, good
        until the next call. The file is then written in one C call, as a file of one
        chunk is (a Python write a chunk, and the checks for holes, were a quarter of
        the writing of a pip-built env's 978 files of several chunks)."""
        if self._buffer is None:
            self._buffer = memoryview(mmap.mmap(-1, GATHER_MAX))
        buf, at = self._buffer, 0
        for _ in range(e.chunk_count()):
            data = next(self.stream)
            end = at + len(data)
            if end > e.size:
                break
            buf[at:end] = data
            at = end
        if at != e.size or end != at:
            raise CorruptData(f"/{short_path(e.path)}: its chunks do not add up to its "
                              f"size ({e.size} bytes)")
        return buf[:at]

    def _linked(self, e: Entry, dir_fd: int, name: bytes) -> None:
        cache = self.cache
        assert cache is not None
        key = self.keys[e.path]
        if key.startswith(b"="):
            try:
                os.link(cache.path(key[1:]), name, dst_dir_fd=dir_fd, follow_symlinks=False)
                return
            except FileNotFoundError:
                raise PylayersError(
                    f"/{short_path(e.path)}: its copy in the checkout cache "
                    f"({cache.root}) vanished during the checkout; run it again") from None
        sub = cache.subdir(key)
        tmp = sub + b"/." + key + b"." + os.urandom(6).hex().encode()
        stream = self.stream
        try:
            write_file_from(tmp, e, (next(stream) for _ in range(e.chunk_count())))
            os.link(tmp, name, dst_dir_fd=dir_fd, follow_symlinks=False)
            try:  # never replace a cached file: another checkout may be linking it
                os.link(tmp, cache.path(key), follow_symlinks=False)
            except FileExistsError:
                pass
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def _dir_metadata(self, e: Entry) -> None:
        """Owner, mode, xattrs and mtime of a directory made (or the root), by a
        descriptor opened relative to the root."""
        try:
            fd = os.open(e.path, _DIR_FLAGS, dir_fd=self.root_fd) if e.path else self.root_fd
            try:
                apply_metadata(self.base + b"/" + e.path if e.path else self.base, e, fd)
            finally:
                if fd != self.root_fd:
                    os.close(fd)
        except OSError as err:
            where = self.base + b"/" + e.path if e.path else self.base
            raise PylayersError(f"cannot set metadata of {short_path(where)}: "
                                f"{os_error_reason(err, where)}") from None


def _node_at(dir_fd: int, name: bytes, e: Entry) -> None:
    """`make_node` relative to a directory descriptor, for an entry without xattrs."""
    if e.kind == SYMLINK:
        os.symlink(e.target, name, dir_fd=dir_fd)
    else:
        os.mknod(name, e.file_type_bits() | stat.S_IRUSR | stat.S_IWUSR,
                 os.makedev(*e.rdev) if e.kind != FIFO else 0, dir_fd=dir_fd)
    chown_entry(name, e, dir_fd=dir_fd)
    if e.kind != SYMLINK:
        os.chmod(name, e.mode, dir_fd=dir_fd)
    os.utime(name, ns=(e.mtime_ns, e.mtime_ns), dir_fd=dir_fd, follow_symlinks=False)


__all__ = ["LinkCache", "MAX_OPEN_DIRS", "checkout_tree", "link_cache_root",
           "prepare_destination"]
