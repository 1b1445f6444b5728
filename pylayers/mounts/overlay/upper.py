"""Upper directories: reading what a writable overlay mount changed back as a layer's
own entries (whiteouts and opaque markers translated, overlayfs's private xattrs
dropped, entries equal to the parent's left out, the parent's hardlinks kept valid)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ...layers.manifest import CHR, DIR, OPAQUE, WHITEOUT, Entry
from ...layers.scan import Scanner
from ...layers.tree import relink_survivors
from .mode import Flavour


def _unchanged(old: Entry, new: Entry) -> bool:
    """Whether an upper entry just repeats the parent's. A directory copied up from an
    opaque lower one is not opaque itself (overlayfs does not copy its private xattrs):
    that alone is no change."""
    if old == new:
        return True
    if old.kind == DIR and new.kind == DIR and old.opaque and not new.opaque:
        return old.same_metadata(new)
    return False


def upper_entries(store, flavour: Flavour, upper: Path, parent_tree: list[Entry] | None,
                  sink, owner: Callable[[int, int], tuple[int, int]] | None = None,
                  progress: Callable[[int], None] | None = None,
                  on_file: Callable[[bytes | None, int], None] | None = None
                  ) -> list[Entry]:
    """The upper directory `upper` over the parent's tree (None: no parent) as a
    layer's own entries; chunks go to `sink` (the store's writer, or a hash-only
    sink). `owner` maps the (uid, gid) the upper directory shows to the one stored
    (the host's, for a snapshot whose lower directories read owners as host ids).
    `on_file`: the writer's `file_hint` (deltas against a path's last version)."""
    private, opaque = flavour.private_prefix, flavour.opaque_xattr
    scanner = Scanner(store, store.config.chunker, sink, progress=progress)
    scanner.reader.on_file = on_file
    scanned = scanner.scan(upper)
    base = {e.path: e for e in parent_tree} if parent_tree is not None else {}
    own = []
    opaque_prefix: bytes | None = None  # key prefix of the opaque directory we are in
    for e in scanned:
        if opaque_prefix is not None and not e.key.startswith(opaque_prefix):
            opaque_prefix = None
        xattrs = tuple(x for x in e.xattrs if not x[0].startswith(private))
        if owner is not None and not (e.kind == CHR and e.rdev == (0, 0)):
            e.uid, e.gid = owner(e.uid, e.gid)
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
    if parent_tree is not None:
        own = relink_survivors(parent_tree, base, own)
    return own
