"""Content-defined chunking: FastCDC policy and streaming around the C scan.

Terms: a *cut point* is the end offset of a chunk. `cut_points` chunks one whole
buffer; `Chunker` chunks a stream fed in buffers of any size and yields the same cut
points as if the stream were one buffer.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from dataclasses import dataclass

from ._native import ffi, lib, new_params, new_state

DEFAULT_MIN = 16 * 1024
DEFAULT_AVG = 64 * 1024
DEFAULT_MAX = 256 * 1024

_ZERO = array("Q", [0])


@dataclass(frozen=True)
class ChunkerParams:
    """Chunk sizes; recorded in a store's config so they never change under it."""

    min_size: int = DEFAULT_MIN
    avg_size: int = DEFAULT_AVG
    max_size: int = DEFAULT_MAX

    def validate(self) -> ChunkerParams:
        new_params(self.min_size, self.avg_size, self.max_size)
        return self


def cut_points(
    buffer,
    *,
    min_size: int = DEFAULT_MIN,
    avg_size: int = DEFAULT_AVG,
    max_size: int = DEFAULT_MAX,
) -> array:
    """Chunk end offsets of one whole buffer; the last equals len(buffer).

    Zero-copy on any object with the buffer protocol; returns an `array('Q')`.
    An empty buffer has no chunks.
    """
    n = len(buffer) if isinstance(buffer, bytes) else memoryview(buffer).nbytes
    if n <= min_size:  # no cut before min_size: one chunk, or none (FastCDC's skip)
        _params(min_size, avg_size, max_size)  # the sizes are checked all the same
        return array("Q", [n] if n else [])
    chunker = Chunker(min_size=min_size, avg_size=avg_size, max_size=max_size)
    cuts = chunker.feed(buffer)
    tail = chunker.finish()
    if tail is not None:
        cuts.append(tail)
    return cuts


_PARAMS: dict[tuple[int, int, int], object] = {}


def _params(min_size: int, avg_size: int, max_size: int):
    """The validated C parameters for these sizes, made once (read-only for the scan:
    every chunker of a store shares them)."""
    key = (min_size, avg_size, max_size)
    params = _PARAMS.get(key)
    if params is None:
        params = new_params(min_size, avg_size, max_size)
        if len(_PARAMS) < 64:
            _PARAMS[key] = params
    return params


class Chunker:
    """Streaming chunker. `feed(buf)` returns the cut points that fall in `buf`, as
    absolute offsets in the stream; `finish()` returns the stream's final cut point
    (its total length) if bytes remain after the last cut, else None.
    """

    def __init__(
        self,
        *,
        min_size: int = DEFAULT_MIN,
        avg_size: int = DEFAULT_AVG,
        max_size: int = DEFAULT_MAX,
    ) -> None:
        self._params = _params(min_size, avg_size, max_size)
        self._state = new_state()
        self._min = min_size
        self._offset = 0  # stream offset of the next byte to feed

    @classmethod
    def from_params(cls, params: ChunkerParams) -> Chunker:
        return cls(min_size=params.min_size, avg_size=params.avg_size, max_size=params.max_size)

    @property
    def offset(self) -> int:
        return self._offset

    def feed(self, buffer) -> array:
        src = ffi.from_buffer(buffer)
        n = len(src)
        # Every cut but the first in a buffer is at least min_size after the one before.
        cap = n // self._min + 2
        out = array("Q", _ZERO) * cap  # zeros, without a bytes object to copy them from
        consumed = ffi.new("size_t *")
        ncuts = lib.plc_scan(
            self._params, self._state, ffi.cast("const uint8_t *", src), n,
            ffi.cast("uint64_t *", ffi.from_buffer(out)), cap, consumed,
        )
        if consumed[0] != n:  # cap is enough for every cut (fastcdc.h); never under -O
            raise RuntimeError(f"plc_scan consumed {consumed[0]} of {n} bytes with room "
                               f"for {cap} cuts: the C core broke its contract")
        del out[ncuts:]
        base = self._offset
        if base:
            for i in range(ncuts):
                out[i] += base
        self._offset = base + n
        return out

    def finish(self) -> int | None:
        """End of stream: the final cut point, if the last chunk is not empty."""
        tail = self._offset if self._state.pos else None
        self._state.pos = 0
        self._state.hash = 0
        return tail

    def chunks(self, stream, block_size: int = 4 << 20) -> Iterator[bytes]:
        """Yield the chunks of a binary file object, reading `block_size` at a time;
        memory stays within one block plus one chunk."""
        pending = bytearray()
        pending_start = self._offset
        while True:
            block = stream.read(block_size)
            if not block:
                break
            cuts = self.feed(block)
            pending += block
            start = 0
            for c in cuts:
                end = c - pending_start
                yield bytes(pending[start:end])
                start = end
            del pending[:start]
            pending_start += start
        if self.finish() is not None:
            yield bytes(pending)
