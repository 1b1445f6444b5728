"""A pure-Python reference of the chunker, written from the contract in csrc/fastcdc.h.

Deliberately simple: one byte at a time, no cut-point skipping, no loop splitting. It is
slow (about a microsecond a byte), so tests use it on inputs of a few hundred KiB.

    gear   the first 256 outputs of splitmix64 seeded with 0x706c6179657273
    bits   log2(avg_size) rounded to the nearest power of two (see `avg_bits`)
    masks  mask_s = the top bits + 2 bits set, mask_l = the top bits - 2 bits set
    rule   with p = bytes of the current chunk before byte i: cut after byte i when
           p >= min_size and h & mask == 0 (h restarts at 0 at p == min_size and is
           updated h = (h << 1) + gear[byte]; mask = mask_s while p < avg_size, mask_l
           after), or when p + 1 == max_size.
"""

from __future__ import annotations

M64 = (1 << 64) - 1
GEAR_SEED = 0x706C6179657273


def splitmix64(seed: int, count: int) -> list[int]:
    """The first `count` outputs of the standard splitmix64 generator."""
    x = seed & M64
    out = []
    for _ in range(count):
        x = (x + 0x9E3779B97F4A7C15) & M64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        out.append(z ^ (z >> 31))
    return out


GEAR: tuple[int, ...] = tuple(splitmix64(GEAR_SEED, 256))


def avg_bits(avg_size: int) -> int:
    """log2(avg_size) rounded to the nearest power of two, as plc_params_init does it:
    by distance in bytes, a tie (avg = 1.5 * 2^b) rounding down."""
    b = avg_size.bit_length() - 1  # floor(log2)
    if avg_size - (1 << b) > (1 << (b + 1)) - avg_size:
        b += 1
    return b


def top_mask(bits: int) -> int:
    """`bits` ones in the top bits of a 64-bit word."""
    bits = max(0, min(64, bits))
    return (M64 << (64 - bits)) & M64


def masks(avg_size: int) -> tuple[int, int]:
    """(mask_s, mask_l) for an average chunk size."""
    bits = avg_bits(avg_size)
    return top_mask(bits + 2), top_mask(bits - 2)


def check_params(min_size: int, avg_size: int, max_size: int) -> None:
    if not (64 <= min_size <= avg_size <= max_size <= 1 << 31):
        raise ValueError(f"invalid chunk sizes {min_size}/{avg_size}/{max_size}")


class RefChunker:
    """Streaming form: `feed(data)` returns the absolute cut points whose chunk ends in
    `data`; `finish()` the stream's length if a chunk is still open, else None."""

    def __init__(self, min_size: int, avg_size: int, max_size: int) -> None:
        check_params(min_size, avg_size, max_size)
        self.min_size, self.avg_size, self.max_size = min_size, avg_size, max_size
        self.mask_s, self.mask_l = masks(avg_size)
        self.p = 0  # bytes of the current chunk seen so far
        self.h = 0  # gear hash
        self.offset = 0  # stream offset of the next byte

    def feed(self, data) -> list[int]:
        cuts = []
        for byte in bytes(data):
            p = self.p
            cut = False
            if p >= self.min_size:
                if p == self.min_size:
                    self.h = 0
                self.h = ((self.h << 1) + GEAR[byte]) & M64
                mask = self.mask_s if p < self.avg_size else self.mask_l
                if self.h & mask == 0:
                    cut = True
            if p + 1 == self.max_size:
                cut = True
            self.offset += 1
            if cut:
                cuts.append(self.offset)
                self.p = 0
            else:
                self.p = p + 1
        return cuts

    def finish(self) -> int | None:
        tail = self.offset if self.p else None
        self.p = 0
        self.h = 0
        return tail


def cut_points(data, min_size: int, avg_size: int, max_size: int) -> list[int]:
    """Chunk end offsets of one whole buffer; the last is len(data); none if empty."""
    chunker = RefChunker(min_size, avg_size, max_size)
    cuts = chunker.feed(data)
    tail = chunker.finish()
    if tail is not None:
        cuts.append(tail)
    return cuts
