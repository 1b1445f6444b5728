"""Reading a checkout's chunks (store/readahead.py): `verified_chunks` with frames
decompressed ahead on a thread (`prefetch`, as the checkout's reader process reads)
gives what the plain reader gives, chunk for chunk, through delta frames and their
bases, repeats, and frame buffers reused while the reader holds views; an error stands
where it stands in the plain reader; closing early stops the thread. Real stores, in
small frames, two of them kept decompressed, so that buffers are reused often.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import blake3
import pytest

from pylayers.errors import CorruptData
from pylayers.layers.manifest import REG
from pylayers.layers.repo import Layers
from pylayers.store import Store, readahead
from pylayers.store import packs as packs_mod
from pylayers.store.readahead import verified_chunks

sys.path.insert(0, os.path.dirname(__file__))

from test_delta import delta_frames, write_version  # noqa: E402


@pytest.fixture
def chain(tmp_path: Path, monkeypatch):
    """A store of three versions (.pyc headers rewritten, modules edited: delta frames)
    in frames of about 64 KiB; yields (store, the chunk ids of the last version's files,
    then the first version's, then the last's again)."""
    monkeypatch.setattr(packs_mod, "FRAME_TARGET", 64 << 10)
    monkeypatch.setattr(readahead, "FRAME_CACHE", 2)
    src = tmp_path / "src"
    with Store.open(tmp_path / "store") as s:
        layers = Layers(s)
        parent = None
        ids = []
        for v in (1, 2, 3):
            write_version(src, stamp=v, edits=v)
            lid = layers.snapshot(src, parent=parent).layer_id
            parent = lid
            ids.append([cid for e in layers.tree(lid) if e.kind == REG and e.chunks
                        for cid, _ in e.chunk_list()])
        assert delta_frames(tmp_path / "store")
        yield s, ids[2] + ids[0] + ids[2]


def read_slowly(store: Store, ids: list[bytes], prefetch: bool) -> list[bytes]:
    """Each chunk as given, checked against its id just before the next is asked for,
    after giving the thread time to run ahead: a buffer reused too early shows."""
    out = []
    for n, (cid, data) in enumerate(zip(ids, verified_chunks(store, ids, prefetch),
                                        strict=True)):
        if n % 5 == 0:
            time.sleep(0.002)
        assert blake3.blake3(data).digest() == cid, n
        out.append(bytes(data))
    return out


def test_prefetch_gives_what_the_plain_reader_gives(chain) -> None:
    store, ids = chain
    assert len(ids) > 60
    assert read_slowly(store, ids, True) == read_slowly(store, ids, False)


@pytest.mark.parametrize("first,most", [(1, 4), (4, 16), (256, 4096)])
def test_every_window_size_gives_each_chunk(chain, monkeypatch, first: int,
                                            most: int) -> None:
    """Chunks are looked up in windows growing from `_FIRST_LOOKUP` to `_LOOKUP`; the
    chunks given are the store's, whatever the windows."""
    store, ids = chain
    monkeypatch.setattr(readahead, "_FIRST_LOOKUP", first)
    monkeypatch.setattr(readahead, "_LOOKUP", most)
    want = [store.read_chunk(cid) for cid in ids]
    for prefetch in (False, True):
        assert read_slowly(store, ids, prefetch) == want


def test_read_frames_reads_runs_of_frames_as_read_frame_does(chain) -> None:
    """Delta frames and others, several packs, in any order, with a location past
    its pack's end among them (None: read alone, it raises)."""
    store, ids = chain
    with store.read() as t:
        locs = list({(loc.pack, loc.offset): loc
                     for loc in (t.chunks.get(cid) for cid in ids)}.values())
    assert len({loc.pack for loc in locs}) > 1 and any(loc.delta for loc in locs)
    locs.reverse()
    bad = locs[3]._replace(offset=10 << 30)
    locs.insert(5, bad)
    reader = store.reader
    got = reader.read_frames(locs, gap=4 << 10, span=256 << 10)
    for loc, frame in zip(locs, got, strict=True):
        if loc is bad:
            assert frame is None
            with pytest.raises(CorruptData):
                reader.read_frame(loc)
        else:
            assert frame == reader.read_frame(loc)
    assert reader.read_frames([]) == []


def _damage(store: Store, cid: bytes) -> None:
    """Flip a byte near the end of the payload of the chunk's frame (its data in a raw
    frame, the zstd stream else: decompression fails, or yields other bytes)."""
    loc = store.location(cid)
    path = next(store.packs_root.glob(f"*/{loc.pack}.pack"))
    at = loc.offset + loc.frame_len - 8
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))
    store.reader.close()


def test_prefetch_stops_where_the_plain_reader_stops(chain) -> None:
    """Every indexed chunk read after the trees' (whichever chunk the damage lands
    in, it is read): the same chunks given, then the same error."""
    store, ids = chain
    bad = ids[len(ids) // 3]
    _damage(store, bad)
    ids = ids + [cid for cid, _loc in store.iter_chunk_locations()]
    results = []
    for prefetch in (False, True):
        got = []
        with pytest.raises(CorruptData) as err:
            for data in verified_chunks(store, ids, prefetch):
                got.append(bytes(data))
        results.append((got, str(err.value)))
    assert results[0] == results[1]
    assert len(results[0][0]) <= ids.index(bad)
    assert "damaged" in results[0][1] or "decompress" in results[0][1], results[0][1]


def test_closed_early_the_threads_stop(chain) -> None:
    store, ids = chain
    before = threading.active_count()
    it = verified_chunks(store, ids * 3, prefetch=True)
    for _ in range(10):
        next(it)
    names = [t.name for t in threading.enumerate()]
    assert names.count("pylayers-decompress") == 2
    assert threading.active_count() == before + 2
    it.close()
    assert threading.active_count() == before


@pytest.mark.parametrize("prefetch", [False, True], ids=["plain", "prefetch"])
def test_a_damaged_delta_frame_fails_at_its_first_chunk(chain, prefetch: bool) -> None:
    """A window's delta frames are read, and their bases looked up, when the window's
    chunks are: a delta frame whose header is damaged fails where its first chunk is
    asked for, after every chunk before it."""
    store, ids = chain
    with store.read() as t:
        locs = [t.chunks.get(cid) for cid in ids]
    k = next(n for n, loc in enumerate(locs) if n > 10 and loc.delta)
    loc = locs[k]
    path = next(store.packs_root.glob(f"*/{loc.pack}.pack"))
    with open(path, "r+b") as f:  # a byte of its table: the header checksum fails
        f.seek(loc.offset + packs_mod.FRAME_HEADER.size + 3)
        b = f.read(1)
        f.seek(loc.offset + packs_mod.FRAME_HEADER.size + 3)
        f.write(bytes([b[0] ^ 0xFF]))
    store.reader.close()
    got = []
    with pytest.raises(CorruptData, match="checksum"):
        for data in verified_chunks(store, ids, prefetch):
            got.append(bytes(data))
    first = min(n for n, other in enumerate(locs)
                if (other.pack, other.offset) == (loc.pack, loc.offset))
    assert len(got) == first
