"""The `copy` driver: no mount privileges at all. A snapshot is a full checkout of its
parent in a plain directory; commit compares that directory with the parent (as
Docker's vfs driver does). Its mount is a bind mount of that directory, which a
process that may not mount uses as it is (`mounting.attach` links to it)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..layers.checkout import prepare_destination
from .drivers import Driver, tree_usage
from .types import Mount, Usage


class CopyDriver(Driver):
    name = "copy"

    def create(self, sdir: Path, parent: bytes | None, readonly: bool) -> None:
        fs = sdir / "fs"
        if parent is not None:
            self.layers.checkout(parent, fs)
        else:
            prepare_destination(fs)
            # a new snapshot's root is 0755 whatever the umask, as containerd's are
            os.chmod(fs, 0o755)

    def mounts(self, sdir: Path, parent: bytes | None, readonly: bool) -> list[Mount]:
        return [Mount("bind", str(sdir / "fs"), ["rbind", "ro" if readonly else "rw"])]

    def commit(self, sdir: Path, parent: bytes | None, message: str = "",
               tag: str | None = None,
               progress: Callable[[int], None] | None = None) -> bytes:
        return self.layers.snapshot(sdir / "fs", parent, tag, message, progress,
                                    kept=False, ephemeral=True).layer_id

    def usage(self, sdir: Path, parent: bytes | None) -> Usage:
        return tree_usage(self.layers, sdir / "fs", parent)
