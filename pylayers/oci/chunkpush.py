"""Pushing the chunk artifact of an image (docs/format.md, "Chunk artifacts"): for each
layer of the chain, oldest first, its pack blobs and its index blob, each sent only if
the remote lacks it (the same layer gives the same blobs, so a re-push sends none of
them, and a changed layer only the packs around its changes); then the artifact
manifest, tagged `sha256-<image digest hex>.pylayers`, whose subject is the image.

Which chunks make each pack is known from the layer's manifest alone (`plan_packs`),
so a pack this store built before is not built again: `PackCache` (STORE/registry/
chunk-packs/, a cache: deleting it costs time only) remembers each pack's digest and
frames by its chunk list and zstd level, and when the remote has that blob nothing is
read or compressed."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import blake3

from ..layers.manifest import REG
from ..layers.repo import Layers
from ..store.readahead import read_ahead
from .chunkartifact import (
    DEFAULT_LEVEL,
    EMPTY,
    EMPTY_DIGEST,
    HEADER,
    INDEX_TYPE,
    MANIFEST_TYPE,
    PACK_TYPE,
    FrameRef,
    LayerIndex,
    PackEncoder,
    artifact_tag,
    descriptor,
    encode_artifact,
    plan_packs,
    sha256_digest,
)
from .chunkremote import ChunkRemote


@dataclass
class ChunkPushResult:
    tag: str
    digest: str  # of the artifact manifest
    blobs: int = 0  # blobs the artifact lists
    blobs_sent: int = 0  # of which the remote lacked
    bytes_sent: int = 0  # blob and manifest bytes sent

    def to_json(self) -> dict:
        return {"tag": self.tag, "digest": self.digest, "blobs": self.blobs,
                "blobs_sent": self.blobs_sent, "bytes_sent": self.bytes_sent}


_CACHE_MAGIC = b"PLYRXPC1"
_CACHE_HEAD = struct.Struct("<8s32sQI")  # magic, sha256 of the pack, its size, frames
_CACHE_FRAME = struct.Struct("<QIBI32s")  # offset, stored_len, codec, raw_len, chunk id


class PackCache:
    """Packs this store built, by chunk list and level: (digest, size, frames). A
    damaged or foreign entry is a miss; entries are written whole (renamed into
    place)."""

    def __init__(self, root: Path, level: int) -> None:
        self.root = root
        self.level = level

    def _path(self, group: list[tuple[bytes, int]]) -> Path:
        h = blake3.blake3(b"pylayers chunk pack v1\0%d\0" % self.level)
        for cid, n in group:
            h.update(cid + n.to_bytes(4, "little"))
        key = h.hexdigest()
        return self.root / key[:2] / key

    def get(self, group: list[tuple[bytes, int]]
            ) -> tuple[str, int, list[tuple[int, int, int, int, bytes]]] | None:
        try:
            data = self._path(group).read_bytes()
        except OSError:
            return None
        if len(data) != _CACHE_HEAD.size + len(group) * _CACHE_FRAME.size:
            return None
        magic, digest, size, n = _CACHE_HEAD.unpack_from(data)
        if magic != _CACHE_MAGIC or n != len(group):
            return None
        frames = [_CACHE_FRAME.unpack_from(data, _CACHE_HEAD.size + i * _CACHE_FRAME.size)
                  for i in range(n)]
        offset = HEADER.size
        for (off, stored, _codec, raw, cid), (gcid, glen) in zip(frames, group, strict=True):
            if off != offset or cid != gcid or raw != glen:
                return None
            offset += stored
        if offset != size:
            return None
        return "sha256:" + digest.hex(), size, frames

    def put(self, group: list[tuple[bytes, int]], digest: str, size: int,
            frames: list[tuple[int, int, int, int, bytes]]) -> None:
        path = self._path(group)
        data = _CACHE_HEAD.pack(_CACHE_MAGIC, bytes.fromhex(digest[7:]), size, len(frames))
        data += b"".join(_CACHE_FRAME.pack(*f) for f in frames)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError:  # a cache: a push that cannot write it is no worse off
            tmp.unlink(missing_ok=True)


def layer_chunks(layers: Layers, layer_id: bytes
                 ) -> tuple[list[tuple[bytes, int]], list[tuple[bytes, int]]]:
    """(the layer's manifest chunks, its files' chunks not among them), (id, length)
    in manifest order, each id once."""
    rec = layers.record(layer_id)
    manifest = list(dict.fromkeys(rec.manifest))
    seen = {cid for cid, _ in manifest}
    files: list[tuple[bytes, int]] = []
    for e in layers.entries(layer_id):
        if e.kind == REG:
            for cid, n in e.chunk_list():
                if cid not in seen:
                    seen.add(cid)
                    files.append((cid, n))
    return manifest, files


def push_chunk_artifact(layers: Layers, top: bytes, remote: ChunkRemote, image: dict,
                        level: int = DEFAULT_LEVEL,
                        progress: Callable[[int], None] | None = None) -> ChunkPushResult:
    """Push the chunk artifact of the layer `top` and its ancestors, which the image
    manifest described by the descriptor `image` holds as its layers, oldest first."""
    sent0 = remote.bytes_sent
    res = ChunkPushResult(artifact_tag(image["digest"]), "")
    if not remote.has_blob(EMPTY_DIGEST):  # the config, not one of the artifact's blobs
        remote.put_blob(EMPTY_DIGEST, EMPTY)
    listed = []
    with LayerPusher(layers, remote, level, progress) as pusher:
        for lid in reversed(layers.chain(top)):
            index, packs = pusher.push(lid)
            listed.append((lid, index, packs))
        res.blobs, res.blobs_sent = pusher.blobs, pusher.blobs_sent
    doc = encode_artifact(image, listed)
    res.digest = remote.put_manifest(res.tag, doc, MANIFEST_TYPE)
    res.bytes_sent = remote.bytes_sent - sent0
    return res


class LayerPusher:
    """Pushes layers as chunk blobs (each layer's packs, then its index blob), each
    blob only if the remote lacks it: a digest in `known` (blobs the caller knows the
    remote has, such as those an existing manifest lists) is not even asked about.
    Close it, or use it as a context manager."""

    def __init__(self, layers: Layers, remote: ChunkRemote, level: int = DEFAULT_LEVEL,
                 progress: Callable[[int], None] | None = None,
                 known: set[str] | None = None) -> None:
        self.layers = layers
        self.remote = remote
        self.progress = progress
        self.known = known if known is not None else set()
        self.blobs = 0  # blobs listed
        self.blobs_sent = 0  # of which the remote lacked
        self.cache = PackCache(layers.store.path / "registry" / "chunk-packs", level)
        self.enc = PackEncoder(level)

    def _has(self, digest: str) -> bool:
        return digest in self.known or self.remote.has_blob(digest)

    def _send(self, digest: str, data: bytes) -> None:
        self.blobs += 1
        if not self._has(digest):
            self.remote.put_blob(digest, data)
            self.blobs_sent += 1
        self.known.add(digest)

    def push(self, lid: bytes) -> tuple[dict, list[dict]]:
        """Push the layer `lid` (not its ancestors): (its index blob's descriptor, its
        pack blobs' descriptors)."""
        layers = self.layers
        manifest, files = layer_chunks(layers, lid)
        rec = layers.record(lid)
        index = LayerIndex(lid, rec.parent, rec.manifest)
        packs = []
        for group in plan_packs(manifest, files):
            known = self.cache.get(group)
            if known is not None and self._has(known[0]):
                digest, size, frames = known
                self.blobs += 1
                self.known.add(digest)
            else:
                cids = [cid for cid, _ in group]
                pack = self.enc.encode(zip(cids, read_ahead(layers.store, cids), strict=True))
                digest, size, frames = pack.digest, len(pack.data), pack.frames
                self._send(digest, pack.data)
                self.cache.put(group, digest, size, frames)
            n = len(index.packs)
            index.packs.append((digest, size))
            index.frames += [FrameRef(n, *f) for f in frames]
            packs.append(descriptor(PACK_TYPE, digest, size))
            if self.progress is not None:
                self.progress(sum(length for _, length in group))
        data = index.encode()
        digest = sha256_digest(data)
        self._send(digest, data)
        return descriptor(INDEX_TYPE, digest, len(data)), packs

    def close(self) -> None:
        self.enc.close()

    def __enter__(self) -> LayerPusher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
