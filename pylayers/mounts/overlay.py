"""The `overlay` driver: kernel overlayfs.

Each layer is materialised once, as a lower directory holding the layer's own entries
in overlayfs form (whiteouts as 0/0 character devices, opaque directories marked with
the `trusted.overlay.opaque` xattr). Regular files in lower directories are hardlinks
into one file cache keyed by path, content and metadata, so a file that appears in
many layers and images occupies one inode. The path is part of the key so that a
mount shows as one inode exactly the names the layer hardlinks (whose entries all
use their group's first path), not every pair of equal files: a program reading the
mount (tar, cp -a, `pylayers snapshot`) would keep those as hardlinks. Both are
caches: `drop_caches` deletes them and they are rebuilt from the store on the next
mount.

An active snapshot is `upperdir` + `workdir` over its parent's lower directories;
commit reads the upper directory back into a layer.
"""

from __future__ import annotations

import errno
import os
import shutil
import struct
from pathlib import Path

import blake3

from ..errors import PylayersError
from ..layers.checkout import _meta, write_file
from ..layers.manifest import BLK, CHR, DIR, FIFO, HARDLINK, OPAQUE, REG, SYMLINK, WHITEOUT, Entry
from ..layers.scan import Scanner
from ..layers.tree import apply_layer
from .drivers import Driver
from .snapshotter import Mount, Usage

# The mounts use overlayfs's trusted.overlay.* xattrs (no `userxattr` option):
# user.overlay.* is then an ordinary namespace, for the files' owners to use.
OPAQUE_XATTRS = (b"trusted.overlay.opaque",)
OVERLAY_XATTR_PREFIXES = (b"trusted.overlay.",)


def cache_root(store_path: Path) -> Path:
    return store_path / "cache"


def drop_caches(store_path: Path) -> int:
    """Delete materialised layers and the file cache; returns bytes freed (approx.)."""
    root = cache_root(store_path)
    freed = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            try:
                st = os.lstat(os.path.join(dirpath, f))
                if st.st_nlink == 1:
                    freed += st.st_blocks * 512
            except OSError:
                pass
    shutil.rmtree(root, ignore_errors=True)
    return freed


def cache_bytes(store_path: Path) -> int:
    """Bytes the caches occupy on disk, each inode counted once."""
    seen: set[int] = set()
    total = 0
    for dirpath, _dirs, files in os.walk(cache_root(store_path)):
        for f in files:
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except OSError:
                continue
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total


def collect_caches(store_path: Path, live_layers: set[bytes]) -> int:
    """Delete materialised layers whose layer is gone, then cached files no layer
    directory links to any more. Returns bytes freed (approx.)."""
    freed = 0
    live = {lid.hex()[:16] for lid in live_layers}
    layers_dir = cache_root(store_path) / "layers"
    if layers_dir.exists():
        for d in layers_dir.iterdir():
            if d.name.split(".")[0] not in live or ".tmp" in d.name:
                shutil.rmtree(d, ignore_errors=True)
    files_dir = cache_root(store_path) / "files"
    if files_dir.exists():
        for sub in files_dir.iterdir():
            for f in sub.iterdir():
                st = f.lstat()
                if st.st_nlink == 1:
                    freed += st.st_blocks * 512
                    f.unlink()
    return freed


def _unique() -> str:
    """A temporary name's suffix no other process or thread uses: threads of one
    process share its pid, and would write into (or delete) each other's files."""
    return f"{os.getpid()}-{os.urandom(6).hex()}"


def _unchanged(old: Entry, new: Entry) -> bool:
    """Whether an upper entry just repeats the parent's. A directory copied up from an
    opaque lower one is not opaque itself (overlayfs does not copy its private xattrs):
    that alone is no change."""
    if old == new:
        return True
    if old.kind == DIR and new.kind == DIR and old.opaque and not new.opaque:
        return old.same_metadata(new)
    return False


