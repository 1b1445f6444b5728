"""Store-wide maintenance as library calls: `gc`, `fsck` and `du`.

Each asks every subsystem that keeps things in the store for its part, so a program
calling `pylayers.gc(store)` gets exactly what `pylayers gc` does:

- snapshots (`mounts`): committed snapshots nothing references are collected (and
  their layers, unless `snapshot` made them), orphan snapshot directories removed;
- the build cache (`build`): keys whose layer is gone are pruned;
- layers (`layers`): the chunks every layer needs are the live set; the chunk store
  sweeps the rest and rewrites its index without free pages;
- drivers' caches (`mounts`): materialised layers of layers that are gone, and cached
  files nothing links to.

Progress is reported through `progress(stage, done, total)` callbacks; nothing here
prints. The results are plain data the CLI prints (or dumps as JSON).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .build.cachekeys import prune as prune_cache_keys
from .errors import FailedPrecondition
from .layers import maintenance as lm
from .layers.checkout import LinkCache, link_cache_root
from .layers.repo import Layers
from .mounts import Snapshotter
from .mounts.overlay.cache import cache_sets
from .mounts.registry import collect_driver_caches, driver_cache_bytes
from .oci.config import prune as prune_image_configs
from .store import Store
from .store.fsutil import bytes_on_disk
from .store.gc import sweep

# progress(stage, done, total): `stage` names the step ("snapshots", "chunks",
# "layers"...), `done` and `total` count its units (total 0: unknown).
StageProgress = Callable[[str, int, int], None]


def _report(progress: StageProgress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


# -- the drivers' caches --------------------------------------------------------------
def _collect_driver_caches(layers: Layers, live: set[bytes]) -> tuple[int, int]:
    """(cached layer directories removed, bytes freed) over every driver's cache. The
    directories are counted from the overlay driver's cache sets, the only driver that
    keeps per-layer directories (Driver.collect reports bytes only)."""
    before = _cache_dirs(layers.store)
    freed = collect_driver_caches(layers, live)
    return len(before - _cache_dirs(layers.store)), freed


def _cache_dirs(store: Store) -> set[Path]:
    out: set[Path] = set()
    for cache in cache_sets(store.path.absolute()):
        try:
            out.update((cache / "layers").iterdir())
        except OSError:
            pass
    return out


# -- gc ---------------------------------------------------------------------------------
@dataclass
class GcResult:
    """What one gc freed."""

    snapshots: list[str] = field(default_factory=list)  # committed snapshots collected
    orphan_dirs: int = 0  # snapshot directories no record named
    layers: list[str] = field(default_factory=list)  # hex ids of layers removed with them
    cache_keys: int = 0  # build cache keys whose layer is gone
    image_configs: int = 0  # image configs no tag and no layer names any more
    chunks: int = 0  # chunks no layer needs
    packs_removed: int = 0
    packs_rewritten: int = 0
    pack_bytes_freed: int = 0  # bytes of pack files deleted or shrunk
    index_bytes_freed: int = 0  # the index rewritten without its free pages
    cache_dirs: int = 0  # materialised layers of drivers' caches removed
    cache_bytes_freed: int = 0  # bytes of drivers' caches freed (approximate)

    @property
    def bytes_freed(self) -> int:
        return self.pack_bytes_freed + self.index_bytes_freed + self.cache_bytes_freed

    def to_json(self) -> dict:
        d = asdict(self)
        d["bytes_freed"] = self.bytes_freed
        return d


def _require_exclusive(store: Store, what: str) -> None:
    # gc deleting chunks while another process writes would lose that process's data,
    # so refuse rather than trust the caller.
    if not store.exclusive:
        raise FailedPrecondition(f"{what} needs the store opened with exclusive=True")


def gc(store: Store, *, progress: StageProgress | None = None) -> GcResult:
    """Collect everything no root needs, subsystem by subsystem (see the module's
    text). The store must be opened with `exclusive=True`: gc waits for running
    snapshots to finish and keeps others out while it deletes."""
    _require_exclusive(store, "gc")
    res = GcResult()
    layers = Layers(store)
    snaps = Snapshotter(layers)
    before = set(layers.all_ids())
    _report(progress, "snapshots", 0, 0)
    res.snapshots = snaps.collect()
    res.orphan_dirs = len(snaps.cleanup())
    live_layers = set(layers.all_ids())
    res.layers = sorted(lid.hex() for lid in before - live_layers)
    _report(progress, "build cache", 0, 0)
    res.cache_keys = prune_cache_keys(store)
    res.image_configs = prune_image_configs(store)
    lm.prune_fingerprints(store)
    _report(progress, "layers", 0, len(live_layers))
    live = lm.live_chunks(store)
    _report(progress, "chunks", 0, 0)
    swept = sweep(store, live)
    res.chunks, res.packs_removed = swept.chunks_removed, swept.packs_removed
    res.packs_rewritten, res.pack_bytes_freed = swept.packs_rewritten, swept.bytes_freed
    _report(progress, "index", 0, 0)
    res.index_bytes_freed = store.compact_index()
    _report(progress, "caches", 0, 0)
    res.cache_dirs, res.cache_bytes_freed = _collect_driver_caches(layers, live_layers)
    # linked checkouts' file cache: the files no checkout links to any more
    res.cache_bytes_freed += LinkCache(link_cache_root(store.path.absolute())).collect()[1]
    return res


# -- fsck -------------------------------------------------------------------------------
@dataclass
class FsckResult:
    """What fsck checked and found. `damaged` lines are problems (data or references
    lost); `notes` are things gc tidies (nothing is lost)."""

    chunks_checked: int = 0
    layers_checked: int = 0
    snapshots_checked: int = 0
    damaged: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged

    def to_json(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def fsck(store: Store, *, progress: StageProgress | None = None) -> FsckResult:
    """Verify every chunk against its id, every manifest against its layer id, every
    reference (chunks of files, parents, tags), and every snapshot's layers."""
    _report(progress, "chunks", 0, 0)
    report = lm.fsck(store)
    res = FsckResult(report.chunks_checked, report.layers_checked, 0,
                     list(report.damaged), list(report.notes))
    _report(progress, "snapshots", 0, 0)
    layers = Layers(store)
    for info in Snapshotter(layers).walk():
        res.snapshots_checked += 1
        for what, lid in (("parent layer", info.parent_layer), ("layer", info.layer)):
            if lid and not layers.exists(bytes.fromhex(lid)):
                res.damaged.append(f"snapshot {info.key!r}: its {what} {lid[:12]} is missing")
    return res


