"""The stat cache: which content a file had when it was last stored.

Keyed by the file's inode (dev, ino); the value holds the size, mtime and ctime seen
then and the content id and chunk list read (docs/format.md, "The index"). A scan
trusts an entry only when size, mtime *and* ctime are unchanged: any write moves the
ctime, and the ctime cannot be set back.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from ..store.ingest import CHUNK_REF

STATCACHE = struct.Struct("<Qqq32s")  # size, mtime_ns, ctime_ns, content id
INODE = struct.Struct("<QQ")  # the stat cache's key: dev, ino
# A cache entry is recorded only if the file's ctime is this much older than the moment
# we began reading it: timestamps are coarse, so a write in the same tick as our read
# could otherwise leave size, mtime and ctime unchanged (git's "racy" case).
RACY_NS = 1_000_000_000


def inode_key(dev: int, ino: int) -> bytes:
    return INODE.pack(dev, ino)


def encode_statcache(size: int, mtime_ns: int, ctime_ns: int, content: bytes,
                     chunks: bytes) -> bytes:
    """A stat-cache value (docs/format.md, "The index"): the chunk list is left out
    when the file is one chunk, whose id is then the content id."""
    if len(chunks) == CHUNK_REF.size and CHUNK_REF.unpack(chunks) == (content, size):
        chunks = b""
    return STATCACHE.pack(size, mtime_ns, ctime_ns, content) + chunks


def decode_statcache(value: bytes) -> tuple[int, int, int, bytes, bytes] | None:
    """(size, mtime_ns, ctime_ns, content id, packed chunk list), or None for a value
    of another length (a miss)."""
    if len(value) < STATCACHE.size or (len(value) - STATCACHE.size) % CHUNK_REF.size:
        return None
    size, mtime, ctime, content = STATCACHE.unpack_from(value)
    chunks = bytes(value[STATCACHE.size:])
    if not chunks and size:
        chunks = CHUNK_REF.pack(content, size)
    return size, mtime, ctime, content, chunks


_VALUE_LEN = struct.Struct("<I")


class StatCacheUpdates:
    """Stat-cache entries to write, (key, value) pairs packed in one bytearray: a
    snapshot of a million new files has a million of them, which as a list of tuples of
    two bytes objects cost about 220 bytes each; packed, about 75."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._n = 0

    def append(self, pair: tuple[bytes, bytes]) -> None:
        key, value = pair
        assert len(key) == INODE.size
        self._buf += key
        self._buf += _VALUE_LEN.pack(len(value))
        self._buf += value
        self._n += 1

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        buf, pos, klen = self._buf, 0, INODE.size
        while pos < len(buf):
            key = bytes(buf[pos : pos + klen])
            (n,) = _VALUE_LEN.unpack_from(buf, pos + klen)
            pos += klen + _VALUE_LEN.size
            yield key, bytes(buf[pos : pos + n])
            pos += n