def _relink_survivors(tree: list[Entry], base: dict[bytes, Entry],
                      own: list[Entry]) -> list[Entry]:
    """Keep the parent's hardlinks valid. A hardlink entry names the path of its
    group's first file; when this layer removes, replaces or changes that path,
    overlayfs (index=off) has copied up only the name used, and the group's other
    names still show the old inode. Those names, left alone in the upper directory,
    must not follow the path to something else (or to nothing): they become a group of
    their own, the first a file with the old content and metadata, the rest hardlinks
    to it. `own` is in component order, and so is the result."""
    groups: dict[bytes, list[Entry]] = {}
    for e in tree:
        if e.kind == HARDLINK:
            groups.setdefault(e.target, []).append(e)
    if not groups:
        return own
    after = {e.path: e for e in apply_layer(tree, own)}
    extra: list[Entry] = []
    for target, names in groups.items():
        old = base.get(target)
        if old is None or after.get(target) is old:
            continue  # the group's file is the parent's still
        survivors = [e for e in names if after.get(e.path) is e]
        if not survivors:
            continue
        first = survivors[0].path
        extra.append(Entry(first, REG, old.mode, old.uid, old.gid, old.mtime_ns, old.size,
                           old.content, old.chunks, xattrs=old.xattrs))
        extra.extend(Entry(e.path, HARDLINK, old.mode, old.uid, old.gid, old.mtime_ns,
                           target=first, xattrs=old.xattrs) for e in survivors[1:])
    if not extra:
        return own
    return sorted(own + extra, key=lambda e: e.key)


