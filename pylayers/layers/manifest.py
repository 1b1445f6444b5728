"""Manifests: the entries of a layer, and their one canonical encoding
(docs/format.md, "Manifest").

Paths are bytes, relative to the layer's root, without a leading slash; the root
itself is b"". Entries are sorted in *component order*: by path with "/" ordering
before every other byte, so a directory's descendants directly follow it.
"""

from __future__ import annotations

import os
import stat
import struct
from array import array

import blake3

from ..errors import PATH_MAX, CorruptData, InvalidArgument, UnsafePath, short_path

MANIFEST_MAGIC = b"PLYRMAN2"
OLD_MAGICS = (b"PLYRMAN1",)  # manifests of earlier pylayers, refused by name
NO_PARENT = bytes(32)
# A file of at most this many bytes is stored in its manifest entry, not as chunks
# (docs/format.md, "Manifest"): no chunk-index entry, no pack table record, no content
# id of its own in the manifest. Fixed by the format, so a tree has one encoding.
INLINE_MAX = 1024

# entry kinds
REG, DIR, SYMLINK, HARDLINK, CHR, BLK, FIFO, WHITEOUT = 1, 2, 3, 4, 5, 6, 7, 8
KIND_NAMES = {REG: "file", DIR: "dir", SYMLINK: "symlink", HARDLINK: "hardlink",
              CHR: "char", BLK: "block", FIFO: "fifo", WHITEOUT: "whiteout"}
# entry flags
OPAQUE = 1  # a directory whose lower-layer contents are hidden

_HEAD = struct.Struct("<HBBIIIqQ")  # pathlen, kind, flags, mode, uid, gid, mtime_ns, size
_SCAN_HEAD = struct.Struct("<HBB20xQ")  # pathlen, kind, flags, size: what a scan reads
_CHUNK = struct.Struct("<32sI")
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_XATTR = struct.Struct("<HI")
_DEV = struct.Struct("<II")


def sort_key(path: bytes) -> bytes:
    """Component order: descendants of a path follow it contiguously."""
    return path.replace(b"/", b"\x00")


class Entry:
    """One path of a layer. A plain slotted class rather than a dataclass: trees hold
    hundreds of thousands of these and decoding speed matters."""

    __slots__ = ("path", "kind", "mode", "uid", "gid", "mtime_ns", "size", "content",
                 "chunks", "target", "rdev", "xattrs", "flags", "key", "data")

    def __init__(self, path: bytes, kind: int, mode: int = 0, uid: int = 0, gid: int = 0,
                 mtime_ns: int = 0, size: int = 0, content: bytes = b"", chunks: bytes = b"",
                 target: bytes = b"", rdev: tuple[int, int] = (0, 0),
                 xattrs: tuple[tuple[bytes, bytes], ...] = (), flags: int = 0,
                 key: bytes | None = None, data: bytes = b"") -> None:
        self.path = path
        self.kind = kind
        self.mode = mode  # permission bits incl. setuid/setgid/sticky (S_IMODE)
        self.uid = uid
        self.gid = gid
        self.mtime_ns = mtime_ns
        self.size = size  # regular files: content length
        self.content = content  # regular files: BLAKE3 of the whole content
        self.chunks = chunks  # regular files: packed (id, length) records
        self.data = data  # regular files of at most INLINE_MAX bytes: the content
        self.target = target  # symlink target, or hardlink target path
        self.rdev = rdev  # devices: (major, minor)
        self.xattrs = xattrs
        self.flags = flags
        self.key = sort_key(path) if key is None else key

    def _fields(self) -> tuple:
        return (self.path, self.kind, self.mode, self.uid, self.gid, self.mtime_ns, self.size,
                self.content, self.chunks, self.target, self.rdev, self.xattrs, self.flags,
                self.data)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entry):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Entry({self.path!r}, {KIND_NAMES.get(self.kind, self.kind)})"

    @property
    def is_dir(self) -> bool:
        return self.kind == DIR

    @property
    def opaque(self) -> bool:
        return bool(self.flags & OPAQUE)

    @property
    def inline(self) -> bool:
        """A regular file whose content is `data`, in the manifest: no chunks."""
        return self.kind == REG and self.size <= INLINE_MAX

    def set_inline(self, data: bytes) -> None:
        """Make this a file of the content `data` (at most INLINE_MAX bytes)."""
        self.data, self.size, self.chunks = data, len(data), b""
        self.content = blake3.blake3(data).digest()

    def chunk_count(self) -> int:
        return len(self.chunks) // _CHUNK.size

    def chunk_list(self) -> list[tuple[bytes, int]]:
        c = self.chunks
        return [_CHUNK.unpack_from(c, i) for i in range(0, len(c), _CHUNK.size)]

    def same_metadata(self, other: Entry) -> bool:
        return (self.mode, self.uid, self.gid, self.mtime_ns, self.xattrs) == (
            other.mode, other.uid, other.gid, other.mtime_ns, other.xattrs)

    def same_content(self, other: Entry) -> bool:
        return (self.kind, self.size, self.content, self.target, self.rdev) == (
            other.kind, other.size, other.content, other.target, other.rdev)

    def file_type_bits(self) -> int:
        return {REG: stat.S_IFREG, DIR: stat.S_IFDIR, SYMLINK: stat.S_IFLNK,
                HARDLINK: stat.S_IFREG, CHR: stat.S_IFCHR, BLK: stat.S_IFBLK,
                FIFO: stat.S_IFIFO}.get(self.kind, 0)


