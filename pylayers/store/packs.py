"""Pack files and frames (docs/format.md, "Packs").

A pack is append-only: a 16-byte header, then frames. Each frame is self-describing
(the ids and lengths of its chunks precede the payload), so an index can be rebuilt
from packs alone and fsck can check a pack without the index.

Each writing process owns its packs; no two processes ever append to one file.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from .. import _native
from ..errors import CorruptData, StoreError
from .fsutil import fsync_dir

if TYPE_CHECKING:
    import mmap
    from concurrent.futures import Future, ThreadPoolExecutor

PACK_MAGIC = b"PLYRPACK"
PACK_VERSION = 1
PACK_HEADER = struct.Struct("<8sII")  # magic, version, reserved
FRAME_MAGIC = b"PLFR"
# magic, codec, reserved(1), nbase, nchunks, raw_len, stored_len,
# crc32 of (header w/o crc + table + base ids)
FRAME_HEADER = struct.Struct("<4sBxHIIII")
TABLE_ENTRY = struct.Struct("<32sI")  # chunk id, chunk length
BASE_ENTRY = 32  # a delta frame's base: chunk ids
CODEC_RAW = 0
CODEC_ZSTD = 1
CODEC_DELTA = 2  # zstd with the base's bytes as a raw-content dictionary
CODEC_PATCH = 3  # copies of the base and literals (csrc/patch.h), zstd-compressed
CODEC_ZSTD_X86 = 4  # zstd of the bytes through the x86 call filter (csrc/x86.h)
CODECS = (CODEC_RAW, CODEC_ZSTD, CODEC_DELTA, CODEC_PATCH, CODEC_ZSTD_X86)
DELTA_CODECS = (CODEC_DELTA, CODEC_PATCH)  # the frames that have a base
ZSTD_CODECS = (CODEC_ZSTD, CODEC_ZSTD_X86)  # one zstd frame of the raw bytes
# The first formats with patch frames and with x86 frames (config.FORMAT_VERSION): a
# store of an earlier one is read and written without them, so an earlier pylayers can
# still read it.
PATCH_FORMAT = 7
X86_FORMAT = 8
# A frame is put through the x86 call filter when it holds at least this many call or
# jump operands the filter converts per KiB: machine code. On the pip env of
# bench/pyenv_wheels.py (4 MiB frames at level 3) 121.16 MB -> 119.66 MB; on Debian's
# /usr/bin and /usr/lib/x86_64-linux-gnu 505.7 -> 487.1 MB. Any threshold from 2 to 5
# does within 0.1 MB as well; filtering every frame loses 0.2-0.5 MB of that, because
# the filter costs compression in frames of data (docs/format.md, "x86 frames").
X86_CALLS_PER_KIB = 3
X86_SAMPLES = 16
X86_SAMPLE_BYTES = 16 << 10

# Close a frame once it holds this much raw data. 4 MiB frames at zstd level 3 store a
# pip-built env within 0.3% of one `tar | zstd -3` stream, 3.5% smaller than 1 MiB
# frames (bench/bench_compression.py; docs/format.md, "Packs").
FRAME_TARGET = 4 << 20
# A frame buffer's size: the target and one chunk of the default chunker's largest.
FRAME_BUFFER = FRAME_TARGET + (256 << 10)
PACK_TARGET = 512 << 20  # start a new pack past this size
# Start writeback every so often, on a thread, so the final fsync does not wait for
# gigabytes of dirty pages (the kernel would otherwise hold them for up to 30 s).
SYNC_EVERY = 64 << 20
# A frame is kept raw unless compression saves at least this fraction.
MIN_SAVING = 0.03
# Before compressing a frame, TRIAL_SAMPLES samples of TRIAL_BYTES spread over it are
# compressed at level 1; when none of them saves MIN_SAVING the frame is stored raw
# without the full compression (already-compressed data: wheels, images, archives).
# One compressible sample is enough to compress the whole frame, so mixed frames lose
# nothing (measured: same size on a pip-built env, 1.4x faster on wheel files).
TRIAL_SAMPLES = 16
TRIAL_BYTES = 4096
# A frame's zstd hash table at level 3 (and up): 2^18 entries, where zstd's level 3 has
# 2^17 for a stream of any length. On the pip env of bench/pyenv_wheels.py (4 MiB frames,
# x86 frames as below) the store's first version is 0.8% smaller (121.86 -> 120.91 MB)
# for 4-8% more compression CPU; 2^19, 1.1% smaller for 9% more.
FRAME_HASH_LOG = 18
# gc's repack of cold packs compresses at least at this level: 7% smaller than level 3
# on a pip-built env at 0.4x its speed, and gc rewrites only packs that are mostly dead.
REPACK_LEVEL = 6


class Location(NamedTuple):
    """Where a chunk lives: the frame at `offset` in pack `pack`, and its slice of the
    frame's raw (decompressed) bytes; `delta` when that frame is a delta frame (reading
    it needs its base). Encoded as the value of the `chunks` index. (A named tuple: a
    checkout decodes one a chunk, and a frozen dataclass costs a few times more.)"""

    pack: str
    offset: int
    frame_len: int
    start: int
    length: int
    delta: bool = False

    def encode(self) -> bytes:
        return _LOCATION.pack(
            bytes.fromhex(self.pack), self.offset, self.frame_len, self.start, self.length,
            1 if self.delta else 0)

    @classmethod
    def decode(cls, data: bytes) -> Location:
        pack, offset, frame_len, start, length, flags = _LOCATION.unpack(data)
        name = _PACK_NAMES.get(pack)
        if name is None:
            if len(_PACK_NAMES) > 4096:
                _PACK_NAMES.clear()
            name = _PACK_NAMES[pack] = pack.hex()
        return cls(name, offset, frame_len, start, length, bool(flags & 1))


# pack id (16 bytes), offset, frame_len, start, length, u8 flags (bit 0: delta frame)
_LOCATION = LOCATION_STRUCT = struct.Struct("<16sQIIIB")
_PACK_NAMES: dict[bytes, str] = {}  # pack ids decoded (a store has few packs)


# One zstd compressor and one decompressor per thread (a context is reusable but not
# thread-safe), as restic keeps one encoder and decoder per repository.
_zstd = threading.local()


def _compressor(level: int, slot: str = "cctx"):
    """This thread's compressor in `slot`: "frame" (a frame's chunks: at level 3 and
    up with a hash table of at least 2^FRAME_HASH_LOG entries), "fast" (the fast
    trial's) or "cctx" (a patch's ops; a delta's chunks compressed alone)."""
    cctx, at = getattr(_zstd, slot, (None, None))
    if cctx is None or at != level:
        import zstandard  # here, not at the top: commands that store nothing new skip it

        params = zstandard.ZstdCompressionParameters
        if slot == "frame" and level >= 3 and \
                params.from_level(level).hash_log < FRAME_HASH_LOG:
            cctx = zstandard.ZstdCompressor(
                compression_params=params.from_level(level, hash_log=FRAME_HASH_LOG))
        else:
            cctx = zstandard.ZstdCompressor(level=level)
        setattr(_zstd, slot, (cctx, level))
    return cctx


def _decompressor():
    dctx = getattr(_zstd, "dctx", None)
    if dctx is None:
        import zstandard

        dctx = _zstd.dctx = zstandard.ZstdDecompressor()
    return dctx


def incompressible(raw: bytes) -> bool:
    """Whether a fast trial finds no part of `raw` worth compressing (see TRIAL_SAMPLES);
    False for data too short to sample."""
    if len(raw) < TRIAL_SAMPLES * TRIAL_BYTES * 4:
        return False
    fast = _compressor(1, "fast")
    step = len(raw) // TRIAL_SAMPLES
    limit = TRIAL_BYTES * (1 - MIN_SAVING)
    return all(len(fast.compress(raw[i * step : i * step + TRIAL_BYTES])) >= limit
               for i in range(TRIAL_SAMPLES))


def _frame_parts(codec: int, table: list[tuple[bytes, int]], raw_len: int, payload,
                 base_ids: list[bytes] = ()) -> tuple[bytes, object]:
    """A frame as two parts, written one after the other: its header, table of (chunk
    id, length) and base ids; and its payload (any buffer)."""
    entries = b"".join(TABLE_ENTRY.pack(cid, length) for cid, length in table)
    bases = b"".join(base_ids)
    head = FRAME_HEADER.pack(FRAME_MAGIC, codec, len(base_ids), len(table), raw_len,
                             len(payload), 0)
    crc = zlib.crc32(head[:-4] + entries + bases)
    return b"".join((head[:-4], struct.pack("<I", crc), entries, bases)), payload


def _assemble(codec: int, table: list[tuple[bytes, int]], raw_len: int, payload,
              base_ids: list[bytes] = ()) -> bytes:
    """A frame's bytes (`_frame_parts`, joined)."""
    return b"".join(_frame_parts(codec, table, raw_len, payload, base_ids))


def encode_frame(chunks: list[tuple[bytes, bytes]], level: int, x86: bool = True) -> bytes:
    """One frame of `chunks`: see `encode_raw_frame`."""
    raw = b"".join(data for _, data in chunks)
    return encode_raw_frame(raw, [(cid, len(data)) for cid, data in chunks], level, x86)


def encode_raw_frame(raw, table: list[tuple[bytes, int]], level: int,
                     x86: bool = True) -> bytes:
    """One frame of the chunks `table` lists, whose bytes, concatenated, are `raw` (any
    buffer): header, table of (id, length), payload (zstd, or raw if that is smaller or
    a fast trial finds nothing to compress; with `x86`, a store of X86_FORMAT, zstd of
    the bytes through the x86 call filter when they look like machine code); verified
    (`verify_frame`) before it is returned to be written."""
    return b"".join(_encode_parts(raw, table, level, x86))


def looks_like_x86(raw) -> bool:
    """Whether a frame's bytes hold X86_CALLS_PER_KIB call operands a KiB or more:
    counted in X86_SAMPLES samples of X86_SAMPLE_BYTES spread over it (counting all of
    a 4 MiB frame of code took 0.6 ms, a twentieth of compressing it), or in all of it
    when it is not much longer than the samples."""
    n = len(raw)
    if n <= 4 * X86_SAMPLES * X86_SAMPLE_BYTES:
        return _native.x86_calls(raw) * 1024 >= X86_CALLS_PER_KIB * n
    view, step = memoryview(raw), n // X86_SAMPLES
    calls = sum(_native.x86_calls(view[i * step : i * step + X86_SAMPLE_BYTES])
                for i in range(X86_SAMPLES))
    return calls * 1024 >= X86_CALLS_PER_KIB * X86_SAMPLES * X86_SAMPLE_BYTES


def _encode_parts(raw, table: list[tuple[bytes, int]], level: int,
                  x86: bool = True) -> tuple[bytes, object]:
    """`encode_raw_frame` as `_frame_parts`: a raw frame's payload is `raw` itself, not
    a copy."""
    raw_len = len(raw)
    codec, payload = CODEC_RAW, raw
    if level > 0 and raw_len and not incompressible(raw):
        source, zcodec = raw, CODEC_ZSTD
        if x86 and looks_like_x86(raw):
            source, zcodec = bytearray(raw), CODEC_ZSTD_X86
            _native.x86_filter(source, True)
        packed = _compressor(level, "frame").compress(source)
        if len(packed) < raw_len * (1 - MIN_SAVING):
            codec, payload = zcodec, packed
    head, payload = _frame_parts(codec, table, raw_len, payload)
    _verify(head, payload, raw)
    return head, payload


def _encode_buffer(buf: bytearray, n: int, table: list[tuple[bytes, int]], level: int,
                   x86: bool = True) -> tuple[bytes, object]:
    """`_encode_parts` of `buf[:n]`, without copying it. A raw frame's payload is a view
    of `buf`: the writer reuses `buf` only once the frame is written."""
    return _encode_parts(memoryview(buf)[:n], table, level, x86)


# Deltas (docs/format.md, "Delta frames"): a file's new chunks compressed with its
# previous version's bytes as the dictionary. Files and bases of at most DELTA_MAX
# bytes only, so memory stays bounded (the base, the file's new chunks and zstd's
# tables, whose size is capped by DELTA_HASH_LOG, per compressing thread).
DELTA_MAX = 16 << 20
# Smaller files are not worth it: a delta frame's header (24 bytes, 36 a chunk, 32 a
# base chunk) and the file's `paths` entry (about 70 bytes of index) cost about what
# a delta saves on them; and trees of many tiny files keep no index entry per file.
DELTA_MIN = 512
# 2^20 entries: on the pip env's v4 -> v5 upgrade (2508 deltas, 109 MB of new chunks
# against 126 MB of bases) 2^22 took 0.60 s of CPU, 2^20 0.38-0.42 s for 0.5% more
# payload (7.50 MB instead of 7.46), 2^19 0.36-0.39 s for 24% more: a larger table
# costs cache misses and its clearing per delta, and matches are found without it.
DELTA_HASH_LOG = 20
# A delta frame is kept when it is at most this share of the same chunks compressed
# alone (what it costs besides: each read of it reads its base too). Measured on a
# patch-release upgrade (docs/format.md, "Delta frames"): no changed file fell between
# 0.9 and 1.0, and the 5 between 0.75 and 0.9 were large shared libraries that a delta
# still made 20% smaller (0.56 MB of 2.9).
DELTA_KEEP = 0.9
DELTA_EARLY = 16
# A patch may hold 1/PATCH_LITERALS of its bytes as literals (bytes changed in place do
# not count): past that its scan stops, and the file is tried as a zstd delta (whose
# matches need not be 16 bytes long). On the pip env's v4 -> v5 upgrade, 1/32 left 248
# of 2,508 files to zstd, 1/4 left 46, for the same CPU and 7% smaller deltas; 1/2 made
# patches of 22 more, 1.5% smaller.
PATCH_LITERALS = 4
# Jobs a writer keeps queued at most, and their bytes (new chunks and bases) in frames
# of FRAME_BUFFER per thread (see PackWriter._wait_room). Frames are written in order,
# so a slow job (a 10 MB library's delta) stops the caller once the jobs queued behind
# it reach these; then both workers soon run dry. On the pip env's v4 -> v5 upgrade
# (2,508 deltas, mostly of small files), 64 jobs and 2 frames a thread: 0.92 s;
# 256 and 4: 0.84 s (1024 and 16: 0.84 s, more CPU).
PENDING_MAX = 256
PENDING_FRAMES = 4


def _delta_params(level: int, base_len: int, raw_len: int):
    import zstandard

    # the window and the match finder's tables must reach across the whole base, or
    # zstd only finds matches in its last few hundred KiB (measured: no gain at all on
    # a 3 MiB file with the default parameters)
    wlog = max(10, min(27, (base_len + raw_len).bit_length()))
    hlog = min(wlog, DELTA_HASH_LOG)
    return zstandard.ZstdCompressionParameters.from_level(
        level, source_size=raw_len, window_log=wlog, hash_log=hlog, chain_log=hlog)


def _raw_dict(base: bytes | memoryview):
    import zstandard

    return zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def encode_delta_frame(chunks: list[tuple[bytes, bytes]], base_ids: list[bytes],
                       base: bytes, level: int, force: bool = False,
                       patch: bool = True) -> bytes | None:
    """A delta frame of `chunks` against `base` (the bytes of the chunks `base_ids`,
    concatenated); None when it is not worth it: unless `force`, the frame must be at
    most DELTA_KEEP of the chunks compressed alone (one of at most 1/DELTA_EARLY of
    their bytes is kept without comparing). With `patch` (a store of PATCH_FORMAT), a
    patch frame is tried first, and a zstd delta only when no patch could be made or it
    is not worth it. Verified before it is returned."""
    import zstandard

    raw = b"".join(data for _, data in chunks)
    table = [(cid, len(data)) for cid, data in chunks]
    alone: list[int] = []  # the chunks compressed alone, once a decision needs it

    def worth(payload: bytes) -> bool:
        cost = len(payload) + BASE_ENTRY * len(base_ids)
        # at most 1/16 of its bytes: only data that compresses 16x alone could beat it
        if force or cost * DELTA_EARLY <= len(raw):
            return True
        if not alone:
            alone.append(len(_compressor(max(level, 1)).compress(raw)))
        return cost <= DELTA_KEEP * min(alone[0], len(raw))

    if patch:
        # Copies of the base and the bytes between them (csrc/patch.h): no base loaded
        # into zstd's match finder, which was most of a delta's CPU. On the pip env's
        # v4 -> v5 upgrade (2,508 deltas) 2,461 are patches: the deltas' CPU 0.57 ->
        # 0.47 s and their payloads 7.66 -> 7.14 MB (docs/format.md, "Patch frames").
        ops = _native.patch_make(raw, base, len(raw) // PATCH_LITERALS,
                                 len(raw) + len(raw) // 8 + 64, _patch_table(len(base)))
        if ops is not None:
            payload = _compressor(max(level, 1)).compress(ops)
            if worth(payload):
                frame = _assemble(CODEC_PATCH, table, len(raw), payload, base_ids)
                verify_frame(frame, raw, base)
                return frame
    # The base does most of the work: at the default levels a delta is compressed at
    # level 1 (loading the base into the match finder is the cost). On the pip env's
    # first upgrade (746 deltas, 35.7 MB against 47.4 MB of bases): 0.35 s of CPU
    # instead of 0.58 s, payloads 3.19 MB instead of 3.08 MB.
    cctx = zstandard.ZstdCompressor(
        dict_data=_raw_dict(base),
        compression_params=_delta_params(1 if level <= 3 else level, len(base), len(raw)))
    payload = cctx.compress(raw)
    if not worth(payload):
        return None
    frame = _assemble(CODEC_DELTA, table, len(raw), payload, base_ids)
    verify_frame(frame, raw, base)
    return frame


def _patch_table(base_len: int) -> bytearray:
    """This thread's table for patch scans, large enough for a base of `base_len` bytes
    (at most DELTA_MAX: 16 MiB of table). A new table a patch cost page faults, each
    copied from the zero page once written, with a TLB flush on both cores: 5% of an
    upgrade's CPU time."""
    need = _native.patch_table_bytes(base_len)
    table = getattr(_zstd, "patch_table", None)
    if table is None or len(table) < need:
        table = _zstd.patch_table = bytearray(need)
    return table


def _delta_job(chunks: list[tuple[bytes, bytes]], base_ids: list[bytes],
               base: bytes | Callable[[], bytes], level: int, force: bool,
               patch: bool = True) -> bytes | None:
    """`encode_delta_frame` on a worker thread, reading the base first when `base` is
    a reader: a base that cannot be read (damaged, or a pack read fails) means no
    delta, as a base found damaged when looked up does."""
    if callable(base):
        try:
            base = base()
        except (CorruptData, OSError):
            return None
    return encode_delta_frame(chunks, base_ids, base, level, force, patch)


def verify_frame(frame: bytes, raw, base: bytes | None = None) -> None:
    """Parse and decompress a frame just encoded, and compare it with the bytes it must
    hold (`raw`, any buffer; restic's verifyCiphertext): a compressor or memory fault
    must be caught while the source is still at hand, not by a later read or fsck.
    StoreError if not."""
    _verify(frame, None, raw, base)


def _verify(head: bytes, payload, raw, base: bytes | None = None) -> None:
    """`verify_frame` of the frame `head` + `payload` (`_frame_parts`), or of `head`
    alone when `payload` is None. A zstd frame is decompressed into this thread's
    reused buffer (a new 4 MiB buffer a frame cost a page fault per 4 KiB)."""
    where = "a frame just encoded"
    try:
        if payload is None:
            frame = decode_frame(head, 0, where)
        else:
            frame, start = _decode_head(head, 0, where, len(head) + len(payload))
            if start != len(head) or frame.length != start + len(payload):
                raise CorruptData(f"{where}: its payload does not follow its table")
            frame.payload = payload
        if frame.codec in ZSTD_CODECS:
            got = _decompress_into(frame, _scratch(frame.raw_len))
        elif frame.codec == CODEC_RAW and frame.payload is raw:
            got = raw  # the frame's payload is the very buffer: nothing to compare
        elif frame.codec in DELTA_CODECS and base is not None:
            # into the same buffer, the base taken by reference: a new buffer and a
            # zstd dictionary (a copy of the base) a delta held the GIL while made
            got = delta_into(frame, base, _scratch(frame.raw_len))
        else:
            got = frame.raw(base)
    except CorruptData as e:
        raise StoreError(f"a frame just encoded does not decode ({e}); "
                         "nothing was stored") from None
    if got is raw:
        return
    # startswith: a memcmp (comparing two memoryviews goes byte by byte, 15x slower);
    # a view from _decompress_into starts at its buffer's start
    whole = got.obj if isinstance(got, memoryview) else got
    if len(got) != len(raw) or not whole.startswith(raw):
        raise StoreError("a frame just encoded does not decompress to the data it was made "
                         "of; nothing was stored")


def _scratch(n: int) -> bytearray:
    """This thread's reusable buffer for decompressing, at least `n` bytes."""
    buf = getattr(_zstd, "scratch", None)
    if buf is None or len(buf) < n:
        buf = _zstd.scratch = bytearray(max(n, FRAME_BUFFER))
    return buf


def _decompress_into(frame: Frame, scratch: bytearray | mmap.mmap) -> memoryview:
    """A zstd frame's raw bytes, decompressed into `scratch` when it is large enough
    (else into a new buffer), and put back through the x86 call filter for an x86
    frame. CorruptData if they are not exactly `raw_len` bytes."""
    import zstandard

    n = frame.raw_len
    out = memoryview(scratch if len(scratch) >= n else bytearray(n))[:n]
    got = 0
    try:
        with _decompressor().stream_reader(frame.payload) as r:
            while got < n:
                k = r.readinto(out[got:])
                if not k:
                    break
                got += k
            extra = r.read(1)
    except zstandard.ZstdError as e:
        raise CorruptData(f"frame at offset {frame.offset}: cannot decompress: {e}") from None
    if got != n or extra:
        raise CorruptData(f"frame at offset {frame.offset}: wrong decompressed length")
    if frame.codec == CODEC_ZSTD_X86:
        _native.x86_filter(out, False)
    return out


_NO_LIB = object()
_ZSTD_DICT_MAGIC = b"\x37\xa4\x30\xec"  # what a zstd dictionary (not raw content) starts with


def _zstd_lib():
    """python-zstandard's cffi binding of its own libzstd (`zstandard._cffi`, shipped
    beside the C backend), or None where this install lacks it."""
    lib = getattr(_zstd, "lib", None)
    if lib is None:
        try:
            from zstandard._cffi import ffi
            from zstandard._cffi import lib as zstd_lib
        except ImportError:
            lib = _NO_LIB
        else:
            lib = (ffi, zstd_lib)
        _zstd.lib = lib
    return None if lib is _NO_LIB else lib


def _patch_raw(frame: Frame, base, into: bytearray | None = None) -> bytes | memoryview:
    """A patch frame's raw bytes (into `into` when given and long enough): its op stream
    decompressed, then applied to `base`. CorruptData if either fails."""
    import zstandard

    where = f"frame at offset {frame.offset}"
    # the op stream is at most what pl_patch_make may write: a payload claiming more is
    # damage, not an allocation
    limit = frame.raw_len + frame.raw_len // 8 + 64
    try:
        size = zstandard.frame_content_size(frame.payload)
        if size > limit:
            raise CorruptData(f"{where}: its patch is too long")
        ops = _decompressor().decompress(frame.payload, max_output_size=limit)
    except zstandard.ZstdError as e:
        raise CorruptData(f"{where}: cannot decompress: {e}") from None
    try:
        return _native.patch_apply(ops, base, frame.raw_len, into)
    except CorruptData as e:
        raise CorruptData(f"{where}: {e}") from None


def delta_into(frame: Frame, base: bytes | bytearray | memoryview,
               out: bytearray) -> memoryview:
    """A delta frame's raw bytes, decompressed into `out` (a new buffer if it is
    shorter than the frame) with `base` as zstd's raw-content prefix, taken by
    reference: no copy of the base into a dictionary and no new decompression
    context a frame (this thread's is reused), which on a checkout of a chain of
    versions, thousands of delta frames of a few KiB, cost a third more than the
    decompression itself. CorruptData unless the payload decompresses to exactly
    `raw_len` bytes. Where python-zstandard comes without its cffi module, the same
    bytes by `Frame.raw`."""
    if frame.codec == CODEC_PATCH:
        return memoryview(_patch_raw(frame, base, out))
    if frame.codec != CODEC_DELTA:
        raise CorruptData(f"frame at offset {frame.offset}: not a delta frame")
    found = _zstd_lib()
    if found is None:
        return memoryview(frame.raw(base))
    ffi, lib = found
    n = frame.raw_len
    if len(out) < n:
        out = bytearray(n)
    dctx = getattr(_zstd, "delta_dctx", None)
    if dctx is None:
        dctx = lib.ZSTD_createDCtx()
        if dctx == ffi.NULL:
            raise MemoryError("cannot make a zstd decompression context")
        dctx = _zstd.delta_dctx = ffi.gc(dctx, lib.ZSTD_freeDCtx)
    payload = frame.payload
    # capacity exactly raw_len: a payload that holds more fails. One call a frame
    # where it can be (each releases and takes back the GIL, which a busy reader
    # process's other thread may hold): zstd takes a dictionary that does not start
    # with its dictionary magic as raw content; one that does is given as a prefix,
    # raw content whatever it starts with.
    if bytes(base[:4]) != _ZSTD_DICT_MAGIC:
        rc = lib.ZSTD_decompress_usingDict(dctx, ffi.from_buffer(out), n,
                                           ffi.from_buffer(payload), len(payload),
                                           ffi.from_buffer(base), len(base))
    else:
        rc = lib.ZSTD_DCtx_refPrefix_advanced(dctx, ffi.from_buffer(base), len(base),
                                              lib.ZSTD_dct_rawContent)
        if rc == 0:
            rc = lib.ZSTD_decompressDCtx(dctx, ffi.from_buffer(out), n,
                                         ffi.from_buffer(payload), len(payload))
    if rc != n:  # success is exactly n (an error code is a huge size_t)
        if lib.ZSTD_isError(rc):
            lib.ZSTD_DCtx_reset(dctx, lib.ZSTD_reset_session_and_parameters)
            name = ffi.string(lib.ZSTD_getErrorName(rc)).decode(errors="replace")
            raise CorruptData(f"frame at offset {frame.offset}: cannot decompress: {name}")
        raise CorruptData(f"frame at offset {frame.offset}: wrong decompressed length")
    return memoryview(out)[:n]


@dataclass
class Frame:
    offset: int
    length: int
    codec: int
    raw_len: int
    table: list[tuple[bytes, int]]  # (chunk id, length)
    payload: bytes
    base: list[bytes] = field(default_factory=list)  # a delta frame's base chunk ids

    def raw(self, base: bytes | memoryview | None = None) -> bytes:
        """The frame's chunks, concatenated; a delta frame needs its base's bytes (any
        buffer: zstd copies it into a dictionary of its own)."""
        if self.codec == CODEC_RAW:
            raw = self.payload
        else:
            import zstandard

            try:
                if self.codec == CODEC_DELTA:
                    if base is None:
                        raise CorruptData(f"frame at offset {self.offset}: a delta frame "
                                          "read without its base")
                    dctx = zstandard.ZstdDecompressor(dict_data=_raw_dict(base))
                    raw = dctx.decompress(self.payload, max_output_size=self.raw_len)
                elif self.codec == CODEC_PATCH:
                    if base is None:
                        raise CorruptData(f"frame at offset {self.offset}: a delta frame "
                                          "read without its base")
                    raw = _patch_raw(self, base)
                elif self.codec == CODEC_ZSTD_X86:
                    raw = _decompress_into(self, bytearray(self.raw_len)).obj
                else:
                    raw = _decompressor().decompress(self.payload,
                                                     max_output_size=self.raw_len)
            except zstandard.ZstdError as e:
                raise CorruptData(
                    f"frame at offset {self.offset}: cannot decompress: {e}") from None
        if len(raw) != self.raw_len:
            raise CorruptData(f"frame at offset {self.offset}: wrong decompressed length")
        return raw


def decode_frame(buf: bytes, offset: int, where: str) -> Frame:
    """Parse the frame starting at buf[0] (which is at `offset` in its pack)."""
    frame, start = _decode_head(buf, offset, where, len(buf))
    frame.payload = bytes(buf[start : frame.length])
    return frame


def _decode_head(buf: bytes, offset: int, where: str, size: int) -> tuple[Frame, int]:
    """Parse the header, table and base of the frame starting at buf[0], whose bytes
    from there on are `size` long (`buf` may end after the base): the frame, its
    payload left empty, and where its payload starts."""
    if len(buf) < FRAME_HEADER.size:
        raise CorruptData(f"{where}: truncated frame header at offset {offset}")
    magic, codec, nbase, n, raw_len, stored_len, crc = FRAME_HEADER.unpack_from(buf)
    if magic != FRAME_MAGIC or codec not in CODECS:
        raise CorruptData(f"{where}: no frame at offset {offset}")
    tend = FRAME_HEADER.size + n * TABLE_ENTRY.size
    bend = tend + nbase * BASE_ENTRY
    if len(buf) < bend or size < bend + stored_len:
        raise CorruptData(f"{where}: truncated frame at offset {offset}")
    if zlib.crc32(buf[: FRAME_HEADER.size - 4] + buf[FRAME_HEADER.size : bend]) != crc:
        raise CorruptData(f"{where}: frame header checksum mismatch at offset {offset}")
    if (codec in DELTA_CODECS) != (nbase > 0):
        raise CorruptData(f"{where}: frame at offset {offset} has a base but is no delta, "
                          "or is a delta without a base")
    table = [TABLE_ENTRY.unpack_from(buf, FRAME_HEADER.size + i * TABLE_ENTRY.size)
             for i in range(n)]
    if sum(length for _, length in table) != raw_len:
        raise CorruptData(f"{where}: frame table disagrees with its length at offset {offset}")
    base = [bytes(buf[tend + i * BASE_ENTRY : tend + (i + 1) * BASE_ENTRY])
            for i in range(nbase)]
    return Frame(offset, bend + stored_len, codec, raw_len, table, b"", base), bend


def frame_raw_len(f, offset: int) -> int | None:
    """The raw (decompressed) length a frame's header states, or None if there is no
    frame header at `offset` of the open pack `f`."""
    f.seek(offset)
    head = f.read(FRAME_HEADER.size)
    if len(head) < FRAME_HEADER.size:
        return None
    magic, codec, _nbase, _n, raw_len, _stored, _crc = FRAME_HEADER.unpack(head)
    if magic != FRAME_MAGIC or codec not in CODECS:
        return None
    return raw_len


def frame_base(f, offset: int) -> list[bytes] | None:
    """The base chunk ids of the delta frame at `offset` of the open pack `f` (its
    header checked), or None if there is no delta frame there."""
    f.seek(offset)
    head = f.read(FRAME_HEADER.size)
    if len(head) < FRAME_HEADER.size:
        return None
    magic, codec, nbase, n, _raw, _stored, crc = FRAME_HEADER.unpack(head)
    if magic != FRAME_MAGIC or codec not in DELTA_CODECS:
        return None
    rest = f.read(n * TABLE_ENTRY.size + nbase * BASE_ENTRY)
    if len(rest) < n * TABLE_ENTRY.size + nbase * BASE_ENTRY or \
            zlib.crc32(head[:-4] + rest) != crc:
        return None
    tend = n * TABLE_ENTRY.size
    return [rest[tend + i * BASE_ENTRY : tend + (i + 1) * BASE_ENTRY] for i in range(nbase)]


def pack_path(root: Path, pack: str) -> Path:
    return root / pack[:2] / f"{pack}.pack"


def iter_frames(path: Path) -> Iterator[Frame]:
    """Every frame of a pack, in order. Raises CorruptData at the first bad one; a
    truncated tail (a writer killed mid-frame) raises too, after the good frames."""
    with open(path, "rb") as f:
        head = f.read(PACK_HEADER.size)
        if len(head) < PACK_HEADER.size:
            raise CorruptData(f"{path.name}: truncated pack header")
        magic, version, _ = PACK_HEADER.unpack(head)
        if magic != PACK_MAGIC or version != PACK_VERSION:
            raise CorruptData(f"{path.name}: not a pack of version {PACK_VERSION}")
        offset = PACK_HEADER.size
        while True:
            head = f.read(FRAME_HEADER.size)
            if not head:
                return
            if len(head) < FRAME_HEADER.size:
                raise CorruptData(f"{path.name}: truncated frame at offset {offset}")
            _m, _c, nbase, n, _r, stored_len, _crc = FRAME_HEADER.unpack(head)
            rest = f.read(n * TABLE_ENTRY.size + nbase * BASE_ENTRY + stored_len)
            frame = decode_frame(head + rest, offset, path.name)
            yield frame
            offset += frame.length


class PackReader:
    """Reads chunks by location, keeping a few decompressed frames (sequential reads of
    one file hit the same frame many times). Safe to share between threads: files are
    read with pread, the caches are guarded by a lock, and frames are decompressed
    outside it (a thread that wants a frame another is decompressing waits for it)."""

    def __init__(self, root: Path, cache_frames: int = 8,
                 base_reader: Callable[[list[bytes]], bytes] | None = None) -> None:
        """`base_reader(ids)`: the bytes of a delta frame's base (the store's
        `read_base`, which verifies each chunk); without it a delta frame is an error."""
        self.root = root
        self.base_reader = base_reader
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._frames: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._bases: OrderedDict[tuple[bytes, ...], bytes] = OrderedDict()
        self.cache_frames = cache_frames
        self._loading: dict[tuple[str, int], threading.Event] = {}  # being decompressed
        self._lock = threading.Lock()
        self._active = 0  # threads inside pread
        self._retired: list[int] = []  # descriptors to close when none is

    def _read(self, pack: str, offset: int, length: int) -> bytes:
        with self._lock:
            fd = self._fds.get(pack)
            if fd is not None:
                self._fds.move_to_end(pack)
                self._active += 1
        if fd is None:
            try:
                new_fd = os.open(pack_path(self.root, pack), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise CorruptData(f"pack {pack} is missing") from None
            with self._lock:
                fd = self._fds.get(pack)
                if fd is None:
                    fd = self._fds[pack] = new_fd
                    if len(self._fds) > 64:  # closed once no thread is reading
                        self._retired.append(self._fds.popitem(last=False)[1])
                else:  # another thread opened it meanwhile
                    self._retired.append(new_fd)
                self._active += 1
        try:
            return os.pread(fd, length, offset)
        finally:
            with self._lock:
                self._active -= 1
                if not self._active and self._retired:
                    for old in self._retired:
                        os.close(old)
                    self._retired.clear()

    def holds(self, loc: Location) -> bool:
        """Whether the frame at `loc` is decompressed in the cache (reading it is free)."""
        with self._lock:
            return (loc.pack, loc.offset) in self._frames

    def frame_raw(self, loc: Location, delta_ok: bool = True,
                  base_reader: Callable[[list[bytes]], bytes] | None = None) -> bytes:
        """The frame's raw bytes. `delta_ok` False: a delta frame is an error (reading
        a base, which is never a delta: a damaged index must not make reads recurse).
        `base_reader`: reads a delta frame's base instead of the reader's own (a
        checkout's, from the frames it holds decompressed)."""
        key = (loc.pack, loc.offset)
        with self._lock:
            raw = self._frames.get(key)
            if raw is not None and (delta_ok or not loc.delta):
                self._frames.move_to_end(key)
                return raw
            # A frame another thread is decompressing is waited for, not decompressed
            # twice (a writer's two threads read the bases of neighbouring files: 30 of
            # 74 frames read for an upgrade's deltas were such doubles).
            loading = self._loading.get(key)
            if loading is None:
                loading = self._loading[key] = threading.Event()
                mine = True
            else:
                mine = False
        if not mine:
            loading.wait()
            with self._lock:
                raw = self._frames.get(key)
                if raw is not None and (delta_ok or not loc.delta):
                    self._frames.move_to_end(key)
                    return raw
            # it failed (read it for our own error), or was let go already
        try:
            buf = self._read(loc.pack, loc.offset, loc.frame_len)
            frame = decode_frame(buf, loc.offset, f"pack {loc.pack}")
            base = None
            if frame.codec in DELTA_CODECS:
                if not delta_ok:
                    raise CorruptData(f"pack {loc.pack}: the frame at offset {loc.offset} "
                                      "is a delta but is read as the base of another")
                base = self._base(frame.base, base_reader)
            raw = frame.raw(base)
            with self._lock:
                self._frames[key] = raw
                if len(self._frames) > self.cache_frames:
                    self._frames.popitem(last=False)
            return raw
        finally:
            if mine:
                with self._lock:
                    del self._loading[key]
                loading.set()

    def read_frame(self, loc: Location) -> Frame:
        """The frame at `loc`, read and parsed (its header checked), not decompressed
        and not cached: for a caller that decompresses it itself (a checkout's delta
        frames, read once, with a base it gathers from the frames it holds)."""
        return decode_frame(self._read(loc.pack, loc.offset, loc.frame_len), loc.offset,
                            f"pack {loc.pack}")

    def read_frames(self, locs: list[Location], gap: int = 64 << 10,
                    span: int = 4 << 20) -> list[Frame | None]:
        """The frames at `locs`, each read and parsed as `read_frame` does; frames of
        one pack close together (at most `gap` bytes between them, at most `span` in
        all) in one read: a checkout's delta frames, thousands of a few KiB, were
        written in runs (a six-version chain's 4,750 are 23 runs). None for a frame
        that cannot be read or parsed: `read_frame` of it raises the error."""
        out: list[Frame | None] = [None] * len(locs)
        order = sorted(range(len(locs)), key=lambda n: (locs[n].pack, locs[n].offset))
        i = 0
        while i < len(order):
            first = locs[order[i]]
            end = first.offset + first.frame_len
            j = i + 1
            while j < len(order):
                loc = locs[order[j]]
                if (loc.pack != first.pack or loc.offset - end > gap
                        or loc.offset + loc.frame_len - first.offset > span):
                    break
                end = max(end, loc.offset + loc.frame_len)
                j += 1
            try:
                buf = self._read(first.pack, first.offset, end - first.offset)
            except (CorruptData, OSError):
                buf = b""
            for n in order[i:j]:
                loc = locs[n]
                at = loc.offset - first.offset
                try:
                    out[n] = decode_frame(buf[at : at + loc.frame_len], loc.offset,
                                          f"pack {loc.pack}")
                except CorruptData:
                    pass
            i = j
        return out

    def frame_into(self, loc: Location, scratch: bytearray | mmap.mmap) -> memoryview:
        """The frame's raw bytes, decompressed into `scratch` when it is large enough
        (else into a new buffer), not cached: for a caller that reads frames one after
        the other and copies out what it keeps. Reusing one buffer spares a page fault
        per 4 KiB of every frame (a quarter of a checkout's decompression time). The
        view is good until the next call with the same `scratch`. A delta frame is read
        by `frame_raw`."""
        if loc.delta:
            return memoryview(self.frame_raw(loc))
        buf = self._read(loc.pack, loc.offset, loc.frame_len)
        frame = decode_frame(buf, loc.offset, f"pack {loc.pack}")
        if frame.codec not in ZSTD_CODECS:
            return memoryview(frame.raw())  # raw; or a delta the index does not know of
        return _decompress_into(frame, scratch)

    def _base(self, ids: list[bytes],
              base_reader: Callable[[list[bytes]], bytes] | None = None) -> bytes:
        key = tuple(ids)
        with self._lock:
            base = self._bases.get(key)
            if base is not None:
                self._bases.move_to_end(key)
                return base
        base_reader = base_reader or self.base_reader
        if base_reader is None:
            raise CorruptData("a delta frame cannot be read here (no base reader)")
        base = base_reader(ids)
        with self._lock:
            self._bases[key] = base
            if len(self._bases) > 2:
                self._bases.popitem(last=False)
        return base

    def read(self, loc: Location, delta_ok: bool = True) -> bytes:
        raw = self.frame_raw(loc, delta_ok)
        if loc.start + loc.length > len(raw):
            raise CorruptData(f"pack {loc.pack}: chunk lies outside its frame")
        return raw[loc.start : loc.start + loc.length]

    def close(self) -> None:
        with self._lock:
            for fd in [*self._fds.values(), *self._retired]:
                os.close(fd)
            self._fds.clear()
            self._retired.clear()
            self._frames.clear()
            self._bases.clear()


class PackWriter:
    """Appends chunks to new packs owned by this writer.

    `add` buffers chunks into a frame; full frames are compressed on worker threads
    (zstd releases the GIL) and written in order. `flush` makes everything added so far
    durable (fsync of pack and directory) and returns the locations to index — only then
    may an index entry point at them. Once the index does, the caller says so with
    `keep(locations)`; `close` removes whatever this writer wrote that was never kept (a
    failed or abandoned job leaves no dead data behind, which matters on a full disk).

    Write errors are raised as StoreError, so callers that read files while they store
    chunks do not mistake a full store for an unreadable source.
    """

    def __init__(self, root: Path, level: int, threads: int = 2,
                 version: int = X86_FORMAT) -> None:
        self.root = root
        self.level = level
        # the frames the store's format version has (an older store stays readable by
        # the pylayers that made it)
        self.patch = version >= PATCH_FORMAT  # deltas may be patch frames
        self.x86 = version >= X86_FORMAT  # frames of machine code may be x86 frames
        self._threads = threads
        # made at the first frame: a writer that stores nothing (an unchanged tree's
        # empty layer) does not import concurrent.futures (3 ms of its start-up)
        self._pool_: ThreadPoolExecutor | None = None
        # (frame being encoded, its table, for a delta: its chunks, stored in plain
        # frames instead when the delta is not worth it; else the frame's buffer; for a
        # delta, who to tell whether it was kept)
        self._pending: deque[tuple[Future, list[tuple[bytes, int]],
                                   list[tuple[bytes, bytes]] | None,
                                   bytearray | None,
                                   Callable[[bool], None] | None, int]] = deque()
        # bytes held by the pending jobs (a frame's buffer; a delta's chunks and base)
        self._pending_bytes = 0
        self.delta_frames = 0  # delta frames written
        self.delta_declined = 0  # delta attempts stored plain instead
        # The open frame: its chunks' bytes, copied into a buffer as they are added (no
        # bytes object a chunk, no join), its table. Buffers are reused once their frame
        # is written: a new 4 MiB buffer a frame cost a page fault per 4 KiB, 10% of a
        # first snapshot's CPU time.
        self._buf: bytearray | None = None
        self._fill = 0
        self._table: list[tuple[bytes, int]] = []
        self._spare: list[bytearray] = []
        self._file = None
        self._pack = ""
        self._offset = 0
        self._written: list[tuple[bytes, Location]] = []
        self.bytes_written = 0
        self._max_pending = threads * 2
        self._max_pending_bytes = threads * PENDING_FRAMES * FRAME_BUFFER
        self._syncer_: ThreadPoolExecutor | None = None
        self._sync_job: Future | None = None
        self._unsynced = 0
        self._dirty_dirs: set[Path] = set()
        self._created: list[str] = []  # packs this writer created, in order
        self._kept: dict[str, int] = {}  # pack -> end of the data the index points at

    @property
    def _pool(self) -> ThreadPoolExecutor:
        if self._pool_ is None:
            from concurrent.futures import ThreadPoolExecutor

            from .malloc import keep_freed_memory

            # frames, deltas' chunks and bases, files read whole: buffers of a few MiB
            # made and dropped by the thousand, each faulted in afresh by default
            # (store/malloc.py). Side by side, 9-15 runs each: the pip env's upgrades
            # v3 -> v4 0.58 -> 0.56 s (system time 0.25 -> 0.22 s), v4 -> v5 0.73 ->
            # 0.72 s (0.27 -> 0.23 s), its first snapshot 1.31 -> 1.28 s (0.30 -> 0.24
            # s); peak RSS 4-20 MB more.
            keep_freed_memory()
            self._pool_ = ThreadPoolExecutor(max_workers=self._threads,
                                             thread_name_prefix="pylayers-zstd")
        return self._pool_

    @property
    def _syncer(self) -> ThreadPoolExecutor:
        if self._syncer_ is None:
            from concurrent.futures import ThreadPoolExecutor

            self._syncer_ = ThreadPoolExecutor(max_workers=1,
                                               thread_name_prefix="pylayers-sync")
        return self._syncer_

    def _error(self, e: OSError) -> StoreError:
        what = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        return StoreError(f"cannot write to the store at {self.root.parent}: {what}")

    def add(self, cid: bytes, data) -> None:
        """Add one chunk (`data`: bytes or a byte memoryview, copied at once)."""
        self._append(cid, data)
        if self._fill >= FRAME_TARGET:
            try:
                self._close_frame()
            except OSError as e:
                raise self._error(e) from None

    def _append(self, cid: bytes, data) -> None:
        buf = self._buf
        if buf is None:
            buf = self._buf = self._spare.pop() if self._spare else bytearray(FRAME_BUFFER)
        start = self._fill
        end = start + len(data)
        if end > len(buf):  # a frame past FRAME_BUFFER: a larger buffer, never resized
            # in place (a view of it may outlive its frame's write)
            buf = bytearray(max(end, 2 * len(buf)))
            buf[:start] = memoryview(self._buf)[:start]
            self._buf = buf
        buf[start:end] = data
        self._fill = end
        self._table.append((cid, end - start))

    def add_delta(self, chunks: list[tuple[bytes, bytes]], base_ids: list[bytes],
                  base: bytes | Callable[[], bytes], force: bool = False,
                  on_result: Callable[[bool], None] | None = None,
                  base_len: int = 0) -> None:
        """Store `chunks` (one file's new chunks) as one delta frame against `base`
        (the bytes of the non-delta chunks `base_ids`), or, when that is not worth it
        (see `encode_delta_frame`; never with `force`), in plain frames. `base` may be
        a function that reads it (`Store.read_base`), then called on a worker thread,
        beside the caller (`base_len`: its length); when it raises CorruptData or
        OSError, the chunks go into plain frames. `on_result` is told which, once the
        frame is written (a few frames later)."""
        chunks = [(cid, bytes(data)) for cid, data in chunks]
        table = [(cid, len(data)) for cid, data in chunks]
        fut = self._pool.submit(_delta_job, chunks, base_ids, base, self.level, force,
                                self.patch)
        held = sum(n for _, n in table) + (base_len if callable(base) else len(base))
        self._pending.append((fut, table, chunks, None, on_result, held))
        self._pending_bytes += held
        try:
            self._wait_room()
        except OSError as e:
            raise self._error(e) from None

    def _wait_room(self) -> None:
        """Write out frames, in order, while too many jobs or bytes are pending.
        Bounded by bytes, deltas of small files queue up behind a large one (a few
        milliseconds each against tens for a 10 MB library) instead of stopping the
        caller's reads; plain frames, each a full buffer, stay about as few as before."""
        while len(self._pending) > 1 and (len(self._pending) > PENDING_MAX
                                          or self._pending_bytes > self._max_pending_bytes):
            self._write_one()

    def write_oldest(self) -> None:
        """Write out the oldest pending frame, waiting for it to be encoded (a
        delta's `on_result` is then told)."""
        if self._pending:
            try:
                self._write_one()
            except OSError as e:
                raise self._error(e) from None

    def poll(self) -> None:
        """Write out the frames already encoded, in order, without waiting for any."""
        try:
            while self._pending and self._pending[0][0].done():
                self._write_one()
        except OSError as e:
            raise self._error(e) from None

    def _close_frame(self) -> None:
        if not self._table:
            return
        buf, fill, table = self._buf, self._fill, self._table
        self._buf, self._fill, self._table = None, 0, []
        fut = self._pool.submit(_encode_buffer, buf, fill, table, self.level, self.x86)
        self._pending.append((fut, table, None, buf, None, len(buf)))
        self._pending_bytes += len(buf)
        self._wait_room()

    def _open_pack(self) -> None:
        self._pack = os.urandom(16).hex()
        path = pack_path(self.root, self._pack)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "xb")  # noqa: SIM115
        self._created.append(self._pack)
        self._file.write(PACK_HEADER.pack(PACK_MAGIC, PACK_VERSION, 0))
        self._offset = PACK_HEADER.size
        self._dirty_dirs = {path.parent}

    def _wait_sync(self) -> None:
        # A writeback error is reported once per open file: drop it and a later fsync of
        # the same file would succeed, and the index would point at data not on disk.
        job, self._sync_job = self._sync_job, None
        if job is not None:
            job.result()

    def _write_one(self) -> None:
        fut, table, delta_chunks, buf, on_result, held = self._pending.popleft()
        self._pending_bytes -= held
        # a delta frame's bytes, or a plain frame's two parts (a raw payload is a view
        # of `buf`, reused once it is written)
        frame = fut.result()
        del fut
        if on_result is not None:
            on_result(frame is not None)
        if frame is None:  # a delta not worth it: the chunks go into plain frames
            self.delta_declined += 1
            for cid, data in delta_chunks:
                self._append(cid, data)
            return
        delta = delta_chunks is not None
        self.delta_frames += delta
        if self._file is None:
            self._open_pack()
        parts = (frame,) if delta else frame
        for part in parts:
            self._file.write(part)
        frame_len = sum(len(part) for part in parts)
        del frame, parts
        if buf is not None and len(self._spare) < self._max_pending:
            self._spare.append(buf)
        start = 0
        assert frame_len >= FRAME_HEADER.size + len(table) * TABLE_ENTRY.size
        for cid, length in table:
            self._written.append(
                (cid, Location(self._pack, self._offset, frame_len, start, length, delta))
            )
            start += length
        self._offset += frame_len
        self.bytes_written += frame_len
        self._unsynced += frame_len
        if self._unsynced >= SYNC_EVERY and (self._sync_job is None or self._sync_job.done()):
            self._wait_sync()
            self._file.flush()
            self._sync_job = self._syncer.submit(os.fdatasync, self._file.fileno())
            self._unsynced = 0

    def flush(self) -> list[tuple[bytes, Location]]:
        """Write out every buffered chunk and make it durable; return (id, location) of
        every chunk written since the last flush."""
        try:
            while True:
                self._close_frame()
                while self._pending:
                    self._write_one()
                if not self._table:  # declined deltas may have refilled it
                    break
            self._wait_sync()
            if self._file is not None:
                self._file.flush()
                os.fsync(self._file.fileno())
                for d in self._dirty_dirs:
                    fsync_dir(d)
                fsync_dir(self.root)
                self._dirty_dirs = set()
                if self._offset >= PACK_TARGET:
                    self._file.close()
                    self._file = None
        except OSError as e:
            raise self._error(e) from None
        written, self._written = self._written, []
        return written

    def keep(self, written: list[tuple[bytes, Location]]) -> None:
        """The index now points at these locations: `close` must leave them be."""
        for _cid, loc in written:
            end = loc.offset + loc.frame_len
            if end > self._kept.get(loc.pack, 0):
                self._kept[loc.pack] = end

    def close(self) -> None:
        for fut, *_ in self._pending:
            fut.cancel()
        self._pending.clear()
        self._pending_bytes = 0
        if self._pool_ is not None:
            self._pool_.shutdown(wait=True)
        self._buf, self._fill, self._table, self._spare = None, 0, [], []
        if self._syncer_ is not None:
            self._syncer_.shutdown(wait=True)
        self._sync_job = None
        if self._file is not None:
            f, self._file = self._file, None
            try:
                f.close()
            except OSError:
                pass  # buffered bytes that could not be written: never flushed nor kept
        self._discard_unkept()

    def _discard_unkept(self) -> None:
        """Remove what no index entry points at: packs never kept, and the tail of a pack
        past its last kept frame. Only this writer ever wrote to these files."""
        for pack in self._created:
            path = pack_path(self.root, pack)
            end = self._kept.get(pack)
            try:
                if end is None:
                    path.unlink()
                elif path.stat().st_size > end:
                    os.truncate(path, end)
            except OSError:
                pass  # what is left is dead data: fsck notes it, gc removes it
        self._created = [p for p in self._created if p in self._kept]
