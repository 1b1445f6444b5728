"""Garbage collection of chunks: drop the index entries of dead chunks, delete packs
left empty and rewrite packs that are mostly dead (restic's prune and repack)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CorruptData
from .packs import REPACK_LEVEL, PackWriter, frame_base, frame_raw_len, pack_path

if TYPE_CHECKING:
    from .repository import Store


@dataclass
class SweepResult:
    chunks_removed: int = 0
    packs_removed: int = 0
    packs_rewritten: int = 0
    bytes_freed: int = 0


def delta_bases(store: Store, live: set[bytes]) -> set[bytes]:
    """The base chunks of the delta frames holding live chunks: live too, though no
    layer names them (a base is never a delta, so this is one level)."""
    frames: set[tuple[str, int]] = set()
    for cid, loc in store.iter_chunk_locations():
        if loc.delta and cid in live:
            frames.add((loc.pack, loc.offset))
    bases: set[bytes] = set()
    for pack, offset in sorted(frames):
        try:
            with open(pack_path(store.packs_root, pack), "rb") as f:
                ids = frame_base(f, offset)
        except OSError:
            ids = None
        if ids is None:
            # unreadable header: its chunks are damaged (fsck says so); nothing to keep
            continue
        bases.update(ids)
    return bases


def sweep(store: Store, live: set[bytes], repack_below: float = 0.5) -> SweepResult:
    """Drop every chunk not in `live` (nor the base of a live delta), delete packs
    left empty and rewrite packs mostly dead. Call with the store opened exclusive."""
    res = SweepResult()
    live = live | delta_bases(store, live)
    with store.write() as t:
        dead = [cid for cid in t.chunks.ids() if cid not in live]
        for cid in dead:
            t.chunks.delete(cid)
        gone = [key for key, ids in t.paths.items()
                if any(ids[i : i + 32] not in live for i in range(0, len(ids), 32))]
        for key in gone:  # a base must be whole, or it is no base
            t.paths.delete(key)
    res.chunks_removed = len(dead)
    # per pack, per live frame: (frame length, raw bytes of its live chunks)
    used: dict[str, dict[int, list[int]]] = {}
    for _cid, loc in store.iter_chunk_locations():
        frame = used.setdefault(loc.pack, {}).setdefault(loc.offset, [loc.frame_len, 0])
        frame[1] += loc.length
    store.reader.close()
    for path in store.pack_files():
        pack = path.stem
        size = path.stat().st_size
        frames = used.get(pack)
        if not frames:
            path.unlink()
            res.packs_removed += 1
            res.bytes_freed += size
        elif _live_bytes(path, frames) < repack_below * size:
            res.bytes_freed += size - _rewrite_pack(store, pack)
            res.packs_rewritten += 1
    return res


def _live_bytes(path: Path, frames: dict[int, list[int]]) -> float:
    """The stored bytes of a pack that live chunks account for. A frame whose chunks
    are mostly dead counts only for its live share (of its raw length, read from its
    header): small files share frames, and a pack whose frames each keep one live
    chunk is still mostly dead."""
    live = 0.0
    with open(path, "rb") as f:
        for offset, (frame_len, live_raw) in frames.items():
            raw_len = frame_raw_len(f, offset)
            if raw_len and live_raw < raw_len:
                live += frame_len * live_raw / raw_len
            else:
                live += frame_len
    return live


def _rewrite_pack(store: Store, pack: str) -> int:
    """Copy the live chunks of `pack` into a new pack, index them there, delete `pack`;
    returns the new pack's size."""
    moving = [(cid, loc) for cid, loc in store.iter_chunk_locations() if loc.pack == pack]
    moving.sort(key=lambda item: (item[1].offset, item[1].start))
    # what survives a repack is cold: worth a slower, denser level
    w = PackWriter(store.packs_root, max(store.config.compression_level, REPACK_LEVEL),
                   version=store.config.version)
    try:
        deltas: dict[int, list[bytes]] = {}  # a delta frame's live chunks, by frame
        for cid, loc in moving:
            if loc.delta:
                deltas.setdefault(loc.offset, []).append(cid)
            else:
                w.add(cid, store.read_chunk(cid))
        if deltas:
            with open(pack_path(store.packs_root, pack), "rb") as f:
                bases = {offset: frame_base(f, offset) for offset in deltas}
        for offset, cids in deltas.items():
            chunks = [(cid, store.read_chunk(cid)) for cid in cids]
            ids = bases[offset]
            if ids is None:
                raise CorruptData(f"pack {pack}: the delta frame at offset {offset} has "
                                  "no readable base list")
            # still a delta against the same base (which gc keeps alive)
            w.add_delta(chunks, ids, store.read_base(ids), force=True)
        written = w.flush()
        with store.write() as t:
            for cid, loc in written:
                t.chunks.move(cid, loc)
        w.keep(written)
    finally:
        w.close()  # on failure, removes the new pack: the old one is still indexed
    store.reader.close()
    pack_path(store.packs_root, pack).unlink()
    return w.bytes_written
