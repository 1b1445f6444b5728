"""Snapshot drivers: how an active snapshot or a view is backed by directories.

A driver creates a snapshot's directory, says how to mount it (plain data), turns its
changes into a layer at commit, and removes it. One module per driver; `get_driver`
picks one by name, or the best available.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InvalidArgument
from ..layers.manifest import REG
from ..layers.repo import Layers
from ..layers.scan import Scanner
from ..layers.tree import diff_layer

if TYPE_CHECKING:
    from .snapshotter import Mount, Usage


class Driver:
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
               tag: str | None = None) -> bytes:
        raise NotImplementedError

    def usage(self, sdir: Path, parent: bytes | None) -> Usage:
        raise NotImplementedError

    def remove(self, sdir: Path) -> None:
        if sdir.exists():
            shutil.rmtree(sdir)

    def _usage_of_tree(self, directory: Path, parent: bytes | None) -> Usage:
        """Own size of a directory against its parent, and how much of it the store
        lacks (hash-only scan: nothing is stored)."""
        from .snapshotter import Usage
        seen: dict[bytes, int] = {}
        store = self.store

        def sink(cid: bytes, data) -> bool:
            if cid in seen or store.has_chunk(cid):
                return False
            seen[cid] = len(data)
            return True

        tree = Scanner(store, store.config.chunker, sink).scan(directory)
        base = self.layers.tree(parent) if parent is not None else []
        own = diff_layer(base, tree)
        files = [e for e in own if e.kind == REG]
        return Usage(sum(e.size for e in files), len(own), sum(seen.values()))


def driver_names() -> list[str]:
    return ["overlay", "copy"]


def get_driver(name: str | None, layers: Layers) -> Driver:
    from .copy import CopyDriver
    from .overlay import OverlayDriver
    drivers = {"overlay": OverlayDriver, "copy": CopyDriver}
    if name is None:
        name = "overlay" if OverlayDriver.unavailable() is None else "copy"
    cls = drivers.get(name)
    if cls is None:
        raise InvalidArgument(f"unknown driver {name!r} (known: {', '.join(drivers)})")
    reason = cls.unavailable()
    if reason is not None:
        raise InvalidArgument(f"driver {name} is not available here: {reason}")
    return cls(layers)
