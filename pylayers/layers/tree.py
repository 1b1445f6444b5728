"""Trees: the full, flattened contents of a layer (its chain of diffs applied), and the
comparison of two trees.

A tree is a list of entries in component order, without whiteouts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ..errors import UnsafePath, short_path
from .manifest import (
    DIR,
    HARDLINK,
    OPAQUE,
    REG,
    WHITEOUT,
    Entry,
    decode_entries_at,
    decode_manifest,
    scan_manifest,
)


def apply_layer(base: list[Entry], layer: list[Entry]) -> list[Entry]:
    """The tree that results from putting `layer` (a diff, in component order) on `base`.

    A whiteout deletes its path and everything under it; an opaque directory hides the
    base's contents under it; an entry replacing a directory with a non-directory
    deletes what was under it.
    """
    out: list[Entry] = []
    i, n = 0, len(base)
    for e in layer:
        k = e.key
        while i < n and base[i].key < k:
            out.append(base[i])
            i += 1
        existing = None
        if i < n and base[i].key == k:
            existing = base[i]
            i += 1
        if e.kind == WHITEOUT or e.opaque or (
                existing is not None and existing.kind == DIR and e.kind != DIR):
            prefix = k + b"\x00"
            while i < n and base[i].key.startswith(prefix):
                i += 1
        if e.kind != WHITEOUT:
            out.append(e)
    out.extend(base[i:])
    return out


def chain_tree(base: list[Entry], manifests: list[bytes | bytearray]
               ) -> tuple[list[Entry], list[Entry]]:
    """(the tree, the last layer's own entries) of the layers whose manifests are
    `manifests` (oldest first; each already checked against its layer id) put on
    `base` one after the other: what `apply_layer` gives, applied to each one's
    decoded entries. Only the last layer is decoded whole. The others are scanned
    (`scan_manifest`: sort keys, kinds, flags), applied as those, and only their
    entries that reach the tree are decoded: in a chain of versions most entries of
    an older layer are replaced by a newer one (a six-version chain of a pip-built
    env: 23k of 36k), and decoding an entry costs four times scanning it. An entry
    that never reaches the tree is checked only as far as applying it needs (its
    order, kind and flags; fsck decodes every entry)."""
    if not manifests:
        return base, []
    own = decode_manifest(manifests[-1])[1]
    older = manifests[:-1]
    if not older:
        return apply_layer(base, own), own
    # (key, kind, flags, layer, offset) of a scanned entry; layer -1: a decoded
    # entry, the last element
    tree: list[tuple] = [(e.key, e.kind, e.flags, -1, e) for e in base]
    for n, data in enumerate(older):
        tree = _apply_scanned(tree, scan_manifest(data, n))
    tree = _apply_scanned(tree, [(e.key, e.kind, e.flags, -1, e) for e in own])
    starts: list[list[int]] = [[] for _ in older]
    for t in tree:
        if t[3] >= 0:
            starts[t[3]].append(t[4])
    decoded = [iter(decode_entries_at(data, at)) for data, at in zip(older, starts,
                                                                     strict=True)]
    return [t[4] if t[3] < 0 else next(decoded[t[3]]) for t in tree], own


def _apply_scanned(base: list[tuple], layer: list[tuple]) -> list[tuple]:
    """`apply_layer` on (key, kind, flags, ...) tuples."""
    out: list[tuple] = []
    i, n = 0, len(base)
    for e in layer:
        k, kind = e[0], e[1]
        while i < n and base[i][0] < k:
            out.append(base[i])
            i += 1
        replaced_dir = False
        if i < n and base[i][0] == k:
            replaced_dir = base[i][1] == DIR
            i += 1
        if kind == WHITEOUT or e[2] & OPAQUE or (replaced_dir and kind != DIR):
            prefix = k + b"\x00"
            while i < n and base[i][0].startswith(prefix):
                i += 1
        if kind != WHITEOUT:
            out.append(e)
    out.extend(base[i:])
    return out


def validate_tree(tree: list[Entry], own: Iterable[Entry] = (), what: str = "") -> None:
    """Raise UnsafePath unless `tree` is safe to write out: a root directory first,
    every entry's parent a directory in the tree (never a symlink or a file), every
    hardlink pointing at a regular file before it; and every whiteout among `own` (the
    entries of the layer whose tree this is) under a directory of the tree, as an
    overlayfs lower directory needs. `what` ("layer 1a2b3c...") starts the message.

    Only the rules of a whole tree: each entry was checked on its own by
    `decode_manifest` (paths, kinds, fields), so a tree must be made of decoded entries
    (or entries `encode_manifest` accepts)."""
    lead = f"{what}: " if what else ""
    if not tree or tree[0].path != b"" or tree[0].kind != DIR:
        raise UnsafePath(f"{lead}the tree has no root directory")
    kinds: dict[bytes, int] = {b"": DIR}
    for e in tree[1:]:
        path = e.path
        if kinds.get(path.rpartition(b"/")[0]) != DIR:
            raise UnsafePath(f"{lead}/{short_path(path)}: its parent is not a directory in "
                             "the layer")
        if e.kind == HARDLINK and kinds.get(e.target) != REG:
            raise UnsafePath(f"{lead}/{short_path(path)}: hardlink target is not a regular "
                             "file in the layer")
        kinds[path] = e.kind
    for e in own:
        if e.kind == WHITEOUT and kinds.get(e.path.rpartition(b"/")[0]) != DIR:
            raise UnsafePath(f"{lead}/{short_path(e.path)}: a whiteout whose parent is not a "
                             "directory in the layer")


def tree_problems(layers: dict[bytes, tuple[bytes | None, list[Entry]]]
                  ) -> Iterator[tuple[bytes, str]]:
    """(layer id, what is wrong) for each layer whose tree `validate_tree` refuses.
    `layers` maps an id to (parent id, own entries); a layer whose parent is not in it
    is skipped (the caller reports the missing parent). Each tree is built once, from
    its parent's, walking down from the base layers."""
    children: dict[bytes | None, list[bytes]] = {}
    for lid, (parent, _own) in layers.items():
        children.setdefault(parent, []).append(lid)
    stack: list[tuple[bytes, list[Entry]]] = [(lid, []) for lid in children.get(None, [])]
    while stack:
        lid, base = stack.pop()
        own = layers[lid][1]
        tree = apply_layer(base, own)
        try:
            validate_tree(tree, own)
        except UnsafePath as e:
            yield lid, str(e)
        stack.extend((child, tree) for child in children.get(lid, ()))


def diff_layer(parent: list[Entry], tree: Iterable[Entry]) -> list[Entry]:
    """The entries to store so that apply_layer(parent, result) == tree: changed and new
    entries, and a whiteout for each deleted path whose parent survives. `tree` may be
    an iterator (a scan as it goes): only the entries that differ are kept."""
    out: list[Entry] = []
    i, n = 0, len(parent)

    def deleted_before(key: bytes | None) -> None:
        """Whiteouts for the parent's entries before `key` (all, if None)."""
        nonlocal i
        while i < n and (key is None or parent[i].key < key):
            gone = parent[i]
            out.append(Entry(gone.path, WHITEOUT))
            i += 1
            prefix = gone.key + b"\x00"
            while i < n and parent[i].key.startswith(prefix):
                i += 1

    for new in tree:
        if i < n and parent[i].key < new.key:
            deleted_before(new.key)
        if i < n and parent[i].key == new.key:
            old = parent[i]
            i += 1
            if not (old == new):
                out.append(new)
            if old.kind == DIR and new.kind != DIR:
                # apply_layer drops the old subtree itself; no whiteouts needed
                prefix = old.key + b"\x00"
                while i < n and parent[i].key.startswith(prefix):
                    i += 1
        else:
            out.append(new)
    deleted_before(None)
    return out


@dataclass
class Change:
    path: bytes
    change: str  # "A", "C" or "D"
    attributes: list[str] = field(default_factory=list)
    old: Entry | None = None
    new: Entry | None = None


def _content_of(e: Entry, links: dict[bytes, Entry]) -> Entry:
    """A hardlink compares as the file it points at."""
    if e.kind == HARDLINK and e.target in links:
        return links[e.target]
    return e


def changed_attributes(old: Entry, new: Entry, old_tree_files: dict[bytes, Entry],
                       new_tree_files: dict[bytes, Entry]) -> list[str]:
    attrs = []
    o, nw = _content_of(old, old_tree_files), _content_of(new, new_tree_files)
    if old.kind != new.kind and not {old.kind, new.kind} <= {REG, HARDLINK}:
        attrs.append("type")
    elif (o.size, o.content, o.target if o.kind != HARDLINK else b"", o.rdev) != (
            nw.size, nw.content, nw.target if nw.kind != HARDLINK else b"", nw.rdev):
        attrs.append("content")
    if old.kind == HARDLINK or new.kind == HARDLINK:
        if (old.kind, old.target) != (new.kind, new.target):
            attrs.append("link")
    # A hardlink entry carries its inode's metadata (the scan lstats every name), so a
    # chown, touch or setxattr of a hardlinked file shows on each of its names.
    if old.mode != new.mode:
        attrs.append("mode")
    if (old.uid, old.gid) != (new.uid, new.gid):
        attrs.append("owner")
    if old.mtime_ns != new.mtime_ns:
        attrs.append("mtime")
    if old.xattrs != new.xattrs:
        attrs.append("xattrs")
    return attrs


def diff_trees(old: list[Entry], new: list[Entry]) -> list[Change]:
    """Changes from tree `old` to tree `new`, in path order: a deleted directory is one D
    with its children unlisted; an added directory is A with each child A; a directory
    whose set of children changed is C ("entries"); the root is never listed."""
    old_files = {e.path: e for e in old if e.kind == REG}
    new_files = {e.path: e for e in new if e.kind == REG}
    changes: list[Change] = []
    touched_dirs: set[bytes] = set()
    i, j, n, m = 0, 0, len(old), len(new)
    while i < n or j < m:
        if j >= m or (i < n and old[i].key < new[j].key):
            gone = old[i]
            changes.append(Change(gone.path, "D", old=gone))
            touched_dirs.add(gone.path.rpartition(b"/")[0])
            i += 1
            prefix = gone.key + b"\x00"
            while i < n and old[i].key.startswith(prefix):
                i += 1
        elif i >= n or new[j].key < old[i].key:
            added = new[j]
            changes.append(Change(added.path, "A", new=added))
            touched_dirs.add(added.path.rpartition(b"/")[0])
            j += 1
        else:
            a, b = old[i], new[j]
            i += 1
            j += 1
            attrs = changed_attributes(a, b, old_files, new_files)
            if a.kind == DIR and b.kind != DIR:
                prefix = a.key + b"\x00"
                while i < n and old[i].key.startswith(prefix):
                    i += 1
            if attrs:
                changes.append(Change(a.path, "C", attrs, a, b))
            elif a.kind == DIR:
                changes.append(Change(a.path, "?", [], a, b))  # resolved below
    out = []
    for c in changes:
        if c.change == "?":
            if c.path in touched_dirs:
                c.change, c.attributes = "C", ["entries"]
            else:
                continue
        elif c.change == "C" and c.new is not None and c.new.kind == DIR \
                and c.old is not None and c.old.kind == DIR and c.path in touched_dirs:
            c.attributes.append("entries")
        if c.path == b"":
            continue
        out.append(c)
    return out


def relink_survivors(tree: list[Entry], base: dict[bytes, Entry],
                     own: list[Entry]) -> list[Entry]:
    """Keep the parent's hardlinks valid. A hardlink entry names the path of its
    group's first file; when this layer removes, replaces or changes that path,
    overlayfs (index=off) has copied up only the name used, and the group's other
    names still show the old inode. Those names, left alone in the upper directory,
    must not follow the path to something else (or to nothing): they become a group of
    their own, the first a file with the old content and metadata, the rest hardlinks
    to it. `own` is in component order, and so is the result. The overlay driver's
    commit and an OCI layer's import both need it, for the same reason."""
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
                           old.content, old.chunks, xattrs=old.xattrs, data=old.data))
        extra.extend(Entry(e.path, HARDLINK, old.mode, old.uid, old.gid, old.mtime_ns,
                           target=first, xattrs=old.xattrs) for e in survivors[1:])
    if not extra:
        return own
    return sorted(own + extra, key=lambda e: e.key)
