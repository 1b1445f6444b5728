"""Reproducible file content: every byte comes from a seed, nothing is downloaded.

A file is described by a `Spec` (kind, size, seed, edits); `render(spec)` gives the same
bytes for the same spec on every machine, so a "file unchanged across versions" is
byte-identical and an "edited" file shares all but its edited ranges with its previous
version. Three kinds, with compressibility near the real thing under zstd -3:

- text: source-code-like words and indentation, Zipf-distributed (about 4x);
- binary: machine-code-like bytes, half zeros and small values (about 2x);
- random: already-compressed data such as images or archives (1x).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

TEXT, BINARY, RANDOM = "text", "binary", "random"


@dataclass(frozen=True)
class Spec:
    kind: str
    size: int
    seed: int
    # Each edit is (seed, count): `count` small edits drawn from `seed`, applied in order.
    edits: tuple[tuple[int, int], ...] = ()
    # A short stamp written over the first bytes (a .pyc's source-mtime header).
    stamp: int | None = None

    def edited(self, seed: int, count: int = 3) -> Spec:
        return replace(self, edits=(*self.edits, (seed, count)))

    def stamped(self, stamp: int) -> Spec:
        return replace(self, stamp=stamp)


@lru_cache(maxsize=1)
def _vocab() -> np.ndarray:
    rng = np.random.default_rng(12345)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz_", dtype=np.uint8)
    words = [bytes(rng.choice(letters, int(rng.integers(2, 12)))) for _ in range(8000)]
    syntax = [b"\n", b"\n    ", b"\n        ", b"(", b"):", b"=", b"self.", b"return",
              b"def", b"import", b"#", b"None", b"if", b"in", b"for"]
    return np.array(words + syntax * 40, dtype=object)


def text(rng: np.random.Generator, n: int) -> bytes:
    vocab = _vocab()
    out = b""
    while len(out) < n:
        idx = rng.zipf(1.2, n // 4 + 16) % len(vocab)
        out += b" ".join(vocab[idx].tolist())
    return out[:n]


def binary(rng: np.random.Generator, n: int) -> bytes:
    r = rng.random(n)
    b = rng.integers(0, 256, n, dtype=np.uint8)
    b[r < 0.5] = 0
    b[(r >= 0.5) & (r < 0.75)] &= 0x0F
    return b.tobytes()


def random_bytes(rng: np.random.Generator, n: int) -> bytes:
    return rng.bytes(n)


GENERATORS = {TEXT: text, BINARY: binary, RANDOM: random_bytes}


def generate(kind: str, n: int, seed: int) -> bytes:
    return GENERATORS[kind](np.random.default_rng(seed), n)


_CACHE: dict[Spec, bytes] = {}
_CACHE_LIMIT = 256 << 20
_cached = 0


def render(spec: Spec) -> bytes:
    """The bytes of `spec`; kept in a bounded cache, as scenarios install the same
    packages many times."""
    global _cached
    data = _CACHE.get(spec)
    if data is None:
        data = _render(spec)
        if _cached + len(data) > _CACHE_LIMIT:
            _CACHE.clear()
            _cached = 0
        _CACHE[spec] = data
        _cached += len(data)
    return data


def _render(spec: Spec) -> bytes:
    data = generate(spec.kind, spec.size, spec.seed)
    for seed, count in spec.edits:
        data = apply_edits(data, spec.kind, seed, count)
    if spec.stamp is not None and len(data) >= 16:
        data = spec.stamp.to_bytes(16, "little") + data[16:]
    return data


def apply_edits(data: bytes, kind: str, seed: int, count: int) -> bytes:
    """`count` small edits: overwrites, and for text also insertions and deletions (a
    line added or removed shifts everything after it, which fixed-size blocks miss)."""
    rng = np.random.default_rng(seed)
    buf = bytearray(data)
    for _ in range(count):
        if not buf:
            break
        pos = int(rng.integers(0, len(buf)))
        n = int(rng.integers(16, 512))
        new = generate(kind, n, int(rng.integers(1 << 62)))
        op = int(rng.integers(0, 3)) if kind == TEXT else 0
        if op == 0:
            buf[pos:pos + n] = new[: len(buf[pos:pos + n])]
        elif op == 1:
            buf[pos:pos] = new
        else:
            del buf[pos:pos + n]
    return bytes(buf)
