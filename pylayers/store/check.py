"""Checking the chunk store: every indexed chunk read back and compared with its id."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import CorruptData
from .ingest import chunk_id
from .packs import Location, PackReader

if TYPE_CHECKING:
    from .repository import Store


@dataclass
class VerifyResult:
    chunks_checked: int = 0
    damaged: list[str] = field(default_factory=list)
    bad_chunks: set[bytes] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)


def verify_chunks(store: Store) -> VerifyResult:
    """Read every indexed chunk and check it against its id, frame by frame."""
    result = VerifyResult()
    by_frame: dict[tuple[str, int], list[tuple[bytes, Location]]] = {}
    for cid, loc in store.iter_chunk_locations():
        by_frame.setdefault((loc.pack, loc.offset), []).append((cid, loc))
    # a delta frame reads its base through the store (each base chunk verified)
    reader = PackReader(store.packs_root, cache_frames=1, base_reader=store.read_base)
    try:
        for (pack, offset), items in sorted(by_frame.items()):
            try:
                raw = reader.frame_raw(items[0][1])
            except CorruptData as e:
                result.damaged.append(f"pack {pack} frame at {offset}: {e}")
                result.bad_chunks.update(cid for cid, _ in items)
                continue
            for cid, loc in items:
                result.chunks_checked += 1
                if chunk_id(raw[loc.start : loc.start + loc.length]) != cid:
                    result.damaged.append(f"chunk {cid.hex()}: content does not match its "
                                          f"id (pack {pack}, frame at {offset})")
                    result.bad_chunks.add(cid)
    finally:
        reader.close()
    indexed = {p for p, _ in by_frame}
    for path in store.pack_files():
        if path.stem not in indexed:
            result.notes.append(f"pack {path.stem} holds no indexed chunk (gc removes it)")
    return result
