"""The snapshot driver interface: how an active snapshot or a view is backed by
directories.

A driver creates a snapshot's directory, says how to mount it (plain data), turns its
changes into a layer at commit, measures it, removes it, and collects whatever caches
it keeps beside the store. Each driver is its own module (`copy`) or package
(`overlay`); `registry` names them. This module imports no driver.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from ..layers.diffstat import MissingChunks, scan_directory
from ..layers.manifest import REG, Entry
from ..layers.repo import Layers
from ..layers.tree import diff_layer
from .types import Mount, Usage


def usage_of_entries(own: list[Entry], missing: MissingChunks) -> Usage:
    """A snapshot's own entries as a Usage: regular-file bytes, entries, new bytes."""
    return Usage(sum(e.size for e in own if e.kind == REG), len(own), missing.total)


def tree_usage(layers: Layers, directory: Path, parent: bytes | None) -> Usage:
    """Own size of a plain directory against its parent layer, and how much of it the
    store lacks (hash-only scan: nothing is stored)."""
    scanned = scan_directory(layers, directory)
    base = layers.tree(parent) if parent is not None else []
    own = diff_layer(base, scanned.entries)
    return Usage(sum(e.size for e in own if e.kind == REG), len(own), scanned.new_bytes)


class Driver:
    """The interface every driver implements. `sdir` is a snapshot's own directory
    under STORE/snapshots/ (made by `create`); `parent` its parent layer's id."""

    name = ""

    def __init__(self, layers: Layers) -> None:
        self.layers = layers
        self.store = layers.store

    @classmethod
    def unavailable(cls) -> str | None:
        """None if this driver works here, else the reason it does not."""
        return None

    def create(self, sdir: Path, parent: bytes | None, readonly: bool) -> None:
        raise NotImplementedError

    def mounts(self, sdir: Path, parent: bytes | None, readonly: bool) -> list[Mount]:
        raise NotImplementedError

    def commit(self, sdir: Path, parent: bytes | None, message: str = "",
               tag: str | None = None,
               progress: Callable[[int], None] | None = None) -> bytes:
        raise NotImplementedError

    def usage(self, sdir: Path, parent: bytes | None) -> Usage:
        raise NotImplementedError

    def remove(self, sdir: Path) -> None:
        if sdir.exists():
            shutil.rmtree(sdir)

    def collect(self, live_layers: set[bytes]) -> int:
        """Delete what this driver caches for layers not in `live_layers`; returns the
        bytes freed (approximately). A driver without caches frees nothing."""
        return 0

    def cache_bytes(self) -> int:
        """Bytes this driver's caches occupy on disk (rebuilt on demand)."""
        return 0
