"""Decompressing a delta frame into a buffer (`packs.delta_into`, what a checkout's
reader uses): the same bytes as `Frame.raw`, with the base taken as raw content
whatever its first bytes, a damaged payload or base refused in one line, a payload
longer than its header says refused, and the same bytes where python-zstandard lacks
its cffi module."""

from __future__ import annotations

import random
import sys

import blake3
import pytest

from pylayers.errors import CorruptData
from pylayers.store import packs as packs_mod
from pylayers.store.packs import decode_frame, delta_into, encode_delta_frame

ZSTD_DICT_MAGIC = b"\x37\xa4\x30\xec"  # what a formatted zstd dictionary starts with


def _chunks(data: bytes, size: int = 20_000) -> list[tuple[bytes, bytes]]:
    return [(blake3.blake3(data[i : i + size]).digest(), data[i : i + size])
            for i in range(0, len(data), size)]


def _delta(base: bytes, new: bytes):
    base_chunks = _chunks(base)
    # a zstd delta (codec 2): a patch frame (what a store of format 7 makes of these
    # versions) is not decompressed with its base as zstd's prefix
    frame = encode_delta_frame(_chunks(new), [cid for cid, _ in base_chunks], base, 3,
                               force=True, patch=False)
    assert frame is not None
    return decode_frame(frame, 0, "test")


def _versions(seed: int, head: bytes = b"") -> tuple[bytes, bytes]:
    rnd = random.Random(seed)
    old = head + rnd.randbytes(150_000)
    new = bytearray(old)
    for i in range(100, len(new), 7_000):
        new[i] ^= 0x5A
    return old, bytes(new)


@pytest.mark.parametrize("head", [b"", ZSTD_DICT_MAGIC + bytes(60)],
                         ids=["plain", "dictionary-magic"])
def test_the_same_bytes_as_frame_raw(head: bytes) -> None:
    """A base that starts like a formatted zstd dictionary is still raw content (zstd
    would otherwise parse it as a dictionary's header and tables)."""
    old, new = _versions(1, head)
    fr = _delta(old, new)
    assert bytes(fr.raw(old)) == new
    short = bytearray(10)
    got = delta_into(fr, memoryview(bytearray(old)), short)  # a view; out too short
    assert bytes(got) == new and got.obj is not short
    big = bytearray(len(new) + 1000)
    got = delta_into(fr, old, big)
    assert got.obj is big and bytes(got) == new
    again = delta_into(_delta(new, old), new, big)  # the context reused, another base
    assert bytes(again) == old


def test_a_wrong_base_gives_other_bytes_or_fails() -> None:
    old, new = _versions(2)
    fr = _delta(old, new)
    other = bytearray(old)
    other[5_000] ^= 0xFF
    try:
        got = bytes(delta_into(fr, bytes(other), bytearray()))
    except CorruptData:
        return
    assert got != new  # the checkout's hash of each chunk refuses it


def test_damaged_payloads_are_corrupt_data() -> None:
    old, new = _versions(3)
    fr = _delta(old, new)
    whole = fr.payload
    for payload in (whole[:-10], whole[:4] + bytes(len(whole) - 4)):
        fr.payload = payload
        with pytest.raises(CorruptData, match="frame at offset 0: cannot decompress"):
            delta_into(fr, old, bytearray())
    fr = _delta(old, new)
    fr.raw_len -= 1  # the payload holds one byte more than the header says
    with pytest.raises(CorruptData, match="cannot decompress"):
        delta_into(fr, old, bytearray())
    fr = _delta(old, new)
    fr.raw_len += 1  # one byte less
    with pytest.raises(CorruptData, match="wrong decompressed length"):
        delta_into(fr, old, bytearray(len(new) + 10))
    fr = _delta(old, new)  # after the errors, the thread's context works again
    assert bytes(delta_into(fr, old, bytearray())) == new


def test_not_a_delta_frame_is_refused() -> None:
    fr = decode_frame(packs_mod.encode_frame(_chunks(b"x" * 50_000), 3), 0, "test")
    with pytest.raises(CorruptData, match="not a delta frame"):
        delta_into(fr, b"base", bytearray())


def test_without_the_cffi_module_the_same_bytes(monkeypatch) -> None:
    """python-zstandard installed without `zstandard._cffi`: `Frame.raw`'s way."""
    assert packs_mod._zstd_lib() is not None  # this install has it
    monkeypatch.setitem(sys.modules, "zstandard._cffi", None)  # an import fails
    monkeypatch.setattr(packs_mod._zstd, "lib", None, raising=False)  # not looked for yet
    assert packs_mod._zstd_lib() is None
    old, new = _versions(4)
    got = delta_into(_delta(old, new), old, bytearray())
    assert bytes(got) == new and isinstance(got.obj, bytes)
