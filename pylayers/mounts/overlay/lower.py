"""Lower directories: each layer materialised once, as a directory holding the layer's
own entries in overlayfs form (whiteouts as 0/0 character devices, opaque directories
marked with the mode's `overlay.opaque` xattr).

Regular files in lower directories are hardlinks into one file cache keyed by path,
content and metadata, so a file that appears in many layers and images occupies one
inode. The path is part of the key so that a mount shows as one inode exactly the
names the layer hardlinks (whose entries all use their group's first path), not every
pair of equal files: a program reading the mount (tar, cp -a, `pylayers snapshot`)
would keep those as hardlinks.

A layer entry that overlayfs would read as something else is refused, naming it: a
0/0 character device (overlayfs's whiteout: the mount would hide the parent's entry
instead of showing a device) and, in userxattr mode, an xattr in overlayfs's own
namespace or an owner the user namespace does not map.
"""

from __future__ import annotations

import copy
import errno
import os
import shutil
import struct
from pathlib import Path

import blake3

from ... import userns
from ...errors import PylayersError
from ...layers.manifest import BLK, CHR, DIR, FIFO, HARDLINK, OPAQUE, REG, SYMLINK, WHITEOUT, Entry
from ...layers.materialise import apply_metadata, make_node, write_file
from ...layers.repo import Layers
from .cache import unique
from .mode import USERXATTR, Flavour, HostIds


