"""The `overlay` driver: kernel overlayfs, in root or userxattr mode (`mode`), over
lower directories materialised once per layer (`lower`); commit reads the upper
directory back into a layer (`upper`); its caches live under STORE/cache (`cache`).

An active snapshot is `upperdir` + `workdir` over its parent's lower directories. A
chain of any depth up to overlayfs's 500 lower directories mounts: past a page of
options, `Mount.mount` passes each lower directory alone (the new mount API's
`lowerdir+`, Linux 6.8), else mount(8) with lowerdirs relative to their common parent
(about 220 fit); a deeper parent is refused when the snapshot is made.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ...errors import FailedPrecondition
from ...layers.diffstat import MissingChunks
from ...layers.manifest import DIR, WHITEOUT, Entry
from ...layers.materialise import apply_metadata
from ...layers.repo import Layers
from ..drivers import Driver, usage_of_entries
from ..types import OVERLAY_MAX_LOWERS, Mount, Usage
from .cache import cache_bytes, cache_root, collect_caches
from .lower import LowerDirs
from .mode import (
    HOST_IDS_SUFFIX,
    USERXATTR,
    HostIds,
    check_mode,
    current_flavour,
    overlay_mode,
    record_mode,
)
from .upper import upper_entries


class OverlayDriver(Driver):
    name = "overlay"

    def __init__(self, layers: Layers) -> None:
        super().__init__(layers)
        self.flavour = current_flavour()
        self.lowers = LowerDirs(layers, self.flavour, self.cache_dir)
        self._host_lowers: LowerDirs | None = None

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            with open("/proc/filesystems") as f:
                if "overlay" not in f.read():
                    return "the kernel has no overlayfs"
        except OSError:
            return "cannot read /proc/filesystems"
        return overlay_mode()[1]

    @property
    def cache_dir(self) -> Path:
        root = cache_root(self.store.path.absolute())
        return root / self.flavour.cache if self.flavour.cache else root

    def lower_dir(self, layer_id: bytes) -> Path:
        return self.lowers.lower_dir(layer_id)

    def lower_dirs(self, parent: bytes, lowers: LowerDirs | None = None) -> list[Path]:
        """The parent chain's lower directories, newest first, materialised if needed."""
        return (lowers or self.lowers).materialised(parent)

    @property
    def host_lowers(self) -> LowerDirs:
        """Lower directories whose owners are read as host ids (see HostIds)."""
        if self._host_lowers is None:
            cache = self.cache_dir.with_name(self.cache_dir.name + HOST_IDS_SUFFIX)
            self._host_lowers = LowerDirs(self.layers, self.flavour, cache,
                                          HostIds(self.lowers.idmaps))
        return self._host_lowers

    def _lowers_for(self, parent: bytes | None) -> LowerDirs:
        """For a new snapshot on `parent`: in a user namespace, the host-id lower
        directories where the chain's owners are mapped only as host ids (a user's
        own files, snapshotted outside `unshare -Urm`), else this mode's."""
        if parent is None or self.flavour.mode != USERXATTR:
            return self.lowers
        owners = {(e.uid, e.gid) for lid in self.layers.chain(parent)
                  for e in self.layers.entries(lid) if e.kind != WHITEOUT}
        host = HostIds(self.lowers.idmaps)
        return self.host_lowers if host.applies(owners) else self.lowers

    def _lowers_of(self, sdir: Path) -> LowerDirs:
        """The lower directories the snapshot `sdir` was made with."""
        data = check_mode(sdir, self.flavour)
        return self.host_lowers if data.get("host_ids") else self.lowers

    # -- snapshots -------------------------------------------------------------------
    def create(self, sdir: Path, parent: bytes | None, readonly: bool) -> None:
        if parent is not None and (depth := len(self.layers.chain(parent))) > \
                OVERLAY_MAX_LOWERS:
            raise FailedPrecondition(
                f"layer {parent.hex()[:12]} is {depth} layers deep; overlayfs stacks at "
                f"most {OVERLAY_MAX_LOWERS} lower directories (use the copy driver)")
        lowers = self._lowers_for(parent)
        sdir.mkdir(parents=True)
        if lowers.host_ids is not None:
            record_mode(sdir, self.flavour, host_ids=True,
                        cache=self.flavour.cache + HOST_IDS_SUFFIX)
        else:
            record_mode(sdir, self.flavour)
        fs = sdir / "fs"
        os.mkdir(fs, 0o755)
        os.chmod(fs, 0o755)  # whatever the umask
        os.mkdir(sdir / "work", 0o700)
        if parent is not None:
            self.lower_dirs(parent, lowers)
            # overlayfs takes the merged root's attributes from the upper root
            root = lowers.owned(self.layers.tree(parent)[0])
            lowers.check_entry(parent, root)
            apply_metadata(os.fsencode(fs), Entry(b"", DIR, root.mode, root.uid, root.gid,
                                         root.mtime_ns, xattrs=root.xattrs))

    def mounts(self, sdir: Path, parent: bytes | None, readonly: bool) -> list[Mount]:
        chosen = self._lowers_of(sdir)
        if parent is None:
            return [Mount("bind", str(sdir / "fs"), ["rbind", "ro" if readonly else "rw"])]
        lowers = [str(p) for p in self.lower_dirs(parent, chosen)]
        options = list(self.flavour.options)
        if readonly:
            if len(lowers) == 1:
                return [Mount("bind", lowers[0], ["rbind", "ro"])]
            return [Mount("overlay", "overlay", ["ro", "lowerdir=" + ":".join(lowers),
                                                 *options])]
        return [Mount("overlay", "overlay", [
            "lowerdir=" + ":".join(lowers), f"upperdir={sdir / 'fs'}",
            f"workdir={sdir / 'work'}", *options, *self.flavour.rw_options])]

    def upper_entries(self, sdir: Path, parent: bytes | None, sink,
                      progress: Callable[[int], None] | None = None,
                      on_file: Callable[[bytes | None, int], None] | None = None
                      ) -> list[Entry]:
        """The upper directory as a layer's own entries (see `upper.upper_entries`)."""
        host_ids = self._lowers_of(sdir).host_ids
        tree = self.layers.tree(parent) if parent is not None else None
        return upper_entries(self.store, self.flavour, sdir / "fs", tree, sink,
                             host_ids.outside if host_ids is not None else None, progress,
                             on_file)

    def commit(self, sdir: Path, parent: bytes | None, message: str = "",
               tag: str | None = None,
               progress: Callable[[int], None] | None = None) -> bytes:
        with self.store.writer() as writer:
            own = self.upper_entries(sdir, parent, writer.put, progress, writer.file_hint)
            return self.layers.commit_entries(parent, own, writer, tag, message)

    def usage(self, sdir: Path, parent: bytes | None) -> Usage:
        missing = MissingChunks(self.store)
        return usage_of_entries(self.upper_entries(sdir, parent, missing), missing)

    # -- caches ----------------------------------------------------------------------
    def collect(self, live_layers: set[bytes]) -> int:
        """Every mode's materialised layers not in `live_layers`, and cached files no
        lower directory links any more."""
        return collect_caches(self.store.path.absolute(), live_layers)

    def cache_bytes(self) -> int:
        return cache_bytes(self.store.path.absolute())
