"""Ingest: file content into chunks, and chunks into the store.

`ContentReader` reads one open file, cuts it into chunks with the C core and hashes
them (chunk ids, and the whole file's BLAKE3 on a second thread); each chunk goes to a
sink, usually `ChunkWriter.put`. `ChunkWriter` appends new chunks to this process's
packs and indexes them on `commit`, after the packs are durable (restic's archiver
`FileSaver` and repository `SaveBlob` play these roles).
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import blake3

from ..chunking import Chunker, ChunkerParams, cut_points
from ..errors import StoreError
from .packs import DELTA_MAX, DELTA_MIN, FRAME_TARGET, Location, PackWriter

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from .repository import Store
    from .tables import Tables

BLOCK = 4 << 20  # bytes read from a file at a time
CHUNK_REF = struct.Struct("<32sI")  # a packed chunk list's item: chunk id, length
COMMIT_EVERY = 256 << 20  # bytes of new chunk data between index commits
NEAR_TRIES = 8  # `paths` entries looked at for a file's base
# A base that is not the path's own (a file of the same name nearby) is tried only
# while such deltas pay: reading a base decompresses its whole frame (4 MiB for a 2 KiB
# file), which on a tree of unrelated same-named files (node_modules' index.js, a
# first snapshot of random files) cost 27 s of a 100k-file snapshot's 28 s of CPU and
# saved nothing. The share of near deltas kept is a moving average (each attempt
# weighs NEAR_WEIGHT, and one kept lifts it to twice NEAR_MIN_RATE at least); below
# NEAR_MIN_RATE only one file in NEAR_RETRY tries one, so the writer notices when they
# start to pay again.
# Reading a base decompresses the frames holding it (FRAME_TARGET bytes each, unless the
# reader holds them already). Spread over a tree, the changed files of a small edit (1%
# of 100k files of 2 KiB) each need a different frame: 0.44 s of decompression for
# deltas saving about 1 KB each. Each file looking for a base adds BASE_READ_RATIO
# times its size to a budget, a frame read takes FRAME_TARGET from it, and a file whose
# base's frames the budget cannot pay for is stored without a delta. A rebuild or an
# upgrade (most files of a frame change) reads every frame it needs; a sparse edit,
# about one frame in eight.
BASE_READ_RATIO = 16
BASE_BUDGET_MAX = 64 * FRAME_TARGET
NEAR_WEIGHT = 0.1
NEAR_MIN_RATE = 0.25
NEAR_RETRY = 256
# ... or this many new chunks: what a commit has yet to index is held in memory (an id
# and a location each, about 300 bytes), and a tree of a million tiny files is a
# million chunks of 150 MB
COMMIT_CHUNKS = 1 << 16


def chunk_id(data) -> bytes:
    return blake3.blake3(data).digest()


# A version-like run: a hash of 7+ hex digits holding a digit, or digits and dots.
_VERSIONISH = re.compile(rb"(?=[0-9a-f]*[0-9])[0-9a-f]{7,}|[0-9][0-9.]*")


def normalise_name(name: bytes) -> bytes:
    """`name` lower-cased, its version-like runs collapsed: `libz-1a2b3c4d.so.1.3` and
    `libz-99aa00bb.so.1.3.1` are one name, as are `Pkg-1.2.dist-info` and
    `pkg-1.10.dist-info`."""
    return _VERSIONISH.sub(b"#", name.lower())


def path_key(path: bytes) -> bytes:
    """The `paths` table's key for a file's path (relative to its tree's root): BLAKE3
    prefixes of its normalised name (6 bytes), its normalised directory (4), its name
    (3) and its path (3), so that a new path finds its base by key prefix among the
    files nearest it (`PathTable.near`; docs/format.md, "Delta frames")."""
    directory, _, name = path.rpartition(b"/")
    return (blake3.blake3(normalise_name(name)).digest()[:6] + _directory_key(directory)
            + blake3.blake3(name).digest()[:3] + blake3.blake3(path).digest()[:3])


@functools.lru_cache(maxsize=256)
def _directory_key(directory: bytes) -> bytes:
    """`path_key`'s directory part: the same for every file of a directory, which a
    walk gives one after another."""
    return blake3.blake3(normalise_name(directory)).digest()[:4]


@dataclass
class IngestStats:
    files: int = 0
    bytes_read: int = 0
    new_chunks: int = 0
    new_bytes: int = 0


class ContentReader:
    """Reads one file's content into chunks; `sink(cid, data)` stores a chunk or, when
    None, nothing is stored (hash-only, for comparing a directory without storing)."""

    def __init__(self, params: ChunkerParams, sink: Callable[[bytes, bytes], bool] | None,
                 stats: IngestStats) -> None:
        self.params = params
        self.sink = sink
        self.stats = stats
        self._pool: ThreadPoolExecutor | None = None
        # told the path and size of each file `read` is given a path for, before its
        # chunks reach the sink, and None after (ChunkWriter.file_hint: deltas)
        self.on_file: Callable[[bytes | None, int], None] | None = None

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
            out.append(CHUNK_REF.pack(cid, len(piece)))

    def read(self, fd: int, size: int, progress=None,
             path: bytes | None = None) -> tuple[bytes, bytes, int]:
        """(content id, packed chunk list, bytes read) of the open file `fd`, reading at
        most `size` bytes (the size `lstat` saw): a file that grows while it is read is
        not read past it. Fewer bytes read than `size` means the file shrank. `path`:
        the file's path in its tree, for `on_file`."""
        hint = self.on_file if path is not None else None
        if hint is not None:
            hint(path, size)
        try:
            if size < BLOCK:  # the whole file in one read: no threads needed
                return self._read_small(_read_upto(fd, size), progress)
            return self._read_large(fd, size, progress)
        finally:
            if hint is not None:
                hint(None, 0)

    def read_inline(self, fd: int, size: int, progress=None) -> bytes:
        """The content of the small open file `fd` (at most `size` bytes), for its
        manifest entry: nothing is chunked or stored."""
        data = _read_upto(fd, size)
        self.stats.bytes_read += len(data)
        if progress is not None:
            progress(len(data))
        return data

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

    def _read_large(self, fd: int, limit: int, progress) -> tuple[bytes, bytes, int]:
        """Pipelined: while this thread reads and chunks block k, one worker hashes the
        whole file and another hashes block k-1's chunks (blake3 and the C scan release
        the GIL); chunks reach the sink in order, from this thread."""
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pylayers-hash")
        pool = self._pool
        chunker = Chunker.from_params(self.params)
        filehash = blake3.blake3()
        out: list[bytes] = []
        carry = bytearray()
        size = 0
        file_job = None
        chunk_job = None
        block = _read_upto(fd, min(BLOCK, limit))
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
            block = _read_upto(fd, min(BLOCK, limit - size))
        if chunk_job is not None:
            self._store(chunk_job[1], chunk_job[0].result(), out)
        if chunker.finish() is not None:
            tail = bytes(carry)
            self._store([tail], [blake3.blake3(tail).digest()], out)
        if file_job is not None:
            file_job.result()
        return filehash.digest(), b"".join(out), size


def _read_upto(fd: int, n: int) -> bytes:
    """Up to `n` bytes from `fd`: fewer only at end of file."""
    if n <= 0:
        return b""
    data = os.read(fd, n)
    if 0 < len(data) < n:  # a short read before EOF (FUSE, network filesystems)
        parts = [data]
        got = len(data)
        while got < n:
            more = os.read(fd, n - got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        data = b"".join(parts)
    return data


def _hash_pieces(pieces: list) -> list[bytes]:
    return [blake3.blake3(piece).digest() for piece in pieces]


class _File:
    """The file whose chunks `ChunkWriter.put` is receiving (see `file_hint`)."""

    __slots__ = ("key", "size", "ids", "group", "group_bytes", "base", "new", "partial")

    def __init__(self, key: bytes, size: int) -> None:
        self.key = key
        self.size = size
        self.ids: list[bytes] = []  # every chunk of the file, in order
        self.group: list[tuple[bytes, bytes]] = []  # new chunks held for a delta
        self.group_bytes = 0
        # the base chosen: its chunk ids, their locations, its length, whether it is the
        # path's own; False: none; None: not looked up yet
        self.base: tuple[list[bytes], list[Location], int, bool] | None | bool = None
        self.new = False  # a chunk of it was new
        self.partial = False  # a commit came in the middle of it


class ChunkWriter:
    """Adds chunks to the store for one writing job (a snapshot, an import).

    `put` returns whether the chunk was new. Nothing is visible to other processes until
    `commit`, which makes the data durable first and then indexes it in one write
    transaction, together with whatever `extra(tables)` writes there (a layer record, a
    tag) after checking what it needs to (a parent that must still exist).

    Deltas (docs/format.md, "Delta frames"): between `file_hint(path, size)` and
    `file_hint(None)`, the chunks put are one file's. If its new chunks have a base —
    the last version of a file at the same path stored without deltas, from the
    `paths` table — they are compressed together as one delta frame against it, kept
    when that is worth it (`packs.encode_delta_frame`). A file stored without deltas
    becomes its path's base at `commit`.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.pack = PackWriter(store.packs_root, store.config.compression_level,
                               version=store.config.version)
        self._pending: set[bytes] = set()
        self._uncommitted = 0
        self.new_chunks = 0
        self.new_bytes = 0
        self._file: _File | None = None
        self._path_candidates: list[tuple[bytes, list[bytes]]] = []
        self._near_rate = 1.0  # the moving share of near deltas kept (NEAR_WEIGHT)
        self._near_pending = 0  # near deltas whose outcome is not in yet
        self._base_budget = FRAME_TARGET  # bytes of frames base reads may decompress
        # the frames of the bases last paid for, as many as the reader keeps
        self._charged: OrderedDict[tuple[str, int], None] = OrderedDict()
        self.bases_skipped = 0  # files stored whole: their base's frames cost too much
        self._near_skipped = 0
        self._begin_read()

    def _begin_read(self) -> None:
        self._txn, self._tables = self.store._index.begin()
        # nothing to look up in an empty table (a first snapshot into a new store): no
        # base to look for a file, no index lookup a chunk
        self._no_paths = self._tables.paths.count() == 0
        self._index_has = None if self._tables.chunks.count() == 0 else self._tables.chunks.has

    def has(self, cid: bytes) -> bool:
        if cid in self._pending:
            return True
        return self._index_has is not None and self._index_has(cid)

    def file_hint(self, path: bytes | None, size: int = 0) -> None:
        """The chunks `put` from now until the next call are the content of the file
        at `path` (relative to its tree's root), `size` bytes; None: no file now."""
        self._end_file()
        if path is not None and DELTA_MIN <= size <= DELTA_MAX:
            self._file = _File(path_key(path), size)

    def _end_file(self) -> None:
        f, self._file = self._file, None
        if f is None:
            return
        self._flush_group(f)
        if f.new and not f.partial:
            self._path_candidates.append((f.key, f.ids))

    def _flush_group(self, f: _File) -> None:
        if f.group:
            ids, locs, base_len, own = f.base
            group, f.group, f.group_bytes = f.group, [], 0
            # the base is read on the writer's worker thread, beside this one (its
            # frames' decompression was a sixth of an upgrade's CPU, all on this thread)
            if not own:
                self._near_pending += 1
            self.pack.add_delta(group, ids, functools.partial(self.store.read_base, ids, locs),
                                on_result=None if own else self._near_result,
                                base_len=base_len)

    def _near_result(self, kept: bool) -> None:
        self._near_pending -= 1
        self._near_rate += NEAR_WEIGHT * (kept - self._near_rate)
        if kept:  # one that pays opens the way again at once (7 failures close it)
            self._near_rate = max(self._near_rate, 2 * NEAR_MIN_RATE)

    def _near_hopeful(self) -> bool:
        """Whether near deltas would still be worth trying if every one whose outcome
        is not in yet failed."""
        return self._near_rate * (1 - NEAR_WEIGHT) ** self._near_pending >= NEAR_MIN_RATE

    def _near_worth(self) -> bool:
        """Whether to try a near base (not the path's own) for this file. Deltas are
        made on worker threads, dozens of files behind: while the attempts not yet
        decided could bring the share under NEAR_MIN_RATE, wait for their outcomes
        (a tree of unrelated same-named files then tries about as many as when each
        outcome came at once)."""
        if self._near_hopeful():
            return True
        self.pack.poll()  # the outcome of deltas tried meanwhile
        while self._near_pending and not self._near_hopeful():
            self.pack.write_oldest()
        if self._near_rate >= NEAR_MIN_RATE:
            return True
        self._near_skipped += 1
        return self._near_skipped % NEAR_RETRY == 0

    def _base_of(self, f: _File) -> bool:
        """Look up (once per file) the base for the file's new chunks: the last version
        at its path, else (among the first few of the same name nearby, while such
        deltas pay) one whose size is within 4x of the file's."""
        if f.base is None:
            f.base = False
            if self._no_paths:
                return False
            self._base_budget = min(self._base_budget + BASE_READ_RATIO * f.size,
                                    BASE_BUDGET_MAX)
            for ids, own in itertools.islice(self._tables.paths.near(f.key), NEAR_TRIES):
                if not own and not self._near_worth():
                    break  # the path's own comes first: the rest are near ones
                locs = [self._tables.chunks.get(cid) for cid in ids]
                if not all(loc is not None and not loc.delta for loc in locs):
                    continue
                total = sum(loc.length for loc in locs)
                if total > DELTA_MAX or not (own or f.size <= 4 * total <= 16 * f.size):
                    continue
                reader, charged = self.store.reader, self._charged
                frames = set()
                for loc in locs:
                    key = (loc.pack, loc.offset)
                    if key in charged:
                        charged.move_to_end(key)
                    elif not reader.holds(loc):
                        frames.add(key)
                cost = FRAME_TARGET * len(frames)
                if cost > self._base_budget:
                    self.bases_skipped += 1
                    break
                self._base_budget -= cost
                # read on a worker a little later: paid for now (and not again while
                # the reader can still hold them)
                for key in frames:
                    charged[key] = None
                while len(charged) > reader.cache_frames:
                    charged.popitem(last=False)
                # read when the delta is made (a damaged base: no delta, see
                # PackWriter.add_delta)
                f.base = (ids, locs, total, own)
                break
        return f.base is not False

    def put(self, cid: bytes, data) -> bool:
        f = self._file
        if f is not None:
            f.ids.append(cid)
        if self.has(cid):
            return False
        if f is not None:
            f.new = True
        if f is not None and f.group_bytes + len(data) <= DELTA_MAX and self._base_of(f):
            f.group.append((cid, bytes(data)))
            f.group_bytes += len(data)
        else:
            self.pack.add(cid, data)
        self._pending.add(cid)
        self.new_chunks += 1
        self.new_bytes += len(data)
        self._uncommitted += len(data)
        if self._uncommitted >= COMMIT_EVERY or len(self._pending) >= COMMIT_CHUNKS:
            self.commit()
        return True

    def commit(self, extra: Callable[[Tables], None] | None = None) -> None:
        if self._file is not None:  # in the middle of a file: what it has so far
            self._flush_group(self._file)
            self._file.partial = True
        written = self.pack.flush()
        candidates, self._path_candidates = self._path_candidates, []
        self._txn.abort()
        try:
            with self.store.write() as t:
                fresh = {cid: loc for cid, loc in written if t.chunks.add(cid, loc)}
                _update_paths(t, candidates, fresh)
                if extra is not None:
                    extra(t)
        except BaseException:
            self._begin_read()
            raise
        # The index points at these now; anything else this writer wrote is dead data
        # that close() removes.
        self.pack.keep(written)
        self._uncommitted = 0
        self._begin_read()
        # Chunks committed by this writer are now in the index, seen by the new txn.
        self._pending.clear()

    def close(self) -> None:
        self._file = None
        self._txn.abort()
        self.pack.close()

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _update_paths(t: Tables, candidates: list[tuple[bytes, list[bytes]]],
                  fresh: dict[bytes, Location]) -> None:
    """Each candidate file (its path key, its chunk ids) stored without deltas becomes
    the base for its path's next version. `fresh`: the locations this transaction
    indexed (no need to look them up)."""
    for key, ids in candidates:
        total = 0
        for cid in ids:
            loc = fresh.get(cid) or t.chunks.get(cid)
            if loc is None or loc.delta:
                break
            total += loc.length
        else:
            if total <= DELTA_MAX and t.paths.get(key) != ids:
                t.paths.put(key, ids)