class LowerDirs:
    """The lower directories and file cache of one cache set (one mode; with
    `host_ids`, owners read as ids outside the user namespace)."""

    def __init__(self, layers: Layers, flavour: Flavour, cache_dir: Path,
                 host_ids: HostIds | None = None) -> None:
        self.layers = layers
        self.host_ids = host_ids
        self.store = layers.store
        self.flavour = flavour
        self.layers_dir = cache_dir / "layers"
        self.files_dir = cache_dir / "files"
        self.idmaps = (userns.read_idmap("uid"), userns.read_idmap("gid"))

    def lower_dir(self, layer_id: bytes) -> Path:
        return self.layers_dir / layer_id.hex()[:16]

    def owned(self, e: Entry) -> Entry:
        """The entry with the owner its lower directory gives it (a copy, translated
        from host ids, where this cache set reads them so)."""
        if self.host_ids is None or e.kind == WHITEOUT:
            return e
        c = copy.copy(e)
        c.uid, c.gid = self.host_ids.inside(e.uid, e.gid)
        return c

    def check_entry(self, layer_id: bytes, e: Entry) -> None:
        """Refuse what a lower directory of this mode cannot hold faithfully."""
        where = f"/{os.fsdecode(e.path)} in layer {layer_id.hex()[:12]}"
        if e.kind == CHR and tuple(e.rdev) == (0, 0):
            raise PylayersError(
                f"{where} is a character device 0/0, which overlayfs would show as a "
                "whiteout (hiding what lies below) instead of a device: mount this "
                "layer with the copy driver, or check it out")
        if self.flavour.mode != USERXATTR:
            return
        problem = userns.unmapped_owner(e.uid, e.gid, self.idmaps)
        if problem is not None:
            raise PylayersError(f"{problem} (owner of {where}); mount it as root, or "
                                "with a user namespace that maps it")
        for name, _value in e.xattrs:
            if name.startswith(self.flavour.private_prefix):
                raise PylayersError(
                    f"{where} has the xattr {name.decode(errors='replace')}, which "
                    "overlayfs in a user namespace (userxattr) keeps for itself: mount "
                    "it as root, or use the copy driver")

    def materialised(self, parent: bytes) -> list[Path]:
        """The parent chain's lower directories, newest first, materialised if needed."""
        chain = self.layers.chain(parent)
        for lid in reversed(chain):
            d = self.lower_dir(lid)
            if not d.exists():  # Layers.tree validates it, and caches it for the next
                self._materialise(lid, self.layers.tree(lid), d)
        return [self.lower_dir(lid) for lid in chain]

    def _cached_file(self, e: Entry) -> bytes:
        """Path of the file cache's copy of the file at this path with this content and
        metadata (for a hardlink group: its first file's entry)."""
        h = blake3.blake3(e.content)
        h.update(struct.pack("<IIIqI", e.mode, e.uid, e.gid, e.mtime_ns, len(e.path)) + e.path)
        for name, value in e.xattrs:
            h.update(struct.pack("<HI", len(name), len(value)) + name + value)
        key = h.hexdigest()
        path = self.files_dir / key[:2] / key
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{key}.{unique()}.tmp")
            try:
                write_file(os.fsencode(tmp), e, self.store.read_chunk)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            # Never replace a cached file: another thread or process may be linking it
            # into a lower directory, and link(2) of an inode whose last name was just
            # replaced fails with ENOENT. The first one made stays.
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        return os.fsencode(path)

    def _materialise(self, layer_id: bytes, tree: list[Entry], dest: Path) -> None:
        """Write the layer's own entries into a temporary directory beside `dest`, and
        rename it into place only once complete: a failure (an unmapped owner, a full
        disk) leaves no lower directory behind, half made or otherwise."""
        tmp = dest.with_name(dest.name + f".tmp{unique()}")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(tmp, 0o700)
        try:
            self._fill(layer_id, tree, os.fsencode(tmp))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            os.rename(tmp, dest)
        except OSError as err:  # another process materialised it first
            shutil.rmtree(tmp, ignore_errors=True)
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise

    def _fill(self, layer_id: bytes, tree: list[Entry], base: bytes) -> None:
        own = [self.owned(e) for e in self.layers.entries(layer_id)]
        full = {e.path: self.owned(e) for e in tree}
        opaque = self.flavour.opaque_xattr
        made: set[bytes] = {b""}
        dirs: list[tuple[bytes, Entry]] = [(base, full[b""])]

        def ensure_parent(path: bytes) -> None:
            parent = path.rpartition(b"/")[0] if b"/" in path else b""
            if parent in made:
                return
            ensure_parent(parent)
            self.check_entry(layer_id, full[parent])
            os.mkdir(base + b"/" + parent, 0o700)
            made.add(parent)
            dirs.append((base + b"/" + parent, full[parent]))

        def failed(e: Entry, err: OSError) -> PylayersError:
            return PylayersError(f"cannot materialise /{os.fsdecode(e.path)} of layer "
                                 f"{layer_id.hex()[:12]} for overlayfs: {err.strerror}")

        for e in own:
            self.check_entry(layer_id, e)
            if not e.path:
                dirs[0] = (base, e)
                continue
            path = base + b"/" + e.path
            try:
                ensure_parent(e.path)
                if e.kind == WHITEOUT:
                    # a 0/0 character device needs no CAP_MKNOD (Linux 5.8+), so this
                    # works in a user namespace too
                    os.mknod(path, 0o020000 | 0o600, os.makedev(0, 0))
                elif e.kind == DIR:
                    os.mkdir(path, 0o700)
                    made.add(e.path)
                    dirs.append((path, e))
                    if e.flags & OPAQUE:
                        os.setxattr(path, opaque, b"y")
                elif e.kind == REG:
                    os.link(self._cached_file(e), path)
                elif e.kind == HARDLINK:
                    target = full.get(e.target)
                    if target is None or target.kind != REG:
                        raise PylayersError(f"layer {layer_id.hex()[:12]}: hardlink /"
                                            f"{os.fsdecode(e.path)} has no target")
                    self.check_entry(layer_id, target)
                    os.link(self._cached_file(target), path)
                elif e.kind in (SYMLINK, CHR, BLK, FIFO):
                    make_node(path, e)
            except OSError as err:
                raise failed(e, err) from None
        for path, e in reversed(dirs):
            try:
                apply_metadata(path, e)
                if e.flags & OPAQUE:
                    os.setxattr(path, opaque, b"y")
            except OSError as err:
                raise failed(e, err) from None
