"""Writing a layer's own entries as an OCI changeset tar, reproducibly.

The same entries always give the same bytes: entries in component order, each
directory's opaque marker (`.wh..wh..opq`) and whiteouts (`.wh.NAME`) right after the
directory itself and before any of its children, PAX format headers with numeric
owners only (no user or group names), no atime or ctime, nanosecond mtimes in a PAX
`mtime` record only when they are not whole seconds, xattrs as `SCHILY.xattr.*`, and
an end of two zero blocks (no padding to a record). `source_date_epoch` clamps every
mtime to at most that second.

A hardlink whose file is not among the layer's own entries (the layer added a name to
a file its parent has) is written with that file before it, so the archive never
names a file outside itself.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterable

from ..layers.manifest import BLK, CHR, DIR, FIFO, HARDLINK, REG, SYMLINK, WHITEOUT, Entry

_TYPES = {REG: tarfile.REGTYPE, DIR: tarfile.DIRTYPE, SYMLINK: tarfile.SYMTYPE,
          HARDLINK: tarfile.LNKTYPE, CHR: tarfile.CHRTYPE, BLK: tarfile.BLKTYPE,
          FIFO: tarfile.FIFOTYPE}
ZEROS = bytes(512)


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def header(e: Entry, source_date_epoch: int | None = None, name: bytes | None = None) -> bytes:
    """The tar header block(s) of entry `e` (PAX format)."""
    path = e.path if name is None else name
    info = tarfile.TarInfo(_text(path) + ("/" if e.kind == DIR and path else "")
                           if path else "./")
    info.type = _TYPES.get(e.kind, tarfile.REGTYPE)
    info.mode = e.mode & 0o7777
    info.uid, info.gid = e.uid, e.gid
    info.uname = info.gname = ""
    mtime = e.mtime_ns
    if source_date_epoch is not None and mtime > source_date_epoch * 1_000_000_000:
        mtime = source_date_epoch * 1_000_000_000
    sec, ns = divmod(mtime, 1_000_000_000)
    info.mtime = sec
    pax: dict[str, str] = {}
    if ns or sec < 0:
        pax["mtime"] = f"{sec}.{ns:09d}" if sec >= 0 else _negative(mtime)
        info.mtime = max(sec, 0)
    if e.kind == REG:
        info.size = e.size
    if e.kind in (SYMLINK, HARDLINK):
        info.linkname = _text(e.target)
    if e.kind in (CHR, BLK):
        info.devmajor, info.devminor = e.rdev
    for xname, value in e.xattrs:
        pax["SCHILY.xattr." + _text(xname)] = _text(value)
    info.pax_headers = pax
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _negative(mtime_ns: int) -> str:
    whole, frac = divmod(-mtime_ns, 1_000_000_000)
    return f"-{whole}.{frac:09d}"


def _marker(path: bytes) -> Entry:
    return Entry(path, REG, 0o644)


def ordered(own: list[Entry], tree_after: dict[bytes, Entry]) -> list[tuple[Entry, bytes]]:
    """(entry, name in the archive) in archive order: component order, with each
    directory's opaque marker and whiteouts right after it."""
    items: list[tuple[tuple, Entry, bytes]] = []
    have = {e.path for e in own}
    # a file this layer changes takes its hardlink group along: a tar changeset that
    # wrote the file alone would leave the group's other names on the old inode
    links: dict[bytes, list[Entry]] = {}
    for e in tree_after.values():
        if e.kind == HARDLINK and e.target in have:
            links.setdefault(e.target, []).append(e)
    for group in links.values():
        for e in group:
            if e.path not in have:
                items.append(((e.key, 1, b""), e, e.path))
                have.add(e.path)
    for e in own:
        if e.kind == WHITEOUT:
            d, _, base = e.path.rpartition(b"/")
            key = (e.key.rpartition(b"\x00")[0] + b"\x00" if d else b"\x00", 0, b"\x01" + base)
            items.append((key, _marker(e.path), (d + b"/" if d else b"") + b".wh." + base))
            continue
        if e.kind == HARDLINK and e.target not in have:
            f = tree_after.get(e.target)
            if f is not None and f.kind == REG:
                items.append(((f.key, 1, b""), f, f.path))
                have.add(f.path)
        items.append(((e.key, 1, b""), e, e.path))
        if e.kind == DIR and e.opaque:
            key = (e.key + b"\x00" if e.path else b"\x00", 0, b"")
            items.append((key, _marker(e.path), (e.path + b"/" if e.path else b"")
                          + b".wh..wh..opq"))
    items.sort(key=lambda t: t[0])
    return [(e, name) for _k, e, name in items]


def write_layer(write: Callable[[bytes], object], own: list[Entry],
                tree_after: dict[bytes, Entry],
                read_chunks: Callable[[Iterable[bytes]], Iterable[bytes]],
                source_date_epoch: int | None = None) -> None:
    """Write the changeset tar of `own` (a layer's entries; `tree_after` its full tree
    by path) through `write`. `read_chunks` gives the bytes of chunk ids in order."""
    items = ordered(own, tree_after)
    files = [e for e, _n in items if e.kind == REG]
    chunks = iter(read_chunks(cid for e in files for cid, _n in e.chunk_list()))
    for e, name in items:
        write(header(e, source_date_epoch, name))
        if e.kind == REG and e.inline:
            write(e.data)
            if e.size % 512:
                write(bytes(512 - e.size % 512))
        elif e.kind == REG and e.size:
            left = e.size
            for _ in range(e.chunk_count()):
                piece = next(chunks)
                write(piece)
                left -= len(piece)
            if left:
                raise AssertionError(f"file {e.path!r}: chunks do not add up to its size")
            if e.size % 512:
                write(bytes(512 - e.size % 512))
    write(ZEROS * 2)
