"""Byte streams of image blobs: compression detected by magic bytes, streamed
decompression (gzip, zstd) and compression, digests checked as the bytes go by, and a
limit on the uncompressed size (a decompression bomb stops at the limit, not at the
end of the disk).

Every reader here reads its source in blocks and holds at most a block or two."""

from __future__ import annotations

import hashlib
import zlib
from typing import BinaryIO

from ..errors import CorruptData, InvalidArgument

BLOCK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
COMPRESSIONS = ("none", "gzip", "zstd")


def parse_digest(digest: str) -> tuple[str, str]:
    """("sha256", hex) of an OCI digest string; only sha256 and sha512 are known."""
    algo, _, hexpart = digest.partition(":")
    lengths = {"sha256": 64, "sha512": 128}
    if algo not in lengths or len(hexpart) != lengths[algo] or not all(
            c in "0123456789abcdef" for c in hexpart):
        raise CorruptData(f"malformed digest {digest!r}")
    return algo, hexpart


class Peekable:
    """A reader whose first bytes can be looked at before reading starts."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self._head = b""

    def peek(self, n: int) -> bytes:
        while len(self._head) < n:
            more = self.raw.read(n - len(self._head))
            if not more:
                break
            self._head += more
        return self._head[:n]

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n < 0:
                out, self._head = self._head + self.raw.read(), b""
                return out
            out, self._head = self._head[:n], self._head[n:]
            if len(out) < n:
                out += self.raw.read(n - len(out))
            return out
        return self.raw.read(n)


def detect(head: bytes) -> str:
    """"gzip", "zstd" or "none" (a tar, or anything else) from a stream's first bytes."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


class Verifying:
    """Passes a stream through, hashing and counting it; `check()` at the end compares
    with the expected digest (and size). Nothing read before `check()` may be trusted."""

    def __init__(self, raw: BinaryIO, digest: str | None, size: int | None = None,
                 what: str = "blob") -> None:
        self.raw = raw
        self.what = what
        self.expected = digest
        self.size = size
        algo = parse_digest(digest)[0] if digest else "sha256"
        self.hash = hashlib.new(algo)
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.hash.update(data)
        self.count += len(data)
        if self.size is not None and self.count > self.size:
            raise CorruptData(f"{self.what} is larger than its descriptor's size {self.size}")
        return data

    def drain(self) -> None:
        while self.read(BLOCK):
            pass

    @property
    def digest(self) -> str:
        return f"{self.hash.name}:{self.hash.hexdigest()}"

    def check(self) -> str:
        self.drain()
        if self.size is not None and self.count != self.size:
            raise CorruptData(f"{self.what} has {self.count} bytes, its descriptor says "
                              f"{self.size}")
        if self.expected is not None and self.digest != self.expected:
            raise CorruptData(f"{self.what} does not match its digest {self.expected} "
                              f"(it is {self.digest})")
        return self.digest


