"""Applying an OCI layer changeset (docs: the image-spec's "Image Layer Filesystem
Changeset") onto a parent tree, as a pylayers layer's own entries.

The rules, as the spec and Docker's extraction have them:

- entries are applied in archive order and a later entry for the same path wins (as
  tar extracts); an entry replacing a directory with something else removes what the
  layer put under it;
- whiteouts (`DIR/.wh.NAME`) and opaque markers (`DIR/.wh..wh..opq`) apply to the
  parent layers only, whatever their position in the archive: `.wh.NAME` with an entry
  for NAME in the same layer makes a directory NAME opaque (anything else NAME simply
  replaces the parent's), and an opaque marker sets the directory's opaque flag;
- a directory an entry needs but the archive does not list is made (mode 0755, owner
  0:0, mtime 0), as Docker does, when the parent's is absent or hidden; one the parent
  has is used as it is;
- refused: a path under a symlink or under anything else that is not a directory (an
  archive writing through a symlinked directory), a hardlink whose target is not a file
  this layer listed before it, and the root replaced by anything but a directory.

Hardlink groups come out in pylayers' form: the group's first name in component order
is the file, the others hardlinks to it with its metadata. The parent's hardlink groups
whose file this layer replaces keep their old content (as the other names of an inode
do when tar unlinks one).
"""

from __future__ import annotations

from ..errors import CorruptData, UnsafePath
from ..layers.manifest import DIR, HARDLINK, OPAQUE, REG, SYMLINK, WHITEOUT, Entry
from ..layers.tree import relink_survivors
from .tarread import Member

MAX_ENTRIES = 10_000_000  # entries of one layer (each costs a few hundred bytes here)


def _show(path: bytes) -> str:
    return "/" + path.decode(errors="replace")


def _implied(path: bytes) -> Entry:
    return Entry(path, DIR, 0o755)


