"""Scanning a directory into a tree of entries, storing file content as it goes.

Regular files are read in blocks, cut into chunks by the C core and hashed (chunk
ids, and the whole file's BLAKE3 on a second thread); new chunks go to a
ChunkWriter. A stat cache skips reading files whose inode, size, mtime and ctime are
unchanged since they were last stored (ctime catches `touch -d`).
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import blake3

from ..chunking import Chunker, ChunkerParams, cut_points
from ..errors import InvalidArgument, NotFound, StoreError
from ..store.repository import Store
from .manifest import BLK, CHR, DIR, FIFO, HARDLINK, REG, SYMLINK, Entry

BLOCK = 4 << 20
_CHUNK = struct.Struct("<32sI")
STATCACHE = struct.Struct("<Qqq32s")  # size, mtime_ns, ctime_ns, content id
_INODE = struct.Struct("<QQ")  # the stat cache's key: dev, ino
# A cache entry is recorded only if the file's ctime is this much older than the moment
# we began reading it: timestamps are coarse, so a write in the same tick as our read
# could otherwise leave size, mtime and ctime unchanged (git's "racy" case).
RACY_NS = 1_000_000_000


@dataclass
class ScanStats:
    files: int = 0
    bytes_read: int = 0
    bytes_total: int = 0
    cache_hits: int = 0
    new_chunks: int = 0
    new_bytes: int = 0
    warnings: list[str] = field(default_factory=list)
    # set when a tree fingerprint showed the directory unchanged since this layer
    unchanged_since: bytes | None = None


def read_xattrs(path: bytes) -> tuple[tuple[bytes, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.ENODATA, errno.EPERM):
            return ()
        raise
    if not names:
        return ()
    out = []
    for name in sorted(names):
        try:
            out.append((name.encode("utf-8", "surrogateescape"),
                        os.getxattr(path, name, follow_symlinks=False)))
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise
    return tuple(out)


def encode_statcache(size: int, mtime_ns: int, ctime_ns: int, content: bytes,
                     chunks: bytes) -> bytes:
    """A stat-cache value (docs/format.md, "The index"): the chunk list is left out
    when the file is one chunk, whose id is then the content id."""
    if len(chunks) == _CHUNK.size and _CHUNK.unpack(chunks) == (content, size):
        chunks = b""
    return STATCACHE.pack(size, mtime_ns, ctime_ns, content) + chunks


def decode_statcache(value: bytes) -> tuple[int, int, int, bytes, bytes] | None:
    """(size, mtime_ns, ctime_ns, content id, packed chunk list), or None for a value
    of another length (an entry in an earlier layout: a miss)."""
    if len(value) < STATCACHE.size or (len(value) - STATCACHE.size) % _CHUNK.size:
        return None
    size, mtime, ctime, content = STATCACHE.unpack_from(value)
    chunks = bytes(value[STATCACHE.size:])
    if not chunks and size:
        chunks = _CHUNK.pack(content, size)
    return size, mtime, ctime, content, chunks


class ContentReader:
    """Reads one file's content into chunks; `sink(cid, data)` stores a chunk or, when
    None, nothing is stored (hash-only, for comparing a directory without storing)."""

    def __init__(self, params: ChunkerParams, sink: Callable[[bytes, bytes], bool] | None,
                 stats: ScanStats) -> None:
        self.params = params
        self.sink = sink
        self.stats = stats
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def _store(self, pieces: list, ids: list[bytes], out: list[bytes]) -> None:
        sink = self.sink
        for piece, cid in zip(pieces, ids, strict=True):
            try:
                new = sink is not None and sink(cid, piece)
            except OSError as e:
                # the store's fault, not the source file's: say so
                raise StoreError(f"cannot write to the store: {e.strerror or e}") from None
            if new:
                self.stats.new_chunks += 1
                self.stats.new_bytes += len(piece)
            out.append(_CHUNK.pack(cid, len(piece)))

    def read(self, fd: int, size_hint: int, progress=None) -> tuple[bytes, bytes, int]:
        """(content id, packed chunk list, size) of the open file `fd`."""
        if size_hint < BLOCK:
            data = os.read(fd, BLOCK)
            if len(data) < BLOCK:  # the whole file in one read: no threads needed
                return self._read_small(data, progress)
            return self._read_large(fd, data, progress)
        return self._read_large(fd, b"", progress)

    def _read_small(self, data: bytes, progress) -> tuple[bytes, bytes, int]:
        p = self.params
        out: list[bytes] = []
        mv = memoryview(data)
        pieces, start = [], 0
        for end in cut_points(data, min_size=p.min_size, avg_size=p.avg_size,
                              max_size=p.max_size):
            pieces.append(mv[start:end])
            start = end
        ids = [blake3.blake3(piece).digest() for piece in pieces]
        self._store(pieces, ids, out)
        self.stats.bytes_read += len(data)
        if progress is not None:
            progress(len(data))
        # A one-chunk file's content id is its chunk id: no second hash.
        content = ids[0] if len(ids) == 1 else blake3.blake3(data).digest()
        return content, b"".join(out), len(data)

    def _read_large(self, fd: int, first: bytes, progress) -> tuple[bytes, bytes, int]:
        """Pipelined: while this thread reads and chunks block k, one worker hashes the
        whole file and another hashes block k-1's chunks (blake3 and the C scan release
        the GIL); chunks reach the sink in order, from this thread."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pylayers-hash")
        pool = self._pool
        chunker = Chunker.from_params(self.params)
        filehash = blake3.blake3()
        out: list[bytes] = []
        carry = bytearray()
        size = 0
        file_job = None
        chunk_job = None
        block = first or os.read(fd, BLOCK)
        while block:
            size += len(block)
            if file_job is not None:
                file_job.result()
            file_job = pool.submit(filehash.update, block)
            base = chunker.offset
            mv = memoryview(block)
            pieces, start = [], 0
            for c in chunker.feed(block):
                end = c - base
                if carry:
                    carry += mv[start:end]
                    pieces.append(bytes(carry))
                    carry.clear()
                else:
                    pieces.append(mv[start:end])
                start = end
            if start < len(block):
                carry += mv[start:]
            if chunk_job is not None:
                self._store(chunk_job[1], chunk_job[0].result(), out)
            chunk_job = (pool.submit(_hash_pieces, pieces), pieces)
            self.stats.bytes_read += len(block)
            if progress is not None:
                progress(len(block))
            block = os.read(fd, BLOCK)
        if chunk_job is not None:
            self._store(chunk_job[1], chunk_job[0].result(), out)
        if chunker.finish() is not None:
            tail = bytes(carry)
            self._store([tail], [blake3.blake3(tail).digest()], out)
        if file_job is not None:
            file_job.result()
        return filehash.digest(), b"".join(out), size