def pack_chunks(chunks: list[tuple[bytes, int]]) -> bytes:
    return b"".join(_CHUNK.pack(cid, n) for cid, n in chunks)


NO_OWNER = 0xFFFFFFFF  # (uid_t)-1: chown's "leave unchanged", never a file's owner
XATTR_NAME_MAX = 255


def path_problem(path: bytes) -> str | None:
    """Why `path` cannot name an entry of a layer, or None: it must be empty (the root)
    or relative, made of components that are not empty, `.` or `..`, hold no NUL and
    are at most 255 bytes, and be shorter than PATH_MAX. A few substring searches, not
    a split: every decoded entry goes through this."""
    if not path:
        return None
    if len(path) >= PATH_MAX:
        return f"is longer than PATH_MAX ({PATH_MAX} bytes)"
    if b"\x00" in path:
        return "holds a NUL byte"
    if path[0] == 0x2F or path[-1] == 0x2F or b"//" in path:
        return "has an empty component (a leading, trailing or double slash)"
    if path[0] == 0x2E or b"/." in path:  # rare: only then look for "." and ".."
        p = b"/" + path + b"/"
        if b"/../" in p:
            return "has a '..' component"
        if b"/./" in p:
            return "has a '.' component"
    if len(path) > 255 and any(len(c) > 255 for c in path.split(b"/")):
        return "has a component longer than 255 bytes"
    return None


def _quote(name: bytes) -> str:
    """`name` quoted for a one-line message, escapes and all, at most ~100 characters."""
    return short_path(repr(os.fsdecode(name)), 100)