class Changeset:
    """Members fed in archive order with `add`; `own_entries()` gives the layer."""

    def __init__(self, parent_tree: list[Entry] | None) -> None:
        self.parent_tree = parent_tree or []
        self.parent = {e.path: e for e in self.parent_tree}
        self.own: dict[bytes, Entry] = {}
        self.kids: dict[bytes, set[bytes]] = {}  # own dir -> own children
        self.inode: dict[bytes, int] = {}  # own file or hardlink -> inode number
        self.inodes: dict[int, Entry] = {}
        self.whiteouts: set[bytes] = set()
        self.opaque: set[bytes] = set()
        self.count = 0

    # -- feeding -----------------------------------------------------------------
    def add(self, m: Member) -> None:
        self.count += 1
        if self.count > MAX_ENTRIES:
            raise CorruptData(f"layer has more than {MAX_ENTRIES} entries")
        e = m.entry
        if m.opaque:
            self._ancestors(e.path + b"/x")
            self.opaque.add(e.path)
            return
        if m.whiteout is not None:
            self._ancestors(m.whiteout)
            self.whiteouts.add(m.whiteout)
            return
        if e.path == b"" and e.kind != DIR:
            raise UnsafePath("layer tar: the root is not a directory")
        self._ancestors(e.path)
        if e.kind == HARDLINK:
            t = e.target
            if t == e.path or t not in self.inode:
                raise UnsafePath(f"layer tar: hardlink {_show(e.path)} names {_show(t)}, "
                                 "which is not a file listed before it in this layer")
            self._put(e)
            self.inode[e.path] = self.inode[t]
            return
        self._put(e)
        if e.kind == REG:
            n = len(self.inodes)
            self.inodes[n] = e
            self.inode[e.path] = n

    def _put(self, e: Entry) -> None:
        old = self.own.get(e.path)
        if old is not None:
            self.inode.pop(e.path, None)
            if old.kind == DIR and e.kind == DIR:
                e.flags = old.flags
            elif old.kind == DIR:
                self._drop_under(e.path)
        self.own[e.path] = e
        if e.path:
            self.kids.setdefault(e.path.rpartition(b"/")[0], set()).add(e.path)

    def _drop_under(self, path: bytes) -> None:
        for child in self.kids.pop(path, ()):
            gone = self.own.pop(child, None)
            self.inode.pop(child, None)
            if gone is not None and gone.kind == DIR:
                self._drop_under(child)

    def _ancestors(self, path: bytes) -> None:
        """Every directory above `path` is one: this layer's, else the parent's (never
        through a symlink), else made."""
        parts = path.split(b"/")[:-1]
        prefix = b""
        for i, part in enumerate(parts):
            prefix = part if i == 0 else prefix + b"/" + part
            mine = self.own.get(prefix)
            if mine is not None:
                if mine.kind != DIR:
                    raise UnsafePath(f"layer tar: {_show(path)} is under {_show(prefix)}, "
                                     "which this layer made a non-directory")
                continue
            theirs = None if self._hidden(prefix) else self.parent.get(prefix)
            if theirs is None:
                self._put(_implied(prefix))
            elif theirs.kind == SYMLINK:
                raise UnsafePath(f"layer tar: {_show(path)} would be written through the "
                                 f"symlink {_show(prefix)}")
            elif theirs.kind != DIR:
                raise UnsafePath(f"layer tar: {_show(path)} is under {_show(prefix)}, "
                                 "which is not a directory")

    def _hidden(self, path: bytes) -> bool:
        """Whether the parent's `path` is hidden by a whiteout or opaque marker seen so
        far (of it or of a directory above it)."""
        if path in self.whiteouts:
            return True
        p = path
        while p:
            p = p.rpartition(b"/")[0]
            if p in self.whiteouts or p in self.opaque:
                return True
        return False

    # -- the result ------------------------------------------------------------------
    def own_entries(self) -> list[Entry]:
        own = self.own
        for w in self.whiteouts:
            e = own.get(w)
            if e is not None:
                if e.kind == DIR:
                    e.flags |= OPAQUE  # deleted below, then made again: nothing shows
        for o in self.opaque:
            e = own.get(o)
            if e is None:
                theirs = self.parent.get(o)
                if theirs is not None and theirs.kind == DIR and not self._hidden(o):
                    e = Entry(o, DIR, theirs.mode, theirs.uid, theirs.gid, theirs.mtime_ns,
                              xattrs=theirs.xattrs)
                else:
                    e = _implied(o)
                own[o] = e
            if e.kind == DIR:
                e.flags |= OPAQUE
        out: list[Entry] = []
        # hardlink groups: the first name in component order holds the content
        groups: dict[int, list[bytes]] = {}
        for path, n in self.inode.items():
            if path in own:
                groups.setdefault(n, []).append(path)
        for n, names in groups.items():
            names.sort(key=lambda p: own[p].key)
            f = self.inodes[n]
            first = names[0]
            own[first] = Entry(first, REG, f.mode, f.uid, f.gid, f.mtime_ns, f.size,
                               f.content, f.chunks, xattrs=f.xattrs, data=f.data)
            for p in names[1:]:
                own[p] = Entry(p, HARDLINK, f.mode, f.uid, f.gid, f.mtime_ns, target=first,
                               xattrs=f.xattrs)
        out.extend(own.values())
        for w in self.whiteouts:
            if w in own or w not in self.parent:
                continue
            # redundant under a deleted, replaced or opaque directory
            p, redundant = w, False
            while p and not redundant:
                p = p.rpartition(b"/")[0]
                above = own.get(p)
                redundant = (p in self.whiteouts and p != w) or (
                    above is not None and (above.kind != DIR or above.opaque))
            if not redundant:
                out.append(Entry(w, WHITEOUT))
        out.sort(key=lambda e: e.key)
        if self.parent_tree:
            out = relink_survivors(self.parent_tree, self.parent, out)
        elif not out or out[0].path != b"":
            out.insert(0, _implied(b""))
        return out
