"""Reading a layer tar (already decompressed) into entries, streamed.

Each member becomes an `Entry` with its path made relative and clean (a leading `/`
or `./` dropped, as Docker and containerd do; `..` that climbs above the root refused),
numeric ownership, nanosecond mtimes from PAX, xattrs from PAX `SCHILY.xattr.*`,
devices, symlinks and hardlinks (`Entry.target` of a hardlink is the cleaned path it
names). A regular file's data goes through the store's chunker into `sink` as it is
read: a multi-GB member is never held in memory.

Headers are bounded: a PAX or GNU long-name header over `MAX_HEADER` bytes is refused
(tarfile would read it whole into memory), and a corrupt or truncated header anywhere
is an error, not a silent end of the archive.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import blake3

from ..chunking import Chunker, ChunkerParams, cut_points
from ..errors import CorruptData, UnsafePath
from ..layers.manifest import BLK, CHR, DIR, FIFO, HARDLINK, INLINE_MAX, REG, SYMLINK, Entry

MAX_HEADER = 1 << 20  # bytes of one PAX or GNU long-name header (Go's archive/tar: 1 MiB)
MAX_NAME = 4096
MAX_TARGET = 4095  # a symlink target, as Linux's PATH_MAX allows
MAX_XATTR_VALUE = 64 << 10
READ = 1 << 20

Sink = Callable[[bytes, bytes], object]
OnFile = Callable[[bytes | None, int], None]  # (path, size) before a file's chunks, (None, 0) after


class _Info(tarfile.TarInfo):
    """tarfile's member, strict: bounded extended headers, and a corrupt or truncated
    header is an error wherever it is (tarfile ends the archive there silently)."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):  # type: ignore[override]
        try:
            return super().frombuf(buf, encoding, errors)
        except tarfile.TruncatedHeaderError:
            raise CorruptData("layer tar is truncated inside a header") from None
        except tarfile.InvalidHeaderError as e:
            raise CorruptData(f"layer tar has a corrupt header ({e})") from None

    def _check_size(self) -> None:
        if self.size > MAX_HEADER:
            raise CorruptData(f"layer tar has an extended header of {self.size} bytes "
                              f"(at most {MAX_HEADER})")

    def _proc_pax(self, tarfile):  # type: ignore[override]
        self._check_size()
        return super()._proc_pax(tarfile)

    def _proc_gnulong(self, tarfile):  # type: ignore[override]
        self._check_size()
        return super()._proc_gnulong(tarfile)