class OverlayDriver(Driver):
    name = "overlay"

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            with open("/proc/filesystems") as f:
                if "overlay" not in f.read():
                    return "the kernel has no overlayfs"
        except OSError:
            return "cannot read /proc/filesystems"
        if os.geteuid() != 0:
            return "mounting overlayfs needs root (or a user namespace)"
        return None

    @property
    def layers_dir(self) -> Path:
        return cache_root(self.store.path.absolute()) / "layers"

    @property
    def files_dir(self) -> Path:
        return cache_root(self.store.path.absolute()) / "files"

    def lower_dir(self, layer_id: bytes) -> Path:
        return self.layers_dir / layer_id.hex()[:16]

    # -- lower directories ---------------------------------------------------------
    def lower_dirs(self, parent: bytes) -> list[Path]:
        """The parent chain's lower directories, newest first, materialised if needed."""
        chain = self.layers.chain(parent)
        tree: list[Entry] | None = None
        for lid in reversed(chain):
            d = self.lower_dir(lid)
            if d.exists():
                tree = None  # not needed unless a later layer is missing
                continue
            if tree is None:
                tree = self.layers.tree(lid)
            else:
                tree = apply_layer(tree, self.layers.entries(lid))
            self._materialise(lid, tree, d)
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
            tmp = path.with_name(f".{key}.{_unique()}.tmp")
            write_file(os.fsencode(tmp), e, self.store.read_chunk)
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
        own = self.layers.entries(layer_id)
        full = {e.path: e for e in tree}
        tmp = dest.with_name(dest.name + f".tmp{_unique()}")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(tmp, 0o700)
        base = os.fsencode(tmp)
        made: set[bytes] = {b""}
        dirs: list[tuple[bytes, Entry]] = [(base, full[b""])]

        def ensure_parent(path: bytes) -> None:
            parent = path.rpartition(b"/")[0] if b"/" in path else b""
            if parent in made:
                return
            ensure_parent(parent)
            os.mkdir(base + b"/" + parent, 0o700)
            made.add(parent)
            dirs.append((base + b"/" + parent, full[parent]))

        for e in own:
            if not e.path:
                dirs[0] = (base, e)
                continue
            ensure_parent(e.path)
            path = base + b"/" + e.path
            if e.kind == WHITEOUT:
                os.mknod(path, 0o020000 | 0o600, os.makedev(0, 0))
            elif e.kind == DIR:
                os.mkdir(path, 0o700)
                made.add(e.path)
                dirs.append((path, e))
                if e.flags & OPAQUE:
                    os.setxattr(path, b"trusted.overlay.opaque", b"y")
            elif e.kind == REG:
                os.link(self._cached_file(e), path)
            elif e.kind == HARDLINK:
                target = full.get(e.target)
                if target is None or target.kind != REG:
                    raise PylayersError(f"layer {layer_id.hex()[:12]}: hardlink /"
                                        f"{os.fsdecode(e.path)} has no target")
                os.link(self._cached_file(target), path)
            elif e.kind == SYMLINK:
                os.symlink(e.target, path)
                _meta(path, e)
            elif e.kind in (CHR, BLK, FIFO):
                kind = {CHR: 0o020000, BLK: 0o060000, FIFO: 0o010000}[e.kind]
                os.mknod(path, kind | 0o600, os.makedev(*e.rdev) if e.kind != FIFO else 0)
                _meta(path, e)
        for path, e in reversed(dirs):
            _meta(path, e)
            if e.flags & OPAQUE:
                os.setxattr(path, b"trusted.overlay.opaque", b"y")
        try:
            os.rename(tmp, dest)
        except OSError as err:  # another process materialised it first
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            shutil.rmtree(tmp)

    # -- snapshots -------------------------------------------------------------------
    def create(self, sdir: Path, parent: bytes | None, readonly: bool) -> None:
        sdir.mkdir(parents=True)
        fs = sdir / "fs"
        os.mkdir(fs, 0o755)
        os.mkdir(sdir / "work", 0o700)
        if parent is not None:
            self.lower_dirs(parent)
            # overlayfs takes the merged root's attributes from the upper root
            root = self.layers.tree(parent)[0]
            _meta(os.fsencode(fs), Entry(b"", DIR, root.mode, root.uid, root.gid,
                                         root.mtime_ns, xattrs=root.xattrs))

    def mounts(self, sdir: Path, parent: bytes | None, readonly: bool) -> list[Mount]:
        if parent is None:
            return [Mount("bind", str(sdir / "fs"), ["rbind", "ro" if readonly else "rw"])]
        lowers = [str(p) for p in self.lower_dirs(parent)]
        if readonly:
            if len(lowers) == 1:
                return [Mount("bind", lowers[0], ["rbind", "ro"])]
            return [Mount("overlay", "overlay", ["ro", "lowerdir=" + ":".join(lowers)])]
        # Commit reads the upper directory as plain files: pin off the features that
        # would leave it holding xattr references instead (a renamed directory's
        # redirect, a chmod-ed file's metadata-only copy), whatever the module's
        # defaults on this host.
        return [Mount("overlay", "overlay", [
            "lowerdir=" + ":".join(lowers), f"upperdir={sdir / 'fs'}",
            f"workdir={sdir / 'work'}", "index=off", "redirect_dir=off", "metacopy=off"])]

    def upper_entries(self, sdir: Path, parent: bytes | None, sink) -> list[Entry]:
        """The upper directory as a layer's own entries: whiteouts and opaque markers
        translated, overlay's private xattrs dropped, and entries identical to the
        parent's (directories copied up only to hold a changed child) left out."""
        store = self.store
        scanner = Scanner(store, store.config.chunker, sink)
        upper = scanner.scan(sdir / "fs")
        base = {e.path: e for e in self.layers.tree(parent)} if parent is not None else {}
        own = []
        opaque_prefix: bytes | None = None  # key prefix of the opaque directory we are in
        for e in upper:
            if opaque_prefix is not None and not e.key.startswith(opaque_prefix):
                opaque_prefix = None
            xattrs = tuple(x for x in e.xattrs if not x[0].startswith(OVERLAY_XATTR_PREFIXES))
            if e.kind == CHR and e.rdev == (0, 0):
                e = Entry(e.path, WHITEOUT)
            elif e.kind == DIR and any(x[0] in OPAQUE_XATTRS and x[1] == b"y"
                                       for x in e.xattrs):
                e.flags |= OPAQUE
            e.xattrs = xattrs
            old = base.get(e.path)
            if e.kind == DIR and e.opaque:
                # Nothing of the parent's shows through an opaque directory: it and
                # every entry under it are stored, even those equal to the parent's.
                if opaque_prefix is None:
                    opaque_prefix = e.key + b"\x00"
            elif opaque_prefix is None and old is not None and _unchanged(old, e):
                continue
            if e.kind == WHITEOUT and old is None:
                continue  # whiteout of something the parent does not have
            own.append(e)
        if parent is not None:
            own = _relink_survivors(self.layers.tree(parent), base, own)
        return own

    def commit(self, sdir: Path, parent: bytes | None, message: str = "",
               tag: str | None = None) -> bytes:
        with self.store.writer() as writer:
            own = self.upper_entries(sdir, parent, writer.put)
            return self.layers.commit_entries(parent, own, writer, tag, message)

    def usage(self, sdir: Path, parent: bytes | None) -> Usage:
        seen: dict[bytes, int] = {}

        def sink(cid: bytes, data) -> bool:
            if cid in seen or self.store.has_chunk(cid):
                return False
            seen[cid] = len(data)
            return True

        own = self.upper_entries(sdir, parent, sink)
        return Usage(sum(e.size for e in own if e.kind == REG), len(own), sum(seen.values()))
