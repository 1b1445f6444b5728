"""Reading a known sequence of chunks with a thread working ahead of the reader.

A checkout knows every chunk it will read, in order, before it writes the first file.
`read_ahead` looks them up (a few thousand per read transaction), reads and
decompresses each frame once for the run of chunks it holds, and verifies every chunk
against its id, on a background thread (pread, zstd and BLAKE3 release the GIL) while
the caller writes what is already done. The thread stays at most `ahead_bytes` of chunk
data in front; an error (a missing or damaged chunk) reaches the caller at the chunk it
concerns, in order, never earlier.

Because the whole sequence is known, a chunk that comes again later (the same file at
two paths, or the same bytes in two files) is kept, verified, until its last use, up to
`KEEP_BYTES`: otherwise its frame, long gone from the frame cache, would be read and
decompressed again for it (a third more frames on a pip-built env).
"""

from __future__ import annotations

import mmap
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import blake3

from ..errors import CorruptData, StoreError
from .packs import DELTA_CODECS, LOCATION_STRUCT, Frame, Location, PackReader, delta_into

if TYPE_CHECKING:
    from .repository import Store
    from .tables import Tables

_BATCH_BYTES = 4 << 20  # chunks handed over together, to keep queue operations few
_LOOKUP = 4096  # chunk ids looked up per read transaction
# the first look-up is smaller (then 4x larger each time up to _LOOKUP): the writer
# waits for the first chunk while its window's delta frames are read
_FIRST_LOOKUP = 256
KEEP_BYTES = 64 << 20  # chunks read again later, kept verified meanwhile
_SCRATCH_BYTES = 8 << 20  # a decompression buffer: a frame holds 4 MiB and one chunk more
_DELTA_BUFFER = 1 << 20  # a delta frame's buffer, at least (most hold one small file)
FRAME_CACHE = 8  # frames kept decompressed (a chain's new version interleaves old ones)
_DONE = object()


def _scratch() -> mmap.mmap:
    """A decompression buffer: anonymous memory, whose pages are mapped when first
    written (a bytearray is zeroed whole when made: 8 MiB written for a 4 MiB frame,
    ten buffers before a checkout's reader has filled its frame cache)."""
    return mmap.mmap(-1, _SCRATCH_BYTES)



