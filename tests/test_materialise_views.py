"""A file of several chunks written from views (`materialise.write_file_from`, as a
checkout writes from its reader process's shared memory, each view good only until
the next chunk is asked for): the same bytes, and the same holes for all-zero blocks,
as from bytes, whatever the chunk boundaries. Real files in a real directory."""

from __future__ import annotations

import os
import random
from pathlib import Path

import blake3
import pytest

from pylayers.layers.manifest import REG, Entry, pack_chunks
from pylayers.layers.materialise import write_file_from

BLOCK = 4096


def _content(seed: int) -> bytes:
    """Runs of zeros (some block-aligned, some not) between random bytes, and chunks
    that start and end with zeros."""
    rnd = random.Random(seed)
    parts = []
    for _ in range(rnd.randint(4, 12)):
        kind = rnd.choice(["zeros", "blocks", "random", "edges"])
        if kind == "zeros":
            parts.append(bytes(rnd.randint(1, 3 * BLOCK)))
        elif kind == "blocks":
            parts.append(bytes(BLOCK * rnd.randint(1, 4)))
        elif kind == "random":
            parts.append(rnd.randbytes(rnd.randint(1, 3 * BLOCK)))
        else:
            parts.append(b"\x00" + rnd.randbytes(rnd.randint(1, 2 * BLOCK)) + b"\x00")
    return b"".join(parts)


def _cuts(data: bytes, seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    out, at = [], 0
    while at < len(data):
        n = rnd.randint(1, 3 * BLOCK)
        out.append(data[at : at + n])
        at += n
    return out


def _as_views(chunks: list[bytes]):
    """Each chunk as a view of one buffer, overwritten with garbage once the next
    chunk is asked for (as the reader's ring is reused)."""
    buf = bytearray(max(len(c) for c in chunks))
    for c in chunks:
        buf[: len(c)] = c
        yield memoryview(buf)[: len(c)]
        buf[:] = b"\xee" * len(buf)


def _holes(path: Path) -> list[tuple[int, int]]:
    """The file's data segments (SEEK_DATA / SEEK_HOLE)."""
    out = []
    with open(path, "rb") as f:
        fd, size, at = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while at < size:
            try:
                start = os.lseek(fd, at, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            at = end
    return out


@pytest.mark.parametrize("seed", range(12))
def test_views_write_what_bytes_write(tmp_path: Path, seed: int) -> None:
    data = _content(seed)
    chunks = _cuts(data, seed)
    assert len(chunks) > 1
    e = Entry(b"f", REG, 0o644, os.getuid(), os.getgid(), 1_600_000_000 * 10**9, len(data),
              blake3.blake3(data).digest(),
              pack_chunks([(blake3.blake3(c).digest(), len(c)) for c in chunks]))
    from_bytes, from_views = tmp_path / "bytes", tmp_path / "views"
    write_file_from(os.fsencode(from_bytes), e, iter(chunks))
    write_file_from(os.fsencode(from_views), e, _as_views(chunks))
    assert from_views.read_bytes() == data == from_bytes.read_bytes()
    assert _holes(from_views) == _holes(from_bytes) == _expected(data, from_views)
    assert os.stat(from_views).st_blocks == os.stat(from_bytes).st_blocks


def _expected(data: bytes, path: Path) -> list[tuple[int, int]]:
    """Data where a block (the file's st_blksize) holds a byte that is not zero."""
    block = max(os.stat(path).st_blksize, 512)
    out: list[tuple[int, int]] = []
    for at in range(0, len(data), block):
        end = min(at + block, len(data))
        if data[at:end].count(0) == end - at:
            continue
        if out and out[-1][1] == at:
            out[-1] = (out[-1][0], end)
        else:
            out.append((at, end))
    if out and out[-1][1] % block:  # the file system's data runs to the block's end
        out[-1] = (out[-1][0], min(len(data), out[-1][1] + block - out[-1][1] % block))
    return out