class _Forward:
    """A stream made seekable forward only, so tarfile reads it in its random-access
    mode (tarfile's own stream mode copies its whole buffer on every small read): a
    seek ahead reads and drops the bytes between, a seek back is an error."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.buf = b""
        self.i = 0
        self.end = 0  # bytes read from raw so far

    def tell(self) -> int:
        return self.end - (len(self.buf) - self.i)

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        out = []
        if n < 0:
            n = 1 << 62
        while n > 0:
            if self.i >= len(self.buf):
                chunk = self.raw.read(max(n, READ) if n < 1 << 62 else READ)
                if not chunk:
                    break
                self.buf, self.i = chunk, 0
                self.end += len(chunk)
            take = min(n, len(self.buf) - self.i)
            out.append(self.buf[self.i:self.i + take] if take < len(self.buf) else self.buf)
            self.i += take
            n -= take
        return b"".join(out)

    def seek(self, pos: int, whence: int = 0) -> int:
        cur = self.tell()
        if whence == 1:
            pos += cur
        elif whence != 0:
            raise CorruptData("layer tar: cannot seek from the end of a stream")
        if pos < cur:
            raise CorruptData("layer tar: a member points back into the archive")
        while pos > cur:
            got = len(self.read(min(pos - cur, READ)))
            if not got:
                break
            cur += got
        return cur


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def clean_path(name: bytes, what: str = "path") -> bytes:
    """`name` relative to the layer root, without `.` or empty components; `..` that
    would climb above the root is refused (as Docker's breakout check does)."""
    if b"\x00" in name:
        raise UnsafePath(f"layer tar: {what} {name!r} holds a NUL byte")
    parts: list[bytes] = []
    for part in name.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if not parts:
                raise UnsafePath(f"layer tar: {what} {name!r} climbs out of the layer")
            parts.pop()
            continue
        if len(part) > 255:
            raise UnsafePath(f"layer tar: {what} {name[:80]!r}... has a component over "
                             "255 bytes")
        parts.append(part)
    out = b"/".join(parts)
    if len(out) > MAX_NAME:
        raise UnsafePath(f"layer tar: {what} {name[:80]!r}... is over {MAX_NAME} bytes")
    return out


def _mtime_ns(info: tarfile.TarInfo) -> int:
    text = info.pax_headers.get("mtime")
    if text is not None:
        try:
            sign = -1 if text.startswith("-") else 1
            whole, _, frac = text.lstrip("-").partition(".")
            if not whole.isdigit() or (frac and not frac.isdigit()):
                raise ValueError(text)
            ns = int(whole) * 1_000_000_000 + int((frac + "000000000")[:9])
            return sign * ns
        except ValueError:
            raise CorruptData(f"layer tar: bad PAX mtime {text!r}") from None
    return int(info.mtime) * 1_000_000_000


def _xattrs(info: tarfile.TarInfo) -> tuple[tuple[bytes, bytes], ...]:
    out = []
    for key, value in info.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            name, val = _raw(key[len("SCHILY.xattr."):]), _raw(value)
            if not name or len(name) > 255 or b"\x00" in name or len(val) > MAX_XATTR_VALUE:
                raise CorruptData(f"layer tar: {info.name!r} has an xattr pylayers cannot "
                                  f"keep ({name[:80]!r}, {len(val)} bytes)")
            out.append((name, val))
    out.sort()
    return tuple(out)


def store_content(f: BinaryIO, params: ChunkerParams, sink: Sink,
                  progress: Callable[[int], None] | None = None) -> tuple[bytes, bytes, int]:
    """(content id, packed chunk list, size) of the stream `f`, its chunks sent to
    `sink` as they are cut; memory stays within a read block and a chunk."""
    first = f.read(READ)
    if len(first) < READ:  # the whole file: a one-chunk file's id is its chunk's
        cuts = cut_points(first, min_size=params.min_size, avg_size=params.avg_size,
                          max_size=params.max_size)
        refs, ids, start = [], [], 0
        for end in cuts:
            piece = first[start:end]
            cid = blake3.blake3(piece).digest()
            sink(cid, piece)
            ids.append(cid)
            refs.append(cid + len(piece).to_bytes(4, "little"))
            start = end
        if progress is not None:
            progress(len(first))
        content = ids[0] if len(ids) == 1 else blake3.blake3(first).digest()
        return content, b"".join(refs), len(first)
    chunker = Chunker.from_params(params)
    whole = blake3.blake3()
    refs = []
    pending = bytearray()
    size = 0
    block = first
    while block:
        size += len(block)
        whole.update(block)
        base = chunker.offset - len(pending)
        cuts = chunker.feed(block)
        pending += block
        start = 0
        for c in cuts:
            end = c - base
            piece = bytes(pending[start:end])
            cid = blake3.blake3(piece).digest()
            sink(cid, piece)
            refs.append(cid + len(piece).to_bytes(4, "little"))
            start = end
        del pending[:start]
        if progress is not None:
            progress(len(block))
        block = f.read(READ)
    if chunker.finish() is not None:
        piece = bytes(pending)
        cid = blake3.blake3(piece).digest()
        sink(cid, piece)
        refs.append(cid + len(piece).to_bytes(4, "little"))
    return whole.digest(), b"".join(refs), size


@dataclass
class Member:
    """One member: an entry (path cleaned; a hardlink's target cleaned), or a whiteout
    marker (`whiteout` is the name it hides, `opaque` for `.wh..wh..opq`)."""

    entry: Entry
    whiteout: bytes | None = None
    opaque: bool = False


def read_members(stream: BinaryIO, params: ChunkerParams, sink: Sink,
                 progress: Callable[[int], None] | None = None,
                 on_file: OnFile | None = None) -> Iterator[Member]:
    """The members of the uncompressed layer tar `stream`, in archive order, file
    contents stored through `sink`. `on_file(path, size)` is called before a regular
    file's chunks reach the sink and `on_file(None)` after (`ChunkWriter.file_hint`:
    deltas against the path's last version)."""
    try:
        tf = tarfile.TarFile(fileobj=_Forward(stream), mode="r", tarinfo=_Info,  # type: ignore[arg-type]
                             encoding="utf-8", errors="surrogateescape")
    except tarfile.TarError as e:
        raise CorruptData(f"not a tar archive ({e})") from None
    try:
        while True:
            try:
                info = tf.next()
            except tarfile.TarError as e:
                raise CorruptData(f"layer tar is corrupt ({e})") from None
            if info is None:
                return
            tf.members.clear()  # tarfile keeps every member otherwise
            yield _member(tf, info, params, sink, progress, on_file)
    finally:
        tf.close()


def _member(tf: tarfile.TarFile, info: tarfile.TarInfo, params: ChunkerParams,
            sink: Sink, progress, on_file: OnFile | None) -> Member:
    path = clean_path(_raw(info.name))
    base = path.rpartition(b"/")[2]
    mode = info.mode & 0o7777
    e = Entry(path, DIR, mode, info.uid, info.gid, _mtime_ns(info), xattrs=_xattrs(info))
    if base.startswith(b".wh.") and not info.isdir():
        hidden = base[4:]
        parent = path.rpartition(b"/")[0]
        if hidden == b".wh..opq":
            return Member(Entry(parent, DIR), opaque=True)
        if hidden in (b"", b".", b"..") or b"/" in hidden:
            raise UnsafePath(f"layer tar: bad whiteout {path!r}")
        return Member(Entry(path, DIR), whiteout=parent + b"/" + hidden if parent else hidden)
    if info.isdir():
        e.kind = DIR
    elif info.islnk():
        e.kind = HARDLINK
        e.target = clean_path(_raw(info.linkname), "hardlink target")
        if not e.target:
            raise UnsafePath(f"layer tar: hardlink {path!r} names the layer's root")
    elif info.issym():
        e.kind = SYMLINK
        e.target = _raw(info.linkname)
        if not e.target or len(e.target) > MAX_TARGET or b"\x00" in e.target:
            raise UnsafePath(f"layer tar: symlink {path!r} has a bad target")
    elif info.ischr() or info.isblk():
        e.kind = CHR if info.ischr() else BLK
        e.rdev = (info.devmajor, info.devminor)
        if not (0 <= info.devmajor < 1 << 32 and 0 <= info.devminor < 1 << 32):
            raise CorruptData(f"layer tar: device {path!r} has a bad number")
    elif info.isfifo():
        e.kind = FIFO
    elif info.isreg():
        e.kind = REG
        f = tf.extractfile(info)
        assert f is not None
        if info.size <= INLINE_MAX:  # held in the manifest entry: nothing to store
            try:
                e.set_inline(f.read(info.size))
            except tarfile.TarError as err:
                raise CorruptData(f"layer tar is corrupt ({err})") from None
            if progress is not None:
                progress(e.size)
        else:
            if on_file is not None:
                on_file(path, info.size)
            try:
                e.content, e.chunks, e.size = store_content(f, params, sink, progress)
            except tarfile.TarError as err:
                raise CorruptData(f"layer tar is corrupt ({err})") from None
            finally:
                if on_file is not None:
                    on_file(None, 0)
        if e.size != info.size:
            raise CorruptData(f"layer tar is truncated (in {path!r})")
    else:
        raise CorruptData(f"layer tar: {path!r} has an unsupported type {info.type!r}")
    if not (0 <= info.uid < 1 << 32 and 0 <= info.gid < 1 << 32):
        raise CorruptData(f"layer tar: {path!r} has an owner out of range")
    if not -(1 << 63) <= e.mtime_ns < 1 << 63:
        raise CorruptData(f"layer tar: {path!r} has an mtime out of range")
    return Member(e)
