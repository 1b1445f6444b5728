"""The C chunker against the pure-Python reference (tests/chunker_reference.py), its
streaming invariance, its parameters, and a golden record of its cut points."""

from __future__ import annotations

import array
import mmap
import random
import sys
from pathlib import Path

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pylayers import Chunker, InvalidArgument, cut_points
from pylayers._native import gear

sys.path.insert(0, str(Path(__file__).parent))
from chunker_reference import GEAR, ReferenceChunker, reference_cut_points  # noqa: E402

SMALL = {"min_size": 64, "avg_size": 256, "max_size": 1024}
PARAMS = st.sampled_from([
    SMALL,
    {"min_size": 64, "avg_size": 64, "max_size": 64},  # every chunk exactly max
    {"min_size": 64, "avg_size": 128, "max_size": 128},  # avg == max
    {"min_size": 100, "avg_size": 300, "max_size": 5000},  # avg not a power of two
    {"min_size": 128, "avg_size": 512, "max_size": 2048},
])


def data_strategy(max_size: int = 20000):
    random_bytes = st.binary(min_size=0, max_size=max_size)
    # low entropy: repeated patterns and runs of zeros, where gear hashes repeat
    pattern = st.tuples(st.binary(min_size=1, max_size=16),
                        st.integers(min_value=0, max_value=max_size // 16)).map(
        lambda t: t[0] * t[1])
    zeros = st.integers(min_value=0, max_value=max_size).map(bytes)
    return st.one_of(random_bytes, pattern, zeros,
                     st.lists(st.one_of(random_bytes, pattern, zeros), max_size=4).map(b"".join))


def test_gear_table_matches_the_reference() -> None:
    assert [gear(b) for b in range(256)] == GEAR


@settings(max_examples=300, deadline=None)
@given(data=data_strategy(), params=PARAMS)
def test_c_core_agrees_with_the_reference(data: bytes, params: dict) -> None:
    assert list(cut_points(data, **params)) == reference_cut_points(data, **params)


@settings(max_examples=300, deadline=None)
@given(data=data_strategy(), params=PARAMS, splits=st.lists(st.integers(0, 20000), max_size=12))
def test_boundaries_do_not_depend_on_how_the_stream_is_split(data: bytes, params: dict,
                                                             splits: list[int]) -> None:
    points = sorted({min(s, len(data)) for s in splits})
    pieces, prev = [], 0
    for p in points + [len(data)]:
        pieces.append(data[prev:p])  # includes empty pieces and 1-byte ones
        prev = p
    c = Chunker(**params)
    ref = ReferenceChunker(**params)
    got, want = [], []
    for piece in pieces:
        got += list(c.feed(piece))
        want += ref.feed(piece)
    for fin, out in ((c.finish(), got), (ref.finish(), want)):
        if fin is not None:
            out.append(fin)
    assert got == want == list(cut_points(data, **params))


@settings(max_examples=100, deadline=None)
@given(data=data_strategy(50000), params=PARAMS)
def test_chunk_sizes_keep_to_their_bounds(data: bytes, params: dict) -> None:
    cuts = list(cut_points(data, **params))
    if not data:
        assert cuts == []
        return
    assert cuts[-1] == len(data)
    sizes = [b - a for a, b in zip([0] + cuts, cuts, strict=False)]
    assert all(1 <= s <= params["max_size"] for s in sizes)
    # every chunk but the last is longer than min_size (the byte at min_size is the
    # first that may end a chunk), unless max_size forces the cut first
    assert all(s > params["min_size"] or s == params["max_size"] for s in sizes[:-1])


def test_default_sizes_on_random_data() -> None:
    data = random.Random(7).randbytes(16 << 20)
    cuts = list(cut_points(data))
    sizes = [b - a for a, b in zip([0] + cuts, cuts, strict=False)]
    assert all(16 * 1024 < s <= 256 * 1024 for s in sizes[:-1])
    mean = sum(sizes) / len(sizes)
    assert 48 * 1024 < mean < 96 * 1024, mean  # normalized chunking keeps it near avg


@pytest.mark.parametrize("bad", [
    {"min_size": 63, "avg_size": 256, "max_size": 1024},
    {"min_size": 512, "avg_size": 256, "max_size": 1024},
    {"min_size": 64, "avg_size": 2048, "max_size": 1024},
    {"min_size": 64, "avg_size": 256, "max_size": (1 << 31) + 1},
])
def test_invalid_sizes_are_refused(bad: dict) -> None:
    with pytest.raises(InvalidArgument):
        cut_points(b"x", **bad)
    with pytest.raises(InvalidArgument):
        Chunker(**bad)


def test_any_buffer_object_is_accepted_without_copying(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(300_000)
    want = list(cut_points(data, **SMALL))
    path = tmp_path / "f"
    path.write_bytes(data)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        assert list(cut_points(mm, **SMALL)) == want
    assert list(cut_points(bytearray(data), **SMALL)) == want
    assert list(cut_points(memoryview(data), **SMALL)) == want
    assert list(cut_points(array.array("B", data), **SMALL)) == want
    # a slice of a memoryview is chunked as its own stream
    assert list(cut_points(memoryview(data)[1000:], **SMALL)) == reference_cut_points(
        data[1000:], **SMALL)


def test_chunks_of_a_file_reproduce_it(tmp_path: Path) -> None:
    data = random.Random(5).randbytes(3_000_000)
    path = tmp_path / "f"
    path.write_bytes(data)
    with open(path, "rb") as f:
        chunks = list(Chunker(**SMALL).chunks(f, block_size=10_000))
    assert b"".join(chunks) == data
    ends, total = [], 0
    for c in chunks:
        total += len(c)
        ends.append(total)
    assert ends == list(cut_points(data, **SMALL))


# If these change, every existing store stops deduplicating against new data: the
# chunker is part of the on-disk format (docs/format.md, "Chunking").
GOLDEN = {
    (16384, 65536, 262144): "8fd2445739e4ecece17330852f988c9856ff127004b0ab5f7e0a944ebd17d7e5",
    (64, 256, 1024): "d41fcc12659c33020be005b96eb1ac9813633aa9793835b02e733adebee2a478",
    (4096, 16384, 65536): "54b84b92abafef2f43cd3aa27690c1048357822137cd28895c518f142b6e3cfa",
    (100, 300, 5000): "a960b35a92f98dd211f4e9a3ad374023a5c36567f5ede56510785d7e39f90e13",
}


@pytest.mark.parametrize("sizes", sorted(GOLDEN))
def test_golden_cut_points(sizes: tuple[int, int, int]) -> None:
    data = random.Random(1).randbytes(8 << 20)
    data += bytes(1 << 20) + b"pylayers" * (1 << 17)  # and some low-entropy runs
    cuts = cut_points(data, min_size=sizes[0], avg_size=sizes[1], max_size=sizes[2])
    digest = blake3.blake3(array.array("Q", cuts).tobytes()).hexdigest()
    assert digest == GOLDEN[sizes], f"{sizes}: cut points changed ({len(cuts)} cuts)"
