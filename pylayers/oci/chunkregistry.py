"""A registry as a chunk remote (`ChunkRemote` over `registry.RegistryClient`), with
the range requests chunk-level pulls make: several byte ranges of a pack blob per
request (`Range: bytes=a-b,c-d`, answered `206 multipart/byteranges`), and the
fallbacks registries need.

Registries differ on ranges. Some send the parts asked; some coalesce them into one
206 range; some answer a multi-range request with an error (400, 416) or with the whole
blob (200), and some ignore Range altogether. Each answer is used as it comes (a
coalesced range or a whole blob still holds the bytes asked; a whole blob is checked
against its digest first), and the remote moves down a mode for the requests after:
`multi` (several ranges a request), `single` (one range a request), `whole` (whole
blobs). Bytes inside ranges are not verified here: the caller checks every chunk in
them against its id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from ..errors import CorruptData, NotFound, PylayersError
from .registry import RegistryClient

MAX_RANGES = 32  # ranges in one request (a Range header of about 1 KB)
_SLACK = 64 << 10  # multipart headers and boundaries beyond the bytes asked
_MODES = ("multi", "single", "whole")


class RegistryRemote:
    """Chunk artifact operations on one repository of a registry."""

    def __init__(self, client: RegistryClient, mode: str = "multi") -> None:
        if mode not in _MODES:
            raise ValueError(mode)
        self.client = client
        self.mode = mode
        self.requests_refused = 0  # multi-range or range requests a fallback followed

    @property
    def bytes_sent(self) -> int:
        return self.client.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.client.bytes_received

    def has_blob(self, digest: str) -> bool:
        return self.client.has_blob(digest)

    def put_blob(self, digest: str, data: bytes) -> None:
        self.client.push_blob(digest, data)

    def get_blob(self, digest: str, size: int) -> bytes:
        with self.client.open_blob(digest) as stream:
            data = _read_limited(stream, size, f"blob {digest}")
        _check_whole(data, digest, size)
        return data

    def get_manifest(self, ref: str) -> tuple[str, bytes] | None:
        try:
            _mt, data, digest = self.client.get_manifest(ref)
        except NotFound:
            return None
        return digest, data

    def put_manifest(self, ref: str, data: bytes, media_type: str) -> str:
        return self.client.put_manifest(ref, media_type, data)

    # -- ranges ------------------------------------------------------------------------
    def get_ranges(self, digest: str, size: int,
                   ranges: list[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
        whole: bytes | None = None
        i = 0
        while i < len(ranges):
            if whole is not None or self.mode == "whole":
                if whole is None:
                    whole = self.get_blob(digest, size)
                for start, end in ranges[i:]:
                    yield start, whole[start:end]
                return
            if self.mode == "single" or i == len(ranges) - 1:
                start, end = ranges[i]
                got = self._single(digest, size, start, end)
                if isinstance(got, _Whole):
                    whole = got.data
                    continue
                yield start, got
                i += 1
                continue
            batch = ranges[i:i + MAX_RANGES]
            parts = self._multi(digest, size, batch)
            if isinstance(parts, _Whole):
                whole = parts.data
                continue
            for start, end in batch:
                data = _cut(parts, start, end)
                if data is None:  # refused, or other parts than asked were sent
                    if self.mode == "multi":
                        self.mode = "single"
                        self.requests_refused += 1
                    break
                yield start, data
                i += 1

    def _single(self, digest: str, size: int, start: int, end: int) -> bytes | _Whole:
        with self.client.open_blob(digest, (start, end)) as stream:
            if stream.status == 200:  # Range ignored: the whole blob came
                self.mode = "whole"
                self.requests_refused += 1
                data = _read_limited(stream, size, f"blob {digest}")
                _check_whole(data, digest, size)
                return _Whole(data)
            data = _read_limited(stream, end - start, f"blob {digest}")
            if stream.start != start or len(data) != end - start:
                raise CorruptData(f"blob {digest}: the registry sent other bytes than the "
                                  f"range {start}-{end - 1} asked")
            return data

    def _multi(self, digest: str, size: int,
               batch: list[tuple[int, int]]) -> list[tuple[int, bytes]] | _Whole:
        spec = ",".join(f"{s}-{e - 1}" for s, e in batch)
        asked = sum(e - s for s, e in batch)
        try:
            stream = self.client.open_blob(digest, headers={"Range": f"bytes={spec}"})
        except NotFound:
            raise
        except PylayersError:  # 400, 416...: this registry takes one range at a time
            self.mode = "single"
            self.requests_refused += 1
            return []
        with stream:
            if stream.status == 200:  # the whole blob instead: usable, once checked
                self.mode = "single"
                self.requests_refused += 1
                data = _read_limited(stream, size, f"blob {digest}")
                _check_whole(data, digest, size)
                return _Whole(data)
            ctype = stream.headers.get("Content-Type", "")
            # a server may coalesce the ranges into one: never more than the blob
            body = _read_limited(stream, max(asked, size) + _SLACK, f"blob {digest}")
            if ctype.lower().startswith("multipart/byteranges"):
                return parse_multipart(body, ctype, f"blob {digest}")
            return [(stream.start, body)]  # one range covering what was asked


class _Whole:
    def __init__(self, data: bytes) -> None:
        self.data = data


def _read_limited(stream, limit: int, what: str) -> bytes:
    data = stream.read(limit + 1)
    parts = [data]
    got = len(data)
    while data and got <= limit:
        data = stream.read(limit + 1 - got)
        parts.append(data)
        got += len(data)
    if got > limit:
        raise CorruptData(f"{what}: the registry sent more than {limit} bytes")
    return b"".join(parts)


def _check_whole(data: bytes, digest: str, size: int) -> None:
    if len(data) != size or "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise CorruptData(f"blob {digest} does not match its digest")


def _cut(parts: list[tuple[int, bytes]], start: int, end: int) -> bytes | None:
    """Bytes [start, end) from whichever part holds them all."""
    for first, data in parts:
        if first <= start and end <= first + len(data):
            return data[start - first:end - first]
    return None


def parse_multipart(body: bytes, ctype: str, what: str) -> list[tuple[int, bytes]]:
    """The parts of a `multipart/byteranges` body: (first byte, bytes) each, read by
    their Content-Range lengths (a part's bytes may hold the boundary string)."""
    boundary = None
    for param in ctype.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip().strip('"').encode()
    if not boundary:
        raise CorruptData(f"{what}: a multipart answer without a boundary")
    delim = b"--" + boundary
    parts: list[tuple[int, bytes]] = []
    pos = body.find(delim)
    while pos >= 0:
        pos += len(delim)
        if body[pos:pos + 2] == b"--":
            return parts
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            break
        first = last = None
        for line in body[pos:head_end].split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-range":
                unit, _, spec = value.strip().partition(b" ")
                span = spec.partition(b"/")[0]
                a, _, b = span.partition(b"-")
                if unit.lower() == b"bytes" and a.isdigit() and b.isdigit():
                    first, last = int(a), int(b)
        if first is None or last is None or last < first:
            raise CorruptData(f"{what}: a multipart part without a byte range")
        start = head_end + 4
        data = body[start:start + last - first + 1]
        if len(data) != last - first + 1:
            break
        parts.append((first, data))
        pos = body.find(delim, start + len(data))
    raise CorruptData(f"{what}: a truncated multipart answer")
