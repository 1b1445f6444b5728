"""Where chunk artifacts are pushed to and pulled from: the few operations chunk-level
transfer needs (`ChunkRemote`), over an OCI registry (`chunkregistry.py`) or an OCI
image layout directory (`LayoutRemote`, here). Each counts the bytes it sends and
receives, which is what the figures compare."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from ..errors import CorruptData, NotFound
from .chunkartifact import sha256_digest
from .layout import REF_NAME, Descriptor, Layout, LayoutWriter


class ChunkRemote(Protocol):
    """Blob and manifest operations by digest and tag. `get_ranges` returns, for each
    (start, end) asked (sorted, not overlapping), that many bytes of the blob, which
    nobody has verified: the caller checks each chunk in them against its id."""

    bytes_sent: int
    bytes_received: int

    def has_blob(self, digest: str) -> bool: ...

    def put_blob(self, digest: str, data: bytes) -> None: ...

    def get_blob(self, digest: str, size: int) -> bytes: ...

    def get_ranges(self, digest: str, size: int,
                   ranges: list[tuple[int, int]]) -> Iterator[tuple[int, bytes]]: ...

    def get_manifest(self, ref: str) -> tuple[str, bytes] | None: ...

    def put_manifest(self, ref: str, data: bytes, media_type: str) -> str: ...


class LayoutRemote:
    """An OCI image layout directory as a remote: blobs in `blobs/sha256`, tags as
    `org.opencontainers.image.ref.name` in `index.json`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.writer = LayoutWriter(root)
        self.bytes_sent = 0
        self.bytes_received = 0

    def _path(self, digest: str) -> Path:
        return Layout(self.root).blob_path(digest)

    def has_blob(self, digest: str) -> bool:
        return self._path(digest).is_file()

    def put_blob(self, digest: str, data: bytes) -> None:
        if sha256_digest(data) != digest:
            raise CorruptData(f"blob {digest}: the bytes to write do not match it")
        self.writer.add_bytes(data, "")
        self.bytes_sent += len(data)

    def get_blob(self, digest: str, size: int) -> bytes:
        try:
            data = self._path(digest).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is missing from {self.root}") from None
        self.bytes_received += len(data)
        if len(data) != size or sha256_digest(data) != digest:
            raise CorruptData(f"blob {digest} does not match its digest")
        return data

    def get_ranges(self, digest: str, size: int,
                   ranges: list[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
        try:
            fd = os.open(self._path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is missing from {self.root}") from None
        try:
            for start, end in ranges:
                data = os.pread(fd, end - start, start)
                if len(data) != end - start:
                    raise CorruptData(f"blob {digest} is shorter than its index says")
                self.bytes_received += len(data)
                yield start, data
        finally:
            os.close(fd)

    def get_manifest(self, ref: str) -> tuple[str, bytes] | None:
        try:
            desc, _doc = Layout(self.root).manifest(ref)
        except NotFound:
            return None
        data = self._path(desc.digest).read_bytes()
        self.bytes_received += len(data)
        if sha256_digest(data) != desc.digest:
            raise CorruptData(f"manifest {desc.digest} does not match its digest")
        return desc.digest, data

    def put_manifest(self, ref: str, data: bytes, media_type: str) -> str:
        desc = self.writer.add_bytes(data, media_type)
        self.writer.set_ref(Descriptor(media_type, desc.digest, desc.size,
                                       {REF_NAME: ref}, {}), ref)
        self.bytes_sent += len(data)
        return desc.digest