class _Gunzip:
    """Streamed gzip (all members, as gzip -d does); a truncated or corrupt stream is
    an error, never a short read."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.d = zlib.decompressobj(31)
        self.buf = b""
        self.done = False

    def read(self, n: int = -1) -> bytes:
        n = BLOCK if n < 0 else n
        try:
            while not self.buf and not self.done:
                if self.d.eof:
                    rest = self.d.unused_data
                    if not rest:
                        rest = self.raw.read(BLOCK)
                    if not rest.strip(b"\x00"):  # end, or trailing zero padding
                        if rest and self.raw.read(BLOCK).strip(b"\x00"):
                            raise CorruptData("gzip stream has trailing garbage")
                        self.done = True
                        break
                    self.d = zlib.decompressobj(31)  # another member
                    self.buf = self.d.decompress(rest, n)
                    continue
                data = self.d.unconsumed_tail or self.raw.read(BLOCK)
                if not data:
                    raise CorruptData("gzip stream is truncated")
                self.buf = self.d.decompress(data, n)
        except zlib.error as e:
            raise CorruptData(f"gzip stream is corrupt: {e}") from None
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


class _ZstdFrames:
    """Walks the frame and block headers of a zstd stream fed to it (RFC 8878 3.1), so
    that a stream ending inside a frame is known: the decoder returns a short read
    there, without an error."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.need = 4
        self.state = "magic"
        self.frames = 0
        self.checksum = False

    def feed(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= self.need:
            head = bytes(self.buf[:self.need])
            del self.buf[:self.need]
            self._step(head)

    def _step(self, b: bytes) -> None:
        st = self.state
        if st == "magic":
            magic = int.from_bytes(b, "little")
            if magic == 0xFD2FB528:
                self.state, self.need = "fhd", 1
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self.state, self.need = "skipsize", 4
            else:
                raise CorruptData("zstd stream is corrupt: bad frame magic")
        elif st == "skipsize":
            size = int.from_bytes(b, "little")
            self.state, self.need = ("skip", size) if size else ("magic", 4)
            if not size:
                self.frames += 1
        elif st == "skip":
            self.frames += 1
            self.state, self.need = "magic", 4
        elif st == "fhd":
            d = b[0]
            fcs, single, self.checksum, did = d >> 6, d >> 5 & 1, bool(d >> 2 & 1), d & 3
            n = (0 if single else 1) + (0, 1, 2, 4)[did] + (
                (1 if single else 0), 2, 4, 8)[fcs]
            self.state, self.need = ("fields", n) if n else ("block", 3)
        elif st == "fields":
            self.state, self.need = "block", 3
        elif st == "block":
            h = int.from_bytes(b, "little")
            last, btype, size = h & 1, h >> 1 & 3, h >> 3
            if btype == 3:
                raise CorruptData("zstd stream is corrupt: reserved block type")
            self.last = last
            n = 1 if btype == 1 else size
            self.state, self.need = ("blockdata", n) if n else self._after_block()
        elif st == "blockdata":
            self.state, self.need = self._after_block()
        elif st == "checksum":
            self.frames += 1
            self.state, self.need = "magic", 4

    def _after_block(self) -> tuple[str, int]:
        if not self.last:
            return "block", 3
        if self.checksum:
            return "checksum", 4
        self.frames += 1
        return "magic", 4

    def complete(self) -> bool:
        return self.state == "magic" and not self.buf and self.frames > 0


class _Tee:
    def __init__(self, raw: BinaryIO, frames: _ZstdFrames) -> None:
        self.raw = raw
        self.frames = frames

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.frames.feed(data)
        return data


class _Unzstd:
    """Streamed zstd, every frame in turn; a truncated or corrupt stream is an error."""

    def __init__(self, raw: BinaryIO) -> None:
        import zstandard

        self._error = zstandard.ZstdError
        self.frames = _ZstdFrames()
        self.tee = _Tee(raw, self.frames)
        self.d = zstandard.ZstdDecompressor().stream_reader(
            self.tee, read_across_frames=True, read_size=BLOCK)

    def read(self, n: int = -1) -> bytes:
        n = BLOCK if n < 0 else n
        try:
            data = self.d.read(n)
        except self._error as e:
            raise CorruptData(f"zstd stream is corrupt: {e}") from None
        if n and not data:
            while self.tee.read(BLOCK):
                pass
            if not self.frames.complete():
                raise CorruptData("zstd stream is truncated")
        return data


class Limited:
    """Counts the bytes read through it; past `limit`, an error naming the limit."""

    def __init__(self, raw, limit: int, what: str) -> None:
        self.raw = raw
        self.limit = limit
        self.what = what
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.count += len(data)
        if self.count > self.limit:
            raise InvalidArgument(f"{self.what} is larger than --max-layer-size "
                                  f"({self.limit} bytes uncompressed)")
        return data


def decompressed(raw: BinaryIO, limit: int, what: str = "layer") -> tuple[Limited, str]:
    """(the uncompressed stream of `raw`, limited to `limit` bytes, the compression
    found by magic bytes)."""
    p = Peekable(raw)
    kind = detect(p.peek(4))
    inner: BinaryIO
    if kind == "gzip":
        inner = _Gunzip(p)  # type: ignore[assignment]
    elif kind == "zstd":
        inner = _Unzstd(p)  # type: ignore[assignment]
    else:
        inner = p  # type: ignore[assignment]
    return Limited(inner, limit, what), kind


class Compressor:
    """Writes a compressed stream to `out` (a binary file), reproducibly: gzip with no
    name and mtime 0, zstd level 3 single-threaded with the content size left out."""

    def __init__(self, out: BinaryIO, compression: str) -> None:
        if compression not in COMPRESSIONS:
            raise InvalidArgument(f"unknown compression {compression!r} "
                                  f"(one of {', '.join(COMPRESSIONS)})")
        self.out = out
        self.compression = compression
        self._z = None
        if compression == "gzip":
            self._z = zlib.compressobj(6, zlib.DEFLATED, 31)
        elif compression == "zstd":
            import zstandard

            self._z = zstandard.ZstdCompressor(level=3, write_content_size=False,
                                               write_checksum=True).compressobj()

    def write(self, data) -> None:
        if self._z is None:
            self.out.write(data)
        else:
            self.out.write(self._z.compress(data))

    def close(self) -> None:
        if self._z is not None:
            self.out.write(self._z.flush())
            self._z = None
