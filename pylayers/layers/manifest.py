"""Manifests: the entries of a layer, and their one canonical encoding
(docs/format.md, "Manifest").

Paths are bytes, relative to the layer's root, without a leading slash; the root
itself is b"". Entries are sorted in *component order*: by path with "/" ordering
before every other byte, so a directory's descendants directly follow it.
"""

from __future__ import annotations

import stat
import struct

from ..errors import CorruptData, UnsafePath

MANIFEST_MAGIC = b"PLYRMAN1"
NO_PARENT = bytes(32)

# entry kinds
REG, DIR, SYMLINK, HARDLINK, CHR, BLK, FIFO, WHITEOUT = 1, 2, 3, 4, 5, 6, 7, 8
KIND_NAMES = {REG: "file", DIR: "dir", SYMLINK: "symlink", HARDLINK: "hardlink",
              CHR: "char", BLK: "block", FIFO: "fifo", WHITEOUT: "whiteout"}
# entry flags
OPAQUE = 1  # a directory whose lower-layer contents are hidden

_HEAD = struct.Struct("<HBBIIIqQ")  # pathlen, kind, flags, mode, uid, gid, mtime_ns, size
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
                 "chunks", "target", "rdev", "xattrs", "flags", "key")

    def __init__(self, path: bytes, kind: int, mode: int = 0, uid: int = 0, gid: int = 0,
                 mtime_ns: int = 0, size: int = 0, content: bytes = b"", chunks: bytes = b"",
                 target: bytes = b"", rdev: tuple[int, int] = (0, 0),
                 xattrs: tuple[tuple[bytes, bytes], ...] = (), flags: int = 0,
                 key: bytes | None = None) -> None:
        self.path = path
        self.kind = kind
        self.mode = mode  # permission bits incl. setuid/setgid/sticky (S_IMODE)
        self.uid = uid
        self.gid = gid
        self.mtime_ns = mtime_ns
        self.size = size  # regular files: content length
        self.content = content  # regular files: BLAKE3 of the whole content
        self.chunks = chunks  # regular files: packed (id, length) records
        self.target = target  # symlink target, or hardlink target path
        self.rdev = rdev  # devices: (major, minor)
        self.xattrs = xattrs
        self.flags = flags
        self.key = sort_key(path) if key is None else key

    def _fields(self) -> tuple:
        return (self.path, self.kind, self.mode, self.uid, self.gid, self.mtime_ns, self.size,
                self.content, self.chunks, self.target, self.rdev, self.xattrs, self.flags)

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


def check_path(path: bytes) -> None:
    """Refuse paths that could escape a checkout: absolute, '.', '..', empty parts, NUL."""
    if path == b"":
        return
    if len(path) > 4096 or b"\x00" in path:
        raise UnsafePath(f"unsafe path in manifest: {path!r}")
    for part in path.split(b"/"):
        if part in (b"", b".", b"..") or len(part) > 255:
            raise UnsafePath(f"unsafe path in manifest: {path!r}")


def encode_manifest(parent: bytes | None, entries: list[Entry]) -> bytes:
    """The canonical bytes of a manifest. `entries` must be in component order."""
    out = [MANIFEST_MAGIC, parent or NO_PARENT, _U32.pack(len(entries))]
    prev = None
    for e in entries:
        if prev is not None and e.key <= prev:
            raise ValueError(f"entries out of order at {e.path!r}")
        prev = e.key
        out.append(_HEAD.pack(len(e.path), e.kind, e.flags, e.mode, e.uid, e.gid,
                              e.mtime_ns, e.size))
        out.append(e.path)
        if e.kind == REG:
            out.append(e.content)
            out.append(_U32.pack(len(e.chunks) // _CHUNK.size))
            out.append(e.chunks)
        elif e.kind in (SYMLINK, HARDLINK):
            out.append(_U16.pack(len(e.target)))
            out.append(e.target)
        elif e.kind in (CHR, BLK):
            out.append(_DEV.pack(*e.rdev))
        out.append(_U16.pack(len(e.xattrs)))
        for name, value in e.xattrs:
            out.append(_XATTR.pack(len(name), len(value)))
            out.append(name)
            out.append(value)
    return b"".join(out)


def decode_manifest(data: bytes) -> tuple[bytes | None, list[Entry]]:
    """(parent id or None, entries). Raises CorruptData on anything out of order or
    malformed; paths are checked for safety by `tree.validate_tree` before use."""
    try:
        return _decode(memoryview(data))
    except (struct.error, IndexError) as e:
        raise CorruptData(f"manifest is truncated or malformed: {e}") from None


def _decode(mv: memoryview) -> tuple[bytes | None, list[Entry]]:
    if bytes(mv[:8]) != MANIFEST_MAGIC:
        raise CorruptData("not a manifest (bad magic)")
    parent = bytes(mv[8:40])
    (n,) = _U32.unpack_from(mv, 40)
    pos = 44
    entries: list[Entry] = []
    prev = None
    kinds = KIND_NAMES
    head = _HEAD.unpack_from
    for _ in range(n):
        plen, kind, flags, mode, uid, gid, mtime, size = head(mv, pos)
        pos += _HEAD.size
        path = bytes(mv[pos : pos + plen])
        if len(path) != plen:
            raise CorruptData("manifest is truncated")
        pos += plen
        if kind not in kinds:
            raise CorruptData(f"manifest entry {path!r} has unknown kind {kind}")
        key = path.replace(b"/", b"\x00")
        if prev is not None and key <= prev:
            raise CorruptData(f"manifest entries out of order at {path!r}")
        prev = key
        content = chunks = target = b""
        rdev = (0, 0)
        if kind == REG:
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
                xl.append((bytes(mv[pos : pos + nlen]), bytes(mv[pos + nlen : pos + nlen + vlen])))
                pos += nlen + vlen
            xattrs = tuple(xl)
        entries.append(Entry(path, kind, mode, uid, gid, mtime, size, content, chunks, target,
                             rdev, xattrs, flags, key))
    if pos != len(mv):
        raise CorruptData("manifest has trailing bytes")
    return (None if parent == NO_PARENT else parent), entries