def _hash_pieces(pieces: list) -> list[bytes]:
    return [blake3.blake3(piece).digest() for piece in pieces]


class Scanner:
    """Turns a directory into a tree (entries in component order)."""

    def __init__(self, store: Store | None, params: ChunkerParams,
                 sink: Callable[[bytes, bytes], bool] | None,
                 use_statcache: bool = True, progress=None) -> None:
        self.store = store
        self.stats = ScanStats()
        self.reader = ContentReader(params, sink, self.stats)
        self.use_statcache = use_statcache and store is not None
        self.progress = progress
        self.statcache_updates: list[tuple[bytes, bytes]] = []
        self._links: dict[tuple[int, int], bytes] = {}
        self._txn = None

    def scan(self, root: str | bytes) -> list[Entry]:
        root_b = os.fsencode(os.path.abspath(root))
        try:
            st = os.stat(root_b)
        except FileNotFoundError:
            raise NotFound(f"{os.fsdecode(root_b)}: no such directory") from None
        except OSError as e:
            raise InvalidArgument(f"{os.fsdecode(root_b)}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"{os.fsdecode(root_b)} is not a directory")
        root_b = os.path.realpath(root_b)
        self._start_ns = time.time_ns()
        if self.store is not None and self.use_statcache:
            self._txn = self.store.env.begin(db=self.store.db["statcache"])
        try:
            entries: list[Entry] = []
            self._entry(root_b, b"", st, entries)
            self._walk(root_b, b"", entries)
            return entries
        finally:
            if self._txn is not None:
                self._txn.abort()
                self._txn = None
            self.reader.close()

    def _walk(self, abs_dir: bytes, rel_dir: bytes, entries: list[Entry]) -> None:
        try:
            with os.scandir(abs_dir) as it:
                children = sorted(it, key=lambda d: d.name)
        except OSError as e:
            raise InvalidArgument(f"cannot list {os.fsdecode(abs_dir)}: {e.strerror}") from None
        for d in children:
            rel = rel_dir + b"/" + d.name if rel_dir else d.name
            try:
                st = d.stat(follow_symlinks=False)
            except FileNotFoundError:
                self.stats.warnings.append(f"{os.fsdecode(d.path)}: vanished during scan")
                continue
            except OSError as e:  # ENAMETOOLONG past PATH_MAX, EIO...
                raise InvalidArgument(f"cannot stat {os.fsdecode(d.path)}: "
                                      f"{e.strerror}") from None
            if self._entry(d.path, rel, st, entries) and stat.S_ISDIR(st.st_mode):
                self._walk(d.path, rel, entries)

    def _entry(self, path: bytes, rel: bytes, st: os.stat_result, entries: list[Entry]) -> bool:
        mode = st.st_mode
        try:
            xattrs = read_xattrs(path)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise InvalidArgument(f"cannot read xattrs of {os.fsdecode(path)}: "
                                  f"{e.strerror}") from None
        e = Entry(rel, 0, stat.S_IMODE(mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                  xattrs=xattrs)
        if stat.S_ISREG(mode):
            if st.st_nlink > 1:
                first = self._links.get((st.st_dev, st.st_ino))
                if first is not None:
                    e.kind, e.target = HARDLINK, first
                    entries.append(e)
                    return True
                self._links[(st.st_dev, st.st_ino)] = rel
            e.kind = REG
            if not self._file(path, st, e):
                return False
        elif stat.S_ISDIR(mode):
            e.kind = DIR
        elif stat.S_ISLNK(mode):
            e.kind = SYMLINK
            try:
                e.target = os.readlink(path)
            except FileNotFoundError:
                return False
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            e.kind = CHR if stat.S_ISCHR(mode) else BLK
            e.rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        elif stat.S_ISFIFO(mode):
            e.kind = FIFO
        else:  # sockets cannot be recreated by a checkout; tar skips them too
            self.stats.warnings.append(f"{os.fsdecode(path)}: socket ignored")
            return False
        entries.append(e)
        return True

    def _file(self, path: bytes, st: os.stat_result, e: Entry) -> bool:
        self.stats.files += 1
        self.stats.bytes_total += st.st_size
        key = _INODE.pack(st.st_dev, st.st_ino)
        if self._txn is not None:
            raw = self._txn.get(key)  # the key is the inode: dev and ino match
            cached = decode_statcache(raw) if raw is not None else None
            if cached is not None:
                size, mtime, ctime, content, chunks = cached
                if (size, mtime, ctime) == (st.st_size, st.st_mtime_ns, st.st_ctime_ns):
                    e.size, e.content, e.chunks = size, content, chunks
                    self.stats.cache_hits += 1
                    if self.progress is not None:
                        self.progress(st.st_size)
                    return True
        read_start = time.time_ns()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            self.stats.warnings.append(f"{os.fsdecode(path)}: vanished during scan")
            return False
        except OSError as err:
            raise InvalidArgument(f"cannot read {os.fsdecode(path)}: {err.strerror}") from None
        try:
            fst = os.fstat(fd)
            if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                self.stats.warnings.append(f"{os.fsdecode(path)}: replaced during scan")
            try:
                e.content, e.chunks, e.size = self.reader.read(fd, st.st_size, self.progress)
            except OSError as err:
                raise InvalidArgument(
                    f"cannot read {os.fsdecode(path)}: {err.strerror}") from None
            after = os.fstat(fd)
        finally:
            os.close(fd)
        if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (
                st.st_size, st.st_mtime_ns, st.st_ctime_ns):
            self.stats.warnings.append(f"{os.fsdecode(path)}: changed as we read it")
        elif self.use_statcache and st.st_ctime_ns < read_start - RACY_NS:
            self.statcache_updates.append((key, encode_statcache(
                e.size, st.st_mtime_ns, st.st_ctime_ns, e.content, e.chunks)))
        e.mtime_ns = st.st_mtime_ns
        return True


# C0 and C1 controls, DEL and the Unicode line separators: everything that would break
# a message's line or drive the terminal.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0))}
_ESCAPES.update({0x0a: "\\n", 0x0d: "\\r", 0x09: "\\t", 0x2028: "\\u2028",
                 0x2029: "\\u2029"})


def one_line(text: str) -> str:
    """`text` (a message that may hold file names) on one line: control characters
    escaped, and bytes of names that are not UTF-8 (surrogate escapes) as \\xNN."""
    text = text.translate(_ESCAPES)
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def warn(stats: ScanStats) -> None:
    for w in stats.warnings:
        print(f"pylayers: warning: {one_line(w)}", file=sys.stderr)

