"""The `overlay` driver: kernel overlayfs.

It works in two modes. As root in the initial user namespace, overlayfs keeps its
private xattrs under `trusted.overlay.*` (and `user.overlay.*` is an ordinary xattr
namespace, for the files' owners). Without root, inside a user namespace that owns its
mount namespace (`unshare -Urm`, rootless containers), overlayfs is mounted with the
`userxattr` option and uses `user.overlay.*` instead, and only the namespace's mapped
ids can own files.

Each layer is materialised once, as a lower directory holding the layer's own entries
in overlayfs form (whiteouts as 0/0 character devices, opaque directories marked with
the mode's `overlay.opaque` xattr). Regular files in lower directories are hardlinks
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
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import blake3

from .. import userns
from ..errors import FailedPrecondition, PylayersError
from ..layers.checkout import _meta, write_file
from ..layers.manifest import BLK, CHR, DIR, FIFO, HARDLINK, OPAQUE, REG, SYMLINK, WHITEOUT, Entry
from ..layers.scan import Scanner
from ..layers.tree import apply_layer
from .drivers import Driver
from .snapshotter import Mount, Usage

ROOT = "root"
USERXATTR = "userxattr"


@dataclass(frozen=True)
class Flavour:
    """How overlayfs is used in one mode: the xattrs it keeps its markers in, the
    mount options, and where under STORE/cache that mode's lower directories and
    cached files live (their markers and owners differ, so the modes never share)."""

    mode: str
    opaque_xattr: bytes
    private_prefix: bytes  # overlayfs's own xattrs: dropped from the upper dir at commit
    options: tuple[str, ...]  # added to every overlay mount
    rw_options: tuple[str, ...]  # added to writable mounts
    cache: str  # subdirectory of STORE/cache ("" for root mode)


# Commit reads the upper directory as plain files: writable mounts pin off the features
# that would leave it holding xattr references instead (a renamed directory's redirect,
# a chmod-ed file's metadata-only copy), whatever the module's defaults on this host.
# With `userxattr` the kernel refuses redirect_dir=off; nofollow is the same for us:
# redirects are neither made (a lower directory's rename is EXDEV) nor followed.
ROOT_FLAVOUR = Flavour(ROOT, b"trusted.overlay.opaque", b"trusted.overlay.", (),
                       ("index=off", "redirect_dir=off", "metacopy=off"), "")


def userxattr_flavour(mapping: str) -> Flavour:
    """Inside a user namespace. Files under one uid/gid mapping show other owners
    under another, so each mapping has its own cache."""
    return Flavour(USERXATTR, b"user.overlay.opaque", b"user.overlay.", ("userxattr",),
                   ("index=off", "redirect_dir=nofollow", "metacopy=off"),
                   f"userns/{mapping}")


def overlay_mode() -> tuple[str | None, str | None]:
    """(ROOT or USERXATTR, None) where this process can mount overlayfs, else
    (None, the reason it cannot)."""
    hint = "run inside `unshare -Urm` (a user namespace: overlayfs with userxattr), " \
        "or use the copy driver"
    if userns.in_initial_userns():
        if os.geteuid() == 0:
            return ROOT, None
        return None, f"mounting overlayfs needs root; without root, {hint}"
    if os.geteuid() != 0 or not userns.has_cap(userns.CAP_SYS_ADMIN):
        return None, f"not root in this user namespace (no CAP_SYS_ADMIN); {hint}"
    if not userns.owns_mount_namespace():
        return None, f"this user namespace does not own its mount namespace; {hint}"
    return USERXATTR, None


def current_flavour() -> Flavour:
    mode, _reason = overlay_mode()
    if mode == USERXATTR:
        return userxattr_flavour(userns.mapping_id())
    return ROOT_FLAVOUR


def cache_root(store_path: Path) -> Path:
    return store_path / "cache"


def cache_sets(store_path: Path) -> list[Path]:
    """Every mode's cache directory (each holds layers/ and files/): root mode's is
    STORE/cache itself, each user namespace mapping's STORE/cache/userns/<id>."""
    root = cache_root(store_path)
    sets = [root]
    try:
        sets += sorted(p for p in (root / "userns").iterdir() if p.is_dir())
    except OSError:
        pass
    return sets


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
    for cache in cache_sets(store_path):
        layers_dir = cache / "layers"
        if layers_dir.exists():
            for d in layers_dir.iterdir():
                if d.name.split(".")[0] not in live or ".tmp" in d.name:
                    shutil.rmtree(d, ignore_errors=True)
        files_dir = cache / "files"
        if files_dir.exists():
            for sub in files_dir.iterdir():
                for f in sub.iterdir():
                    try:
                        st = f.lstat()
                        if st.st_nlink == 1:
                            f.unlink()
                            freed += st.st_blocks * 512
                    except OSError:  # another mode's cache this process may not touch
                        pass
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

    def __init__(self, layers) -> None:
        super().__init__(layers)
        self.flavour = current_flavour()
        self._idmaps = (userns.read_idmap("uid"), userns.read_idmap("gid"))

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

    @property
    def layers_dir(self) -> Path:
        return self.cache_dir / "layers"

    @property
    def files_dir(self) -> Path:
        return self.cache_dir / "files"

    def lower_dir(self, layer_id: bytes) -> Path:
        return self.layers_dir / layer_id.hex()[:16]

    # -- the mode a snapshot was made in -------------------------------------------
    def _record(self, sdir: Path) -> None:
        data = {"mode": self.flavour.mode, "cache": self.flavour.cache}
        (sdir / "overlay.json").write_text(json.dumps(data, sort_keys=True) + "\n")

    def _check_mode(self, sdir: Path) -> None:
        """A snapshot's upper directory holds its mode's markers and owners as its
        user namespace maps them: mount, read and commit it only in that mode."""
        try:
            data = json.loads((sdir / "overlay.json").read_text())
        except FileNotFoundError:
            data = {"mode": ROOT, "cache": ""}  # made before modes were recorded
        except (OSError, ValueError) as err:
            raise PylayersError(f"cannot read {sdir / 'overlay.json'}: {err}") from None
        if (data.get("mode"), data.get("cache")) == (self.flavour.mode, self.flavour.cache):
            return
        if data.get("mode") == ROOT:
            where = "as root outside any user namespace"
        else:
            where = "inside a user namespace with the uid/gid mapping it was made with " \
                "(e.g. `unshare -Urm` as the same user)"
        raise FailedPrecondition(f"this overlay snapshot was made in {data.get('mode')} "
                                 f"mode: use it {where}")

    def _check_entry(self, layer_id: bytes, e: Entry) -> None:
        """Refuse what a lower directory of this mode cannot hold: in a user namespace,
        unmapped owners and overlayfs's own xattr namespace (user.overlay.*)."""
        if self.flavour.mode != USERXATTR:
            return
        where = f"/{os.fsdecode(e.path)} in layer {layer_id.hex()[:12]}"
        problem = userns.unmapped_owner(e.uid, e.gid, self._idmaps)
        if problem is not None:
            raise PylayersError(f"{problem} (owner of {where}); mount it as root, or "
                                "with a user namespace that maps it")
        for name, _value in e.xattrs:
            if name.startswith(self.flavour.private_prefix):
                raise PylayersError(
                    f"{where} has the xattr {name.decode(errors='replace')}, which "
                    "overlayfs in a user namespace (userxattr) keeps for itself: mount "
                    "it as root, or use the copy driver")

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
        tmp = dest.with_name(dest.name + f".tmp{_unique()}")
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
        own = self.layers.entries(layer_id)
        full = {e.path: e for e in tree}
        opaque = self.flavour.opaque_xattr
        made: set[bytes] = {b""}
        dirs: list[tuple[bytes, Entry]] = [(base, full[b""])]

        def ensure_parent(path: bytes) -> None:
            parent = path.rpartition(b"/")[0] if b"/" in path else b""
            if parent in made:
                return
            ensure_parent(parent)
            self._check_entry(layer_id, full[parent])
            os.mkdir(base + b"/" + parent, 0o700)
            made.add(parent)
            dirs.append((base + b"/" + parent, full[parent]))

        def failed(e: Entry, err: OSError) -> PylayersError:
            return PylayersError(f"cannot materialise /{os.fsdecode(e.path)} of layer "
                                 f"{layer_id.hex()[:12]} for overlayfs: {err.strerror}")

        for e in own:
            self._check_entry(layer_id, e)
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
                    self._check_entry(layer_id, target)
                    os.link(self._cached_file(target), path)
                elif e.kind == SYMLINK:
                    os.symlink(e.target, path)
                    _meta(path, e)
                elif e.kind in (CHR, BLK, FIFO):
                    kind = {CHR: 0o020000, BLK: 0o060000, FIFO: 0o010000}[e.kind]
                    os.mknod(path, kind | 0o600,
                             os.makedev(*e.rdev) if e.kind != FIFO else 0)
                    _meta(path, e)
            except OSError as err:
                raise failed(e, err) from None
        for path, e in reversed(dirs):
            try:
                _meta(path, e)
                if e.flags & OPAQUE:
                    os.setxattr(path, opaque, b"y")
            except OSError as err:
                raise failed(e, err) from None

    # -- snapshots -------------------------------------------------------------------
    def create(self, sdir: Path, parent: bytes | None, readonly: bool) -> None:
        sdir.mkdir(parents=True)
        self._record(sdir)
        fs = sdir / "fs"
        os.mkdir(fs, 0o755)
        os.mkdir(sdir / "work", 0o700)
        if parent is not None:
            self.lower_dirs(parent)
            # overlayfs takes the merged root's attributes from the upper root
            root = self.layers.tree(parent)[0]
            self._check_entry(parent, root)
            _meta(os.fsencode(fs), Entry(b"", DIR, root.mode, root.uid, root.gid,
                                         root.mtime_ns, xattrs=root.xattrs))

    def mounts(self, sdir: Path, parent: bytes | None, readonly: bool) -> list[Mount]:
        self._check_mode(sdir)
        if parent is None:
            return [Mount("bind", str(sdir / "fs"), ["rbind", "ro" if readonly else "rw"])]
        lowers = [str(p) for p in self.lower_dirs(parent)]
        options = list(self.flavour.options)
        if readonly:
            if len(lowers) == 1:
                return [Mount("bind", lowers[0], ["rbind", "ro"])]
            return [Mount("overlay", "overlay", ["ro", "lowerdir=" + ":".join(lowers),
                                                 *options])]
        return [Mount("overlay", "overlay", [
            "lowerdir=" + ":".join(lowers), f"upperdir={sdir / 'fs'}",
            f"workdir={sdir / 'work'}", *options, *self.flavour.rw_options])]

    def upper_entries(self, sdir: Path, parent: bytes | None, sink) -> list[Entry]:
        """The upper directory as a layer's own entries: whiteouts and opaque markers
        translated, overlay's private xattrs dropped, and entries identical to the
        parent's (directories copied up only to hold a changed child) left out."""
        self._check_mode(sdir)
        private, opaque = self.flavour.private_prefix, self.flavour.opaque_xattr
        store = self.store
        scanner = Scanner(store, store.config.chunker, sink)
        upper = scanner.scan(sdir / "fs")
        base = {e.path: e for e in self.layers.tree(parent)} if parent is not None else {}
        own = []
        opaque_prefix: bytes | None = None  # key prefix of the opaque directory we are in
        for e in upper:
            if opaque_prefix is not None and not e.key.startswith(opaque_prefix):
                opaque_prefix = None
            xattrs = tuple(x for x in e.xattrs if not x[0].startswith(private))
            if e.kind == CHR and e.rdev == (0, 0):
                e = Entry(e.path, WHITEOUT)
            elif e.kind == DIR and any(x[0] == opaque and x[1] == b"y" for x in e.xattrs):
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