# -- du ---------------------------------------------------------------------------------
@dataclass
class DiskUsage:
    """Where a store's bytes are.

    `logical_bytes`: the file content all layers' own entries hold (what a tar of each
    layer's diff would hold, uncompressed). `data_bytes`: the distinct file chunks that
    content needs, uncompressed, and the small files' bytes the manifests hold (once per
    layer that holds them); `manifest_bytes`: the distinct manifest chunks (metadata,
    and those small files). `stored_bytes`: every byte the store directory occupies on disk, of
    which `pack_bytes` are chunks (compressed), `index_bytes` the LMDB index (mostly
    fixed costs on a small store), `cache_bytes` the drivers' caches (rebuilt on
    demand), and `other_bytes` the rest (snapshot directories, config, lock).

    `dedup_ratio` = logical / data bytes: what dedup did to file content alone, so a
    tiny store, whose manifests and index outweigh its files, does not show a ratio
    below 1. `compression_ratio` = (data + manifest bytes) / pack bytes."""

    layers: int
    chunks: int
    logical_bytes: int
    data_bytes: int
    manifest_bytes: int
    stored_bytes: int
    pack_bytes: int
    index_bytes: int
    cache_bytes: int
    other_bytes: int
    dedup_ratio: float
    compression_ratio: float

    def to_json(self) -> dict:
        return asdict(self)


def du(store: Store) -> DiskUsage:
    """Logical bytes held against bytes on disk, broken down by what holds them."""
    usage = lm.disk_usage(store)
    stored = usage["stored_bytes"]
    packs = 0
    for p in store.pack_files():
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        packs += min(st.st_size, st.st_blocks * 512)
    layers = Layers(store)
    manifests: dict[bytes, int] = {}
    for lid in layers.all_ids():
        manifests.update(layers.record(lid).manifest)
    raw = sum(loc.length for _cid, loc in store.iter_chunk_locations())
    manifest = sum(manifests.values())
    data = max(0, raw - manifest) + usage["inline_bytes"]
    index = bytes_on_disk(store.path / "index")
    cache = driver_cache_bytes(layers)
    logical = usage["logical_bytes"]
    return DiskUsage(
        layers=usage["layers"], chunks=usage["chunks"], logical_bytes=logical,
        data_bytes=data, manifest_bytes=manifest, stored_bytes=stored, pack_bytes=packs,
        index_bytes=index, cache_bytes=cache,
        other_bytes=max(0, stored - packs - index - cache),
        dedup_ratio=round(logical / data, 3) if data else 0.0,
        compression_ratio=round(raw / packs, 3) if packs else 0.0)


__all__ = ["DiskUsage", "FsckResult", "GcResult", "StageProgress", "du", "fsck", "gc"]