def entry_problem(e: Entry, prev_key: bytes | None) -> str | None:
    """Why the decoded entry `e`, following an entry whose key is `prev_key`, breaks
    the manifest's rules (docs/format.md, "Manifest"), or None. These are the rules
    a single entry can break; `tree.validate_tree` adds those of a whole tree."""
    problem = path_problem(e.path)
    if problem is not None:
        return f"its path {problem}"
    if prev_key is not None and e.key <= prev_key:
        return ("it repeats the path before it" if e.key == prev_key
                else "it is out of order (entries are sorted in component order)")
    kind = e.kind
    if kind not in KIND_NAMES:
        return f"unknown kind {kind}"
    name = KIND_NAMES[kind]
    if e.flags and (kind != DIR or e.flags & ~OPAQUE):
        return f"flags {e.flags:#x} on a {name} (only a directory may be opaque, bit 0)"
    if not e.path and kind != DIR:
        return f"the root is a {name}, not a directory"
    if e.mode & ~0o7777:
        return f"mode {e.mode:#o} has bits beyond the permission bits"
    if NO_OWNER in (e.uid, e.gid):
        return f"owner {e.uid}:{e.gid} names (uid_t)-1, which is no owner"
    if kind == REG:
        if len(e.content) != 32:
            return f"a file's content id is {len(e.content)} bytes, not 32"
        if e.size <= INLINE_MAX:
            if e.chunks or len(e.data) != e.size:
                return (f"a file of {e.size} bytes (at most {INLINE_MAX}) holds "
                        f"{len(e.data)} bytes of data and {len(e.chunks) // _CHUNK.size} "
                        "chunks, not its content and none")
            return _xattrs_problem(e)
        if e.data:
            return f"a file of {e.size} bytes (more than {INLINE_MAX}) holds inline data"
        lengths = _lengths(e.chunks)
        if 0 in lengths:
            return "it lists a chunk of length 0"
        if sum(lengths) != e.size:
            return f"its chunk lengths add up to {sum(lengths)}, not its size {e.size}"
    elif e.size:
        return f"size {e.size} on a {name} (only files have a size)"
    if kind == SYMLINK:
        if not e.target or b"\x00" in e.target:
            return "a symlink's target is empty or holds a NUL byte"
    elif kind == HARDLINK:
        problem = path_problem(e.target) if e.target else "is empty"
        if problem is not None:
            return f"its hardlink target {_quote(e.target)} {problem}"
        if sort_key(e.target) >= e.key:
            return "hardlink target does not come before the link (the group's first name)"
    elif kind in (CHR, BLK):
        if e.rdev[0] >= 1 << 12 or e.rdev[1] >= 1 << 20:
            return (f"device number {e.rdev[0]}:{e.rdev[1]} is beyond Linux's (a major "
                    "below 4096, a minor below 1048576)")
    elif kind == WHITEOUT and (e.mode, e.uid, e.gid, e.mtime_ns, e.xattrs) != (0, 0, 0, 0, ()):
        return "a whiteout has metadata (mode, owner, mtime and xattrs are all 0 or none)"
    return _xattrs_problem(e)


def _xattrs_problem(e: Entry) -> str | None:
    prev_name = None
    for xname, _value in e.xattrs:
        if not xname or b"\x00" in xname or len(xname) > XATTR_NAME_MAX:
            return (f"xattr name {_quote(xname)} is empty, holds a NUL byte or is longer "
                    f"than {XATTR_NAME_MAX} bytes")
        if prev_name is not None and xname <= prev_name:
            return (f"xattr {_quote(xname)} repeats the one before it" if xname == prev_name
                    else f"xattr {_quote(xname)} is out of order (xattrs are sorted by name)")
        prev_name = xname
    return None


_LENGTHS: dict[int, struct.Struct] = {}


def _lengths(chunks: bytes) -> tuple[int, ...]:
    """The lengths in a list of chunk records, read in one call for short lists."""
    n = len(chunks) // _CHUNK.size
    if n > 64:
        return tuple(length for _cid, length in _CHUNK.iter_unpack(chunks))
    reader = _LENGTHS.get(n)
    if reader is None:
        reader = _LENGTHS[n] = struct.Struct("<" + "32xI" * n)
    return reader.unpack_from(chunks)


def _unencoded_problem(e: Entry) -> str | None:
    """Fields set on an Entry that its kind does not encode: they would be lost, and
    the decoded entry would differ from the one encoded."""
    kind = e.kind
    if kind != REG and (e.content or e.chunks or e.data):
        return "content, chunks or data on an entry that is not a file"
    if kind == REG and e.size <= INLINE_MAX and blake3.blake3(e.data).digest() != e.content:
        return "its content id is not the BLAKE3 of its inline data"
    if kind == REG and len(e.chunks) % _CHUNK.size:
        return f"its chunk list is not a whole number of {_CHUNK.size}-byte records"
    if kind not in (SYMLINK, HARDLINK) and e.target:
        return "a target on an entry that is not a link"
    if kind not in (CHR, BLK) and tuple(e.rdev) != (0, 0):
        return "a device number on an entry that is not a device"
    return None


