"""Walk caches: what a directory looked like when it was last snapshotted, so the next
snapshot reads only what changed (git's index, for a whole tree).

A snapshot keeps its native walk's records (csrc/walk.h) of the entries its tree holds,
and the id of the layer whose tree that is, in the `walkcache` table under the
directory's path key (docs/format.md, "Walk caches"). The next snapshot of the
directory compares its new walk with them in C (`_native.walk_compare`): an entry whose
lstat record is unchanged (same path, inode, size, mtime, ctime, ...) and was trusted
(its ctime settled before the walk that recorded it, its content read consistently)
is that layer's entry still, neither read nor even looked at in Python when that layer
is the new snapshot's parent. It replaces the per-inode stat cache of format 3: one
compressed value per directory, about 11-20 bytes a file, against about 120.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .._native import walk_compare
from ..errors import CorruptData

_HEAD = struct.Struct("<32sQ")  # layer id, raw length of the records
LEVEL = 1  # zstd level of the records: 11 bytes a file on a node_modules-like tree
MAX_RAW = 1 << 34  # a value claiming more is damage


@dataclass
class WalkCache:
    """A `walkcache` value: the layer whose tree the records describe, and the records."""

    layer_id: bytes
    records: bytes | memoryview

    def encode(self) -> bytes:
        import zstandard  # here: the unchanged path never needs it

        return _HEAD.pack(self.layer_id, len(self.records)) + \
            zstandard.ZstdCompressor(level=LEVEL, write_checksum=True).compress(self.records)

    @classmethod
    def decode(cls, value: bytes) -> WalkCache:
        if len(value) < _HEAD.size:
            raise CorruptData("walk cache entry is truncated")
        layer_id, raw = _HEAD.unpack_from(value)
        if raw > MAX_RAW:
            raise CorruptData("walk cache entry is malformed")
        import zstandard

        try:
            records = zstandard.ZstdDecompressor().decompress(
                value[_HEAD.size:], max_output_size=raw)
        except zstandard.ZstdError:
            raise CorruptData("walk cache entry does not decompress") from None
        if len(records) != raw:
            raise CorruptData("walk cache entry has the wrong length")
        return cls(layer_id, records)


@dataclass
class Comparison:
    """A new walk against a walk cache (`_native.walk_compare`)."""

    layer_id: bytes  # the layer whose tree the cache's records describe
    old: bytes  # the cache's records
    match: bytes  # per new record: 1 = that layer's entry still
    events: list[tuple[int, int, int, int]]  # (new i, new offset, old j, old offset)
    records: int
    files: int
    file_bytes: int
    hits: int
    hit_bytes: int


def compare(cache: WalkCache, new: bytes | memoryview) -> Comparison:
    match, events, totals = walk_compare(cache.records, new)
    return Comparison(cache.layer_id, cache.records, match, events, *totals)


__all__ = ["Comparison", "WalkCache", "compare"]