def read_ahead(store: Store, cids: Iterable[bytes],
               ahead_bytes: int = 64 << 20) -> Iterator[bytes]:
    """The bytes of each chunk of `cids`, in order, each verified against its id.
    Closing the iterator early stops the thread."""
    ids = cids if isinstance(cids, list) else list(cids)
    batches: queue.Queue = queue.Queue(maxsize=max(1, ahead_bytes // _BATCH_BYTES))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                batches.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for batch in _batches(store, ids):
                if not put(batch):
                    return
            put(_DONE)
        except Exception as e:  # handed to the reader at this point of the sequence
            put(e)

    thread = threading.Thread(target=work, name="pylayers-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = batches.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield from item
    finally:
        stop.set()
        thread.join()


def _batches(store: Store, ids: list[bytes]) -> Iterator[list[bytes]]:
    """The verified chunks of `ids` in order, in lists of about _BATCH_BYTES. On an
    error, the chunks before the bad one are given first, then the exception."""
    batch: list[bytes] = []
    size = 0
    try:
        for data in verified_chunks(store, ids):
            if not isinstance(data, bytes):
                data = data.tobytes()
            batch.append(data)
            size += len(data)
            if size >= _BATCH_BYTES:
                yield batch
                batch, size = [], 0
    except Exception:
        yield batch
        raise
    if batch:
        yield batch


def verified_chunks(store: Store, ids: list[bytes],
                    prefetch: bool = False) -> Iterator[bytes | memoryview]:
    """The chunks of `ids`, in order, each verified against its id: bytes, or a view
    good until the next one is asked for (copy what is kept). Each frame is read and
    decompressed once for the run of chunks it holds, into one reused buffer; a chunk
    that comes again later is kept until its last use (up to KEEP_BYTES). Raises
    CorruptData at the first missing or damaged chunk. `prefetch`: the frames next
    asked for are decompressed ahead on threads (`_Prefetch`), for a process with a
    core to spare; closing the iterator early stops them."""
    frames = _Frames(store, prefetch=prefetch)
    try:
        yield from _verified(store, ids, frames)
    finally:
        frames.close()


def _verified(store: Store, ids: list[bytes], frames: _Frames) -> Iterator[bytes | memoryview]:
    last = {cid: i for i, cid in enumerate(ids)}  # each id's last position
    kept: dict[bytes, bytes] = {}
    kept_bytes = 0
    hasher = blake3.blake3
    unpack = LOCATION_STRUCT.unpack
    frame_pack, frame_offset = b"", -1
    frame = memoryview(b"")
    i = -1
    looked, size = 0, _FIRST_LOOKUP  # ids looked up so far; the next window's size
    while looked < len(ids):
        window = ids[looked : looked + size]
        looked += len(window)
        size = min(size * 4, _LOOKUP)
        with store.read() as t:
            raws = t.chunks.encoded_many(window)
            frames.plan(window, raws, i + 1)  # the prefetch threads start on them
            frames.read_deltas(t, raws)
        for cid, raw in zip(window, raws, strict=True):
            i += 1
            if kept and cid in kept:
                data = kept[cid]
                if last[cid] == i:
                    del kept[cid]
                    kept_bytes -= len(data)
                yield data
                continue
            if raw is None:
                raise CorruptData(f"chunk {cid.hex()} is missing from the store")
            pack, offset, _frame_len, start, length, _flags = unpack(raw)
            if offset != frame_offset or pack != frame_pack:
                frame_offset = -1
                frames.at = i
                frame = frames.get(Location.decode(raw))
                frame_pack, frame_offset = pack, offset
            end = start + length
            if end > len(frame):
                raise CorruptData(f"pack {pack.hex()}: chunk lies outside its frame")
            view = frame[start:end]
            if hasher(view).digest() != cid:
                if _flags & 1:  # a delta's output: a damaged base is named first
                    frames.check_base()
                raise CorruptData(f"chunk {cid.hex()} is damaged (pack {pack.hex()}, offset "
                                  f"{offset}): its bytes do not match its id")
            if last[cid] != i and kept_bytes + length <= KEEP_BYTES:
                data = kept[cid] = view.tobytes()
                kept_bytes += length
                yield data
            else:
                yield view


class _Prefetch:
    """Decompresses frames on threads of their own, in the order they are planned, each
    into a buffer from `free`. zstd releases the GIL while it decompresses, which is
    most of the work; the threads hold at most the buffers they were given. Each
    planned frame is an item, [location, who, done, result, buffer]: the reader waits
    for an item's `done` event and takes its result (the raw bytes or the exception
    met) and buffer. The reader may take a frame no thread has started (`take`), when
    the threads are behind (on a busy machine); the thread that comes to it skips it.

    Two threads by default: one alone is the checkout's longest stage on two cores,
    and falls behind whenever the scheduler gives its core to the writer; with two, a
    core left idle for a moment decompresses the next frame. Items and buffers are
    claimed together under `_claim`, in plan order, so the frame the reader waits for
    is never left without a buffer that a later frame holds."""

    WAITING, THREAD, READER = 0, 1, 2

    def __init__(self, reader: PackReader, buffers: int = 3, threads: int = 2) -> None:
        self.reader = reader
        self.todo: queue.SimpleQueue = queue.SimpleQueue()  # planned items; None: stop
        self.free: queue.SimpleQueue = queue.SimpleQueue()  # buffers; None: stop
        self.stop = False
        self.lock = threading.Lock()
        self._claim = threading.Lock()
        for _ in range(buffers):
            self.free.put(_scratch())
        self.threads = [threading.Thread(target=self._run, name="pylayers-decompress",
                                         daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    @staticmethod
    def item(loc: Location) -> list:
        return [loc, _Prefetch.WAITING, threading.Event(), None, None]

    def take(self, item: list) -> bool:
        """Whether the reader takes the planned frame `item` (no thread has started
        it)."""
        with self.lock:
            if item[1] == self.WAITING:
                item[1] = self.READER
                return True
            return False

    def _run(self) -> None:
        while True:
            with self._claim:
                item = self.todo.get()
                if item is None or self.stop:
                    return
                with self.lock:
                    mine = item[1] == self.WAITING
                    if mine:
                        item[1] = self.THREAD
                if not mine:  # the reader took it
                    continue
                buf = self.free.get()
            if buf is None:
                item[3] = StoreError("the checkout's frame prefetcher was stopped")
                item[2].set()
                return
            try:
                item[3] = self.reader.frame_into(item[0], buf)
            except Exception as e:  # raised where the reader asks for this frame
                item[3] = e
            item[4] = buf
            item[2].set()

    def close(self) -> None:
        self.stop = True
        for _ in self.threads:
            self.todo.put(None)
            self.free.put(None)
        for t in self.threads:
            t.join()


class _Frames:
    """The last few frames decompressed (a tree's chunks come from a few frames at a
    time: a new version's files from its own packs, between files unchanged since an
    older one), each in a buffer reused for another frame once it is the least
    recently used: no fresh memory, so no page faults, per frame decompressed. Delta
    frames (one file's new chunks, read once) are not kept: the frames around them
    are, and their bases are sliced from those.

    A delta's base is not verified here: every chunk of the delta's output is, by the
    caller, and a damaged base cannot make them match their ids. When one does not,
    the caller asks `check_base`, which verifies the base chunk by chunk, so the error
    names a damaged base as `Store.read_base` does. (Hashing and copying bases was a
    tenth of reading the last version from a six-version chain of a pip-built env,
    whose changed files are mostly deltas.)"""

    def __init__(self, store: Store, frames: int | None = None,
                 prefetch: bool = False) -> None:
        """`frames`: how many to keep (default FRAME_CACHE). `prefetch`: the frames
        `plan` is told of are decompressed ahead on threads; `close` stops them."""
        self.store = store
        self.reader: PackReader = store.reader
        self.frames = frames or FRAME_CACHE
        self._lru: OrderedDict[tuple[str, int], tuple[memoryview, mmap.mmap]] = OrderedDict()
        self._spare: mmap.mmap | None = None
        self._prefetch = _Prefetch(self.reader) if prefetch else None
        # frames given to the prefetcher, in order: the first chunk that needs each,
        # and the prefetcher's item for it
        self._planned: OrderedDict[tuple[str, int], tuple[int, list]] = OrderedDict()
        self.at = 0  # the chunk being read (set by the reader)
        self._met: set[bytes] = set()  # chunks planned for
        self._base_buf = bytearray()  # a base of several chunks, gathered
        self._last_base: list[bytes] = []  # the base of the last delta frame read
        # the last delta frames read: (raw bytes, base ids, the buffer holding them)
        self._deltas: OrderedDict[tuple[str, int],
                                  tuple[memoryview, list[bytes], bytearray | None]] = \
            OrderedDict()
        self._delta_spare = bytearray()  # the buffer of the delta frame let go last
        # the window's delta frames read, their bases' encoded locations (`read_deltas`)
        self._ready: dict[tuple[str, int], tuple[Frame, list[bytes | None]] | None] = {}

    def plan(self, ids: list[bytes], raws: list[bytes | None], first: int) -> None:
        """With prefetch threads: tell them the frames that the chunks `ids` (from the
        `first` of the sequence on) will be read from, given their encoded locations,
        except those kept now and chunks met before (the reader keeps them; delta
        frames, and the frames only their bases need, are read when asked for)."""
        if self._prefetch is None:
            return
        unpack = LOCATION_STRUCT.unpack
        met = self._met
        seen = None
        for i, cid, raw in zip(range(first, first + len(ids)), ids, raws, strict=True):
            if raw is None or cid in met:
                continue
            met.add(cid)
            pack, offset, _frame_len, _start, _length, flags = unpack(raw)
            if flags & 1 or (pack, offset) == seen:
                continue
            seen = (pack, offset)
            loc = Location.decode(raw)
            key = (loc.pack, offset)
            if key in self._lru or key in self._planned:
                continue
            item = _Prefetch.item(loc)
            self._planned[key] = (i, item)
            self._prefetch.todo.put(item)

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None
            self._planned.clear()

    def _prefetched(self, key: tuple[str, int]) -> tuple[memoryview, mmap.mmap] | None:
        """The frame `key` from the prefetch threads if it is the next one planned,
        else None (a base's frame planned for later is read here, now). Planned
        frames no longer wanted are let go first: those whose first chunk was passed
        (read otherwise, or each chunk kept from an earlier read) or that are kept
        now."""
        pf = self._prefetch
        while self._planned:
            head, (first, item) = next(iter(self._planned.items()))
            if head != key and first >= self.at and head not in self._lru:
                return None  # wanted later
            del self._planned[head]
            if pf.take(item):  # not started: read here if wanted, else never
                if head == key:
                    return None
                continue
            item[2].wait()
            view, buf = item[3], item[4]
            if head != key:
                pf.free.put(buf)
                continue
            if isinstance(view, BaseException):
                pf.free.put(buf)
                raise view
            if len(self._lru) >= self.frames:  # the prefetcher gets the buffer let go
                _old, (_view, old) = self._lru.popitem(last=False)
                pf.free.put(old)
            else:
                pf.free.put(_scratch())
            return view, buf
        return None

    def get(self, loc: Location) -> memoryview:
        """The frame's raw bytes, good until `frames` other frames were asked for (a
        delta frame's: a buffer of its own)."""
        if loc.delta:
            return self._delta(loc)
        key = (loc.pack, loc.offset)
        hit = self._lru.get(key)
        if hit is not None:
            self._lru.move_to_end(key)
            return hit[0]
        if self._planned:
            hit = self._prefetched(key)
            if hit is not None:
                self._lru[key] = hit
                return hit[0]
        buf, self._spare = self._spare, None
        if buf is None and len(self._lru) >= self.frames:
            _key, (_view, buf) = self._lru.popitem(last=False)
        if buf is None:
            buf = _scratch()
        try:
            view = self.reader.frame_into(loc, buf)
        except BaseException:
            self._spare = buf
            raise
        self._lru[key] = (view, buf)
        return view

    def read_deltas(self, t: Tables, raws: list[bytes | None]) -> None:
        """Read the delta frames of these encoded locations (a window of the chunks
        next asked for) and look their bases up in the window's transaction `t`: one
        lookup for them all, not a transaction a delta frame. A frame that cannot be
        read now is read again when it is asked for, and fails there."""
        self._ready.clear()
        locs: dict[tuple[str, int], Location] = {}
        for raw in raws:
            if raw is None or not raw[-1] & 1:
                continue
            loc = Location.decode(raw)
            key = (loc.pack, loc.offset)
            if key not in locs and key not in self._deltas:
                locs[key] = loc
        got: list[tuple[tuple[str, int], Frame]] = []
        ids: list[bytes] = []
        for key, frame in zip(locs, self.reader.read_frames(list(locs.values())),
                              strict=True):
            if frame is None:
                continue
            self._ready[key] = None
            got.append((key, frame))
            ids += frame.base
        found = t.chunks.encoded_many(ids)
        at = 0
        for key, frame in got:
            self._ready[key] = (frame, found[at : at + len(frame.base)])
            at += len(frame.base)

    def _delta(self, loc: Location) -> memoryview:
        """A delta frame's raw bytes, good until two other delta frames were read. The
        last two are kept: a file changed in places has its new chunks in a delta
        frame, between chunks of an older one, so its delta frame comes back. Each is
        decompressed into the buffer of the one let go last (`packs.delta_into`)."""
        key = (loc.pack, loc.offset)
        hit = self._deltas.get(key)
        if hit is not None:
            self._last_base = hit[1]
            return hit[0]
        ready = self._ready.pop(key, None)
        if ready is not None:
            frame, base_raws = ready
        else:
            frame, base_raws = self.reader.read_frame(loc), None
        self._last_base = frame.base
        if frame.codec not in DELTA_CODECS:  # the index says delta, the frame does not
            return memoryview(frame.raw())
        base = self._base(frame.base, base_raws)
        buf = self._delta_spare
        if len(buf) < frame.raw_len:
            buf = bytearray(max(frame.raw_len, _DELTA_BUFFER))
        try:
            raw = delta_into(frame, base, buf)
        except CorruptData:
            self.check_base()  # a damaged base is the likelier cause: named first
            raise
        held = raw.obj  # `buf` (bytes where zstd's cffi module is missing)
        self._delta_spare = bytearray()
        self._deltas[key] = (raw, frame.base, held if isinstance(held, bytearray) else None)
        if len(self._deltas) > 2:  # its buffer is the next delta frame's
            _key, (_raw, _base, spare) = self._deltas.popitem(last=False)
            if spare is not None:
                self._delta_spare = spare
        return raw

    def check_base(self) -> None:
        """Verify the base of the last delta frame read, chunk by chunk, through the
        store's own reader (`Store.read_base`): CorruptData naming the first missing
        or damaged one."""
        self.store.read_base(self._last_base)

    def _base(self, ids: list[bytes], raws: list[bytes | None] | None = None) -> memoryview:
        """A delta frame's base, its chunks sliced from the frames kept here (the
        frames a checkout reads anyway are not decompressed a second time in the pack
        reader's own cache), not verified: a view of a kept frame for a base of one
        chunk, else of a buffer reused for the next base, good until the next call.
        Missing, delta or unreadable chunks are CorruptData in `Store.read_base`'s
        words."""
        if raws is None:  # not looked up with the window's chunks
            with self.store.read() as t:
                raws = t.chunks.encoded_many(ids)
        locs = []
        for cid, raw in zip(ids, raws, strict=True):
            if raw is None:
                raise CorruptData(f"chunk {cid.hex()}, the base of a delta, is missing "
                                  "from the store")
            loc = Location.decode(raw)
            if loc.delta:
                raise CorruptData(f"chunk {cid.hex()}, the base of a delta, cannot be "
                                  f"read: pack {loc.pack}: the frame at offset "
                                  f"{loc.offset} is a delta but is read as the base of "
                                  "another")
            locs.append(loc)
        out = None
        if len(locs) > 1:
            total = sum(loc.length for loc in locs)
            if len(self._base_buf) < total:
                self._base_buf = bytearray(total)
            out = memoryview(self._base_buf)[:total]
        at = 0
        for cid, loc in zip(ids, locs, strict=True):
            try:
                frame = self.get(loc)
            except CorruptData as e:
                raise CorruptData(f"chunk {cid.hex()}, the base of a delta, cannot be "
                                  f"read: {e}") from None
            end = loc.start + loc.length
            piece = frame[loc.start : end]
            if end > len(frame):
                raise CorruptData(f"chunk {cid.hex()}, the base of a delta, is damaged "
                                  f"(pack {loc.pack}, offset {loc.offset}): its bytes do "
                                  "not match its id")
            if out is None:
                return piece
            out[at : at + loc.length] = piece  # copied now: a later chunk may evict it
            at += loc.length
        return out