def encode_manifest(parent: bytes | None, entries: list[Entry]) -> bytes:
    """The canonical bytes of a manifest. `entries` must be in component order, and
    each must be one the decoder accepts: anything else raises InvalidArgument, so a
    tree has exactly one encoding and one id."""
    enc = ManifestEncoder(parent)
    for e in entries:
        enc.add(e)
    return bytes(enc.finish())


class ManifestEncoder:
    """`encode_manifest` one entry at a time, so a caller streaming a scan never holds
    its entries: only the bytes (and, in `file_chunks`, every file's packed chunk list,
    for the commit's check that each is indexed)."""

    def __init__(self, parent: bytes | None) -> None:
        if parent is not None and (len(parent) != 32 or parent == NO_PARENT):
            raise InvalidArgument(f"cannot encode a manifest: parent id {parent.hex()} is "
                                  "not a layer id")
        self._out = bytearray(MANIFEST_MAGIC + (parent or NO_PARENT) + bytes(4))
        self._prev: bytes | None = None
        self.count = 0
        self.file_bytes = 0  # regular-file bytes of the entries
        self.inline_bytes = 0  # of those, the bytes of small files held inline
        self.file_chunks = bytearray()  # the files' packed chunk lists, concatenated
        self.file_paths = array("Q")  # where each file's path starts in the bytes
        self.file_ends = array("Q")  # where each file's chunks end in file_chunks

    def add(self, e: Entry) -> None:
        if e.key != sort_key(e.path):
            raise InvalidArgument(f"cannot encode manifest entry {_quote(e.path)}: its sort "
                                  "key is not its path's")
        problem = entry_problem(e, self._prev) or _unencoded_problem(e)
        if problem is not None:
            raise InvalidArgument(f"cannot encode manifest entry {_quote(e.path)}: {problem}")
        try:
            self._append(e)
        except struct.error as err:  # a field out of its integer's range
            raise InvalidArgument(f"cannot encode manifest entry {_quote(e.path)}: "
                                  f"{err}") from None
        self._prev = e.key
        self.count += 1

    def _append(self, e: Entry) -> None:
        out = self._out
        parts = [_HEAD.pack(len(e.path), e.kind, e.flags, e.mode, e.uid, e.gid,
                            e.mtime_ns, e.size)]
        if e.kind == REG:
            if e.size <= INLINE_MAX:
                parts += (e.path, e.data)
            else:
                parts += (e.path, e.content, _U32.pack(len(e.chunks) // _CHUNK.size), e.chunks)
        elif e.kind in (SYMLINK, HARDLINK):
            parts += (e.path, _U16.pack(len(e.target)), e.target)
        elif e.kind in (CHR, BLK):
            parts += (e.path, _DEV.pack(*e.rdev))
        else:
            parts.append(e.path)
        parts.append(_U16.pack(len(e.xattrs)))
        for name, value in e.xattrs:
            parts += (_XATTR.pack(len(name), len(value)), name, value)
        at = len(out)
        out += b"".join(parts)  # packed first: a field out of range appends nothing
        if e.kind == REG:
            self.file_paths.append(at + _HEAD.size)
            self.file_bytes += e.size
            if e.size <= INLINE_MAX:
                self.inline_bytes += e.size
            self.file_chunks += e.chunks
            self.file_ends.append(len(self.file_chunks))

    def file_path(self, n: int) -> bytes:
        """The path of the `n`th file entry added."""
        at = self.file_paths[n]
        (plen,) = _U16.unpack_from(self._out, at - _HEAD.size)
        return bytes(self._out[at : at + plen])

    def finish(self) -> bytearray:
        """The manifest's bytes (the encoder's own buffer, not a copy)."""
        _U32.pack_into(self._out, 40, self.count)
        return self._out


def decode_manifest(data: bytes) -> tuple[bytes | None, list[Entry]]:
    """(parent id or None, entries). Raises CorruptData (UnsafePath for a path that
    could escape a destination) on anything the format does not allow, so what it
    returns is safe to use entry by entry; `tree.validate_tree` checks what only a
    whole tree shows (parents that are directories, hardlink targets)."""
    try:
        return _decode(memoryview(data))
    except (struct.error, IndexError) as e:
        raise CorruptData(f"manifest is truncated or malformed: {e}") from None


def decode_entries_at(data: bytes | bytearray, starts: list[int]) -> list[Entry]:
    """The entries of the manifest `data` that start at `starts` (offsets from
    `scan_manifest`, ascending), decoded and checked as `decode_manifest` checks
    them; the others are not decoded."""
    try:
        return _decode(memoryview(data), starts)[1]
    except (struct.error, IndexError) as e:
        raise CorruptData(f"manifest is truncated or malformed: {e}") from None


def manifest_parent(data: bytes | bytearray) -> bytes | None:
    """The parent id a manifest names (None for a base layer); its magic checked."""
    try:
        return _header(memoryview(data))[0]
    except struct.error as e:
        raise CorruptData(f"manifest is truncated or malformed: {e}") from None


def scan_manifest(data: bytes | bytearray, tag: int = 0
                  ) -> list[tuple[bytes, int, int, int, int]]:
    """(sort key, kind, flags, `tag`, offset) of each entry of a manifest: what
    applying the layer to a tree needs (`tree.chain_tree`), for a fraction of the cost
    of decoding the entries (`decode_entries_at` decodes those that reach a tree).
    Checked: the magic, the entries' order, kinds and flags, that no path holds a
    NUL, and that the entries fill the manifest exactly; an entry's other rules are
    checked when it is decoded."""
    mv = memoryview(data)
    try:
        _parent, n = _header(mv)
        out: list[tuple[bytes, int, int, int, int]] = []
        pos = 44
        head = _SCAN_HEAD.unpack_from
        u32 = _U32.unpack_from
        u16 = _U16.unpack_from
        xattr = _XATTR.unpack_from
        prev = b""
        for i in range(n):
            plen, kind, flags, size = head(mv, pos)
            at = pos + _HEAD.size
            path = bytes(mv[at : at + plen])
            if len(path) != plen:
                raise CorruptData("manifest is truncated")
            if b"\x00" in path:
                raise UnsafePath(f"unsafe manifest entry {_quote(path)}: its path holds a "
                                 "NUL byte")
            key = path.replace(b"/", b"\x00")
            if (i and key <= prev) or kind not in KIND_NAMES or (
                    flags and (kind != DIR or flags & ~OPAQUE)):
                problem = ("it is out of order or repeats the path before it"
                           if i and key <= prev else f"kind {kind} with flags {flags:#x}")
                raise CorruptData(f"manifest entry {_quote(path)}: {problem}")
            at += plen
            if kind == REG:
                at += size if size <= INLINE_MAX else 36 + u32(mv, at + 32)[0] * _CHUNK.size
            elif kind == SYMLINK or kind == HARDLINK:
                at += 2 + u16(mv, at)[0]
            elif kind == CHR or kind == BLK:
                at += _DEV.size
            (nx,) = u16(mv, at)
            at += 2
            for _ in range(nx):
                nlen, vlen = xattr(mv, at)
                at += _XATTR.size + nlen + vlen
            out.append((key, kind, flags, tag, pos))
            prev = key
            pos = at
        if pos != len(mv):
            raise CorruptData("manifest is truncated" if pos > len(mv)
                              else "manifest has trailing bytes")
    except (struct.error, IndexError) as e:
        raise CorruptData(f"manifest is truncated or malformed: {e}") from None
    return out


def _header(mv: memoryview) -> tuple[bytes | None, int]:
    """(parent id or None, the number of entries) of a manifest."""
    if bytes(mv[:8]) != MANIFEST_MAGIC:
        if bytes(mv[:8]) in OLD_MAGICS:
            raise CorruptData(f"manifest in an earlier pylayers' encoding "
                              f"({bytes(mv[:8]).decode()}); this pylayers reads "
                              f"{MANIFEST_MAGIC.decode()}")
        raise CorruptData("not a manifest (bad magic)")
    parent = bytes(mv[8:40])
    (n,) = _U32.unpack_from(mv, 40)
    return (None if parent == NO_PARENT else parent), n


def _decode(mv: memoryview, starts: list[int] | None = None
            ) -> tuple[bytes | None, list[Entry]]:
    """Every entry in turn; or, given `starts`, the entries starting there."""
    parent, n = _header(mv)
    if starts is not None:
        n = len(starts)
    pos = 44
    entries: list[Entry] = []
    prev = None
    head = _HEAD.unpack_from
    check = entry_problem
    hash_ = blake3.blake3
    for i in range(n):
        if starts is not None:
            pos = starts[i]
        plen, kind, flags, mode, uid, gid, mtime, size = head(mv, pos)
        pos += _HEAD.size
        path = bytes(mv[pos : pos + plen])
        if len(path) != plen:
            raise CorruptData("manifest is truncated")
        pos += plen
        content = chunks = target = data = b""
        rdev = (0, 0)
        if kind == REG and size <= INLINE_MAX:
            data = bytes(mv[pos : pos + size])
            if len(data) != size:
                raise CorruptData("manifest is truncated")
            pos += size
            content = hash_(data).digest()
        elif kind == REG:
            content = bytes(mv[pos : pos + 32])
            (nch,) = _U32.unpack_from(mv, pos + 32)
            pos += 36
            chunks = bytes(mv[pos : pos + nch * _CHUNK.size])
            pos += nch * _CHUNK.size
            if len(chunks) != nch * _CHUNK.size:
                raise CorruptData("manifest is truncated")
        elif kind in (SYMLINK, HARDLINK):
            (tlen,) = _U16.unpack_from(mv, pos)
            target = bytes(mv[pos + 2 : pos + 2 + tlen])
            if len(target) != tlen:
                raise CorruptData("manifest is truncated")
            pos += 2 + tlen
        elif kind in (CHR, BLK):
            rdev = _DEV.unpack_from(mv, pos)
            pos += _DEV.size
        (nx,) = _U16.unpack_from(mv, pos)
        pos += 2
        xattrs: tuple = ()
        if nx:
            xl = []
            for _ in range(nx):
                nlen, vlen = _XATTR.unpack_from(mv, pos)
                pos += _XATTR.size
                if pos + nlen + vlen > len(mv):
                    raise CorruptData("manifest is truncated")
                xl.append((bytes(mv[pos : pos + nlen]), bytes(mv[pos + nlen : pos + nlen + vlen])))
                pos += nlen + vlen
            xattrs = tuple(xl)
        key = path.replace(b"/", b"\x00")
        e = Entry(path, kind, mode, uid, gid, mtime, size, content, chunks, target, rdev,
                  xattrs, flags, key, data)
        # Most entries are small files held inline or files of one chunk, no xattrs, a
        # plain path: the checks `entry_problem` makes of those, inline (it is called
        # for the rest, and for any of these that fails one); what passes here passes
        # there.
        if (kind == REG and not flags and not nx
                and (size <= INLINE_MAX or (
                    len(chunks) == _CHUNK.size and len(content) == 32
                    and size > INLINE_MAX and _U32.unpack_from(chunks, 32)[0] == size))
                and mode <= 0o7777 and uid != NO_OWNER and gid != NO_OWNER
                and (prev is None or key > prev) and 0 < plen <= 255
                and path[0] != 0x2F and path[0] != 0x2E and path[-1] != 0x2F
                and b"//" not in path and b"/." not in path and b"\x00" not in path):
            problem = None
        else:
            problem = check(e, prev)
        if problem is not None:
            if problem.startswith(("its path", "its hardlink target")):
                raise UnsafePath(f"unsafe manifest entry {_quote(path)}: {problem}")
            raise CorruptData(f"manifest entry {_quote(path)}: {problem}")
        prev = e.key
        entries.append(e)
    if starts is None and pos != len(mv):
        raise CorruptData("manifest has trailing bytes")
    return parent, entries
