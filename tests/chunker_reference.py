"""A pure-Python reference of the chunker (csrc/fastcdc.h, docs/format.md "Chunking"),
written byte at a time from the contract, to check the C core against."""

from __future__ import annotations

M64 = (1 << 64) - 1


def splitmix64(seed: int):
    x = seed
    while True:
        x = (x + 0x9E3779B97F4A7C15) & M64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        yield z ^ (z >> 31)


_gen = splitmix64(0x706C6179657273)
GEAR = [next(_gen) for _ in range(256)]


def log2_round(v: int) -> int:
    b = v.bit_length() - 1
    if b < 63 and v - (1 << b) > (1 << (b + 1)) - v:
        b += 1
    return b


def top_mask(bits: int) -> int:
    if bits <= 0:
        return 0
    if bits >= 64:
        return M64
    return (M64 << (64 - bits)) & M64


def masks(avg: int) -> tuple[int, int]:
    bits = log2_round(avg)
    return top_mask(bits + 2), top_mask(bits - 2 if bits > 2 else 0)


class ReferenceChunker:
    """Streaming: feed() returns absolute cut offsets; finish() the final one or None."""

    def __init__(self, min_size: int, avg_size: int, max_size: int) -> None:
        self.min, self.avg, self.max = min_size, avg_size, max_size
        self.mask_s, self.mask_l = masks(avg_size)
        self.pos = 0  # bytes of the current chunk seen
        self.h = 0
        self.offset = 0

    def feed(self, data: bytes) -> list[int]:
        cuts = []
        for byte in data:
            p = self.pos  # bytes of this chunk before this byte
            self.offset += 1
            self.pos += 1
            cut = p + 1 == self.max  # a chunk never exceeds max_size
            if p < self.min:  # cut-point skipping; the hash starts afresh at min_size
                self.h = 0
            else:
                self.h = ((self.h << 1) + GEAR[byte]) & M64
                mask = self.mask_s if p < self.avg else self.mask_l
                cut = cut or (self.h & mask) == 0
            if cut:
                cuts.append(self.offset)
                self.pos = 0
        return cuts

    def finish(self) -> int | None:
        tail = self.offset if self.pos else None
        self.pos = 0
        return tail


def reference_cut_points(data: bytes, min_size: int, avg_size: int, max_size: int) -> list[int]:
    c = ReferenceChunker(min_size, avg_size, max_size)
    cuts = c.feed(data)
    tail = c.finish()
    if tail is not None:
        cuts.append(tail)
    return cuts
