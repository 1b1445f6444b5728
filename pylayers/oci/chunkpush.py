"""Pushing the chunk artifact of an image (docs/format.md, "Chunk artifacts"): for each
layer of the chain, oldest first, its pack blobs and its index blob, each sent only if
the remote lacks it (the same layer gives the same blobs, so a re-push sends none of
them, and a changed layer only the packs around its changes); then the artifact
manifest, tagged `sha256-<image digest hex>.pylayers`, whose subject is the image."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..layers.manifest import REG
from ..layers.repo import Layers
from ..store.readahead import read_ahead
from .chunkartifact import (
    DEFAULT_LEVEL,
    EMPTY,
    EMPTY_DIGEST,
    INDEX_TYPE,
    MANIFEST_TYPE,
    PACK_TYPE,
    FrameRef,
    LayerIndex,
    artifact_tag,
    build_packs,
    descriptor,
    encode_artifact,
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


def _with_data(layers: Layers, cids: list[bytes]) -> Iterator[tuple[bytes, bytes]]:
    return zip(cids, read_ahead(layers.store, cids), strict=True)


def layer_chunks(layers: Layers, layer_id: bytes) -> tuple[list[tuple[bytes, int]], list[bytes]]:
    """(the layer's manifest chunks, the ids of its files' chunks not among them, in
    manifest order, each once)."""
    rec = layers.record(layer_id)
    seen = {cid for cid, _ in rec.manifest}
    files: list[bytes] = []
    for e in layers.entries(layer_id):
        if e.kind == REG:
            for cid, _n in e.chunk_list():
                if cid not in seen:
                    seen.add(cid)
                    files.append(cid)
    return rec.manifest, files


def push_chunk_artifact(layers: Layers, top: bytes, remote: ChunkRemote, image: dict,
                        level: int = DEFAULT_LEVEL,
                        progress: Callable[[int], None] | None = None) -> ChunkPushResult:
    """Push the chunk artifact of the layer `top` and its ancestors, which the image
    manifest described by the descriptor `image` holds as its layers, oldest first."""
    sent0 = remote.bytes_sent
    res = ChunkPushResult(artifact_tag(image["digest"]), "")

    def send(digest: str, data: bytes) -> None:
        res.blobs += 1
        if not remote.has_blob(digest):
            remote.put_blob(digest, data)
            res.blobs_sent += 1

    if not remote.has_blob(EMPTY_DIGEST):  # the config, not one of the artifact's blobs
        remote.put_blob(EMPTY_DIGEST, EMPTY)
    listed = []
    for lid in reversed(layers.chain(top)):
        manifest, files = layer_chunks(layers, lid)
        # each id once: a manifest chunk equal to a file chunk is stored with the manifest
        mcids = list(dict.fromkeys(cid for cid, _ in manifest))
        index = LayerIndex(lid, layers.record(lid).parent, manifest)
        packs = []
        for pack in build_packs(_with_data(layers, mcids), _with_data(layers, files), level):
            n = len(index.packs)
            index.packs.append((pack.digest, len(pack.data)))
            index.frames += [FrameRef(n, *f) for f in pack.frames]
            send(pack.digest, pack.data)
            packs.append(descriptor(PACK_TYPE, pack.digest, len(pack.data)))
            if progress is not None:
                progress(sum(f[3] for f in pack.frames))
        data = index.encode()
        digest = sha256_digest(data)
        send(digest, data)
        listed.append((lid, descriptor(INDEX_TYPE, digest, len(data)), packs))
    doc = encode_artifact(image, listed)
    res.digest = remote.put_manifest(res.tag, doc, MANIFEST_TYPE)
    res.bytes_sent = remote.bytes_sent - sent0
    return res
