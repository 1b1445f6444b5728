"""Comparing two trees, each a layer or a directory on disk, and summing up what moved.

A directory is scanned without storing anything (`scan_directory`): its files are
chunked and hashed as a snapshot would, and the chunks the store lacks are counted,
so `new_bytes` says what a snapshot of it would add to the store.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .ignore import Exclusions
from .manifest import REG, Entry
from .repo import Layers
from .scan import Scanner
from .tree import Change, diff_trees


@dataclass
class DirectoryTree:
    """A directory scanned without storing: its tree, the chunks the store lacks (id ->
    length) and the scan's warnings (vanished files, sockets...)."""

    entries: list[Entry]
    new_chunks: dict[bytes, int]
    warnings: list[str] = field(default_factory=list)

    @property
    def new_bytes(self) -> int:
        return sum(self.new_chunks.values())


class MissingChunks:
    """A hash-only sink for a scan that stores nothing: it records the chunks the
    store lacks (each once, id -> length). The one such sink: a directory's diff, the
    copy driver's and the overlay driver's usage all count new bytes with it."""

    def __init__(self, store) -> None:
        self.store = store
        self.sizes: dict[bytes, int] = {}

    def __call__(self, cid: bytes, data) -> bool:
        if cid in self.sizes or self.store.has_chunk(cid):
            return False
        self.sizes[cid] = len(data)
        return True

    @property
    def total(self) -> int:
        return sum(self.sizes.values())


def scan_directory(layers: Layers, directory: str | Path,
                   progress: Callable[[int], None] | None = None,
                   exclude: Exclusions | None = None) -> DirectoryTree:
    """The tree of `directory` as a snapshot would record it (leaving out what
    `exclude` says, and the store itself); nothing is written to the store (not even
    the walk cache); files the walk cache knows unchanged are not read."""
    store = layers.store
    missing = MissingChunks(store)
    with layers.walk_reuse(directory) as (records, reuse):
        scanner = Scanner(store, store.config.chunker, missing, progress=progress,
                          exclude=exclude.excluded if exclude else None, reuse=reuse)
        entries = scanner.scan(directory, records)
    return DirectoryTree(entries, missing.sizes, list(scanner.stats.warnings))


@dataclass
class DiffStat:
    """Counts of changes and the bytes they move. `bytes_added`: file content of added
    or re-contented paths in the new tree; `bytes_removed`: of deleted or replaced paths
    in the old tree (a deleted directory: all its files); a chmod, chown or touch moves
    none. `new_bytes`: chunk bytes the new tree holds that the old one (a layer) or the
    store (a directory) does not, and the bytes of small files (held in the manifest)
    added or changed: what storing the new tree on the old would add."""

    added: int
    changed: int
    deleted: int
    bytes_added: int
    bytes_removed: int
    new_bytes: int

    def to_json(self) -> dict:
        return asdict(self)


def _subtree_bytes(tree: list[Entry], keys: list[bytes], root: Entry) -> int:
    """Bytes of the regular files at and under `root` (`keys`: the tree's sort keys).
    The subtree is contiguous in component order: no scan of the whole tree per call."""
    i = bisect.bisect_left(keys, root.key)
    prefix = root.key + b"\x00"
    total = 0
    while i < len(tree) and (tree[i] is root or keys[i].startswith(prefix)):
        if tree[i].kind == REG:
            total += tree[i].size
        i += 1
    return total


def diff_stat(old: list[Entry], changes: list[Change],
              new_chunks: dict[bytes, int] | None = None) -> DiffStat:
    """Sum up `changes` (diff_trees(old, new)). `new_chunks`: for a new tree scanned
    from a directory, the chunks the store lacks; else new bytes are the chunks of the
    changed files that no file of `old` holds."""
    moved = [c for c in changes if c.change != "C" or
             {"content", "type"} & set(c.attributes)]
    added = sum(c.new.size for c in moved if c.new is not None and c.new.kind == REG)
    keys = [e.key for e in old]
    removed = sum(_subtree_bytes(old, keys, c.old) for c in moved if c.old is not None)
    if new_chunks is not None:
        new_bytes = sum(new_chunks.values())
    else:
        have: set[bytes] = set()
        for e in old:
            if e.kind == REG:
                have.update(cid for cid, _ in e.chunk_list())
        fresh: dict[bytes, int] = {}
        for c in changes:
            if c.new is not None and c.new.kind == REG:
                fresh.update((cid, n) for cid, n in c.new.chunk_list() if cid not in have)
        new_bytes = sum(fresh.values())
    # small files' bytes go into the new layer's manifest, not into chunks
    new_bytes += sum(c.new.size for c in moved if c.new is not None and c.new.inline)
    return DiffStat(sum(c.change == "A" for c in changes),
                    sum(c.change == "C" for c in changes),
                    sum(c.change == "D" for c in changes), added, removed, new_bytes)


@dataclass
class Comparison:
    """The changes from one tree to another, their summary, and the scan's warnings
    (when a side is a directory)."""

    changes: list[Change]
    stat: DiffStat
    warnings: list[str] = field(default_factory=list)


Side = bytes | Path  # a layer id, or a directory on disk


def compare(layers: Layers, old: Side, new: Side,
            progress: Callable[[int], None] | None = None,
            exclusions: Callable[[Path], Exclusions] | None = None) -> Comparison:
    """Compare two trees, each a layer (its id) or a directory (a Path, scanned without
    storing; `exclusions(directory)` says what its scan leaves out, as a snapshot of it
    would)."""
    warnings: list[str] = []
    new_chunks = None

    def tree_of(side: Side, collect: bool) -> list[Entry]:
        nonlocal new_chunks
        if isinstance(side, Path):
            scanned = scan_directory(layers, side, progress,
                                     exclusions(side) if exclusions else None)
            warnings.extend(scanned.warnings)
            if collect:
                new_chunks = scanned.new_chunks
            return scanned.entries
        return layers.tree(side)

    old_tree = tree_of(old, False)
    new_tree = tree_of(new, True)
    changes = diff_trees(old_tree, new_tree)
    return Comparison(changes, diff_stat(old_tree, changes, new_chunks), warnings)


__all__ = ["Comparison", "DiffStat", "DirectoryTree", "compare", "diff_stat",
           "scan_directory"]
