"""Pulling an image through its chunk artifact (docs/format.md, "Chunk artifacts"):
only the chunks the store lacks are fetched, as HTTP ranges of the pack blobs.

1. The artifact manifest (tag `sha256-<image digest hex>.pylayers`) names the layers
   and their index blobs; layers the store has are skipped whole (a layer is only ever
   stored with all its chunks). None: the caller pulls the standard image instead.
2. The index blobs of the missing layers (digest-checked) say where each chunk lies.
3. Round one fetches the chunks of their pylayers manifests that the store lacks; each
   manifest must hash to its layer id, decodes strictly (`decode_manifest`: untrusted
   bytes) and names the layer before it as parent, and the trees it makes must pass
   `validate_tree`.
4. Round two fetches the file chunks those manifests name that the store lacks: frames
   sorted by offset, neighbours coalesced into ranges, each chunk decompressed alone
   and checked against its BLAKE3 id before it is stored.
5. The layers are committed oldest first, the tag with the top one and the image
   config beside it (the importer's commit: a failure removes what it made).

Chunks are indexed every `COMMIT_BYTES` as they arrive, so a pull that stops (killed,
a network error, a damaged chunk) and is run again fetches only what it had not yet
verified; they stay unreferenced until their layer is committed (gc removes them if
it never is). Nothing unverified is ever stored, and no layer or tag is written
before every chunk is in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import blake3

from ..errors import CorruptData, PylayersError
from ..layers.manifest import REG, Entry, decode_manifest
from ..layers.repo import Layers
from ..layers.tree import apply_layer, validate_tree
from ..store.ingest import ChunkWriter
from .chunkartifact import (
    Artifact,
    FrameRef,
    LayerIndex,
    artifact_tag,
    decode_artifact,
    decode_frame,
)
from .chunkremote import ChunkRemote
from .importer import DEFAULT_MAX_LAYER_SIZE, _Importer, _Read

GAP = 16 << 10  # frames closer than this are fetched in one range (the gap comes along)
COMMIT_BYTES = 32 << 20  # chunk bytes stored between index commits (resumable pulls)


@dataclass
class ChunkPullResult:
    top: bytes
    layers: list[bytes] = field(default_factory=list)  # oldest first
    layers_fetched: int = 0  # layers the store lacked
    chunks_fetched: int = 0
    chunk_bytes: int = 0  # raw bytes of the chunks fetched
    bytes_received: int = 0  # everything the remote sent (manifests, indexes, ranges)

    def to_json(self) -> dict:
        return {"id": self.top.hex(), "layers_fetched": self.layers_fetched,
                "chunks_fetched": self.chunks_fetched, "chunk_bytes": self.chunk_bytes,
                "bytes_received": self.bytes_received}


def coalesce(frames: list[FrameRef], gap: int = GAP) -> list[tuple[int, int, list[FrameRef]]]:
    """(start, end, frames) ranges covering `frames` (of one pack): sorted by offset,
    frames less than `gap` bytes apart in one range."""
    out: list[tuple[int, int, list[FrameRef]]] = []
    for f in sorted(frames, key=lambda f: f.offset):
        end = f.offset + f.stored_len
        if out and f.offset - out[-1][1] < gap:
            start, _e, group = out[-1]
            group.append(f)
            out[-1] = (start, end, group)
        else:
            out.append((f.offset, end, [f]))
    return out


class _Fetcher:
    """Fetches chunks by id from the packs the indexes name, into the writer."""

    def __init__(self, remote: ChunkRemote, writer: ChunkWriter,
                 where: dict[bytes, tuple[str, int, FrameRef]],
                 progress: Callable[[int], None] | None) -> None:
        self.remote = remote
        self.writer = writer
        self.where = where
        self.progress = progress
        self.chunks = 0
        self.bytes = 0
        self._uncommitted = 0

    def fetch(self, cids: list[bytes], keep: bool, what: str) -> dict[bytes, bytes]:
        """Fetch and store the chunks `cids`; their bytes too when `keep`."""
        kept: dict[bytes, bytes] = {}
        by_pack: dict[tuple[str, int], list[FrameRef]] = {}
        for cid in dict.fromkeys(cids):
            loc = self.where.get(cid)
            if loc is None:
                raise CorruptData(f"chunk {cid.hex()} that {what} needs is in none of the "
                                  "chunk artifact's packs")
            by_pack.setdefault(loc[:2], []).append(loc[2])
        try:
            for (digest, size), frames in by_pack.items():
                self._pack(digest, size, frames, kept if keep else None)
        except PylayersError:
            # what was verified stays: a pull run again does not fetch it again
            if self._uncommitted:
                self.writer.commit()
                self._uncommitted = 0
            raise
        return kept

    def _pack(self, digest: str, size: int, frames: list[FrameRef],
              kept: dict[bytes, bytes] | None) -> None:
        ranges = coalesce(frames)
        got = self.remote.get_ranges(digest, size, [(s, e) for s, e, _ in ranges])
        for (start, data), (s, e, group) in zip(got, ranges, strict=True):
            if start != s or len(data) != e - s:
                raise CorruptData(f"pack blob {digest}: the remote sent other bytes "
                                  "than the range asked")
            for f in group:
                off = f.offset - s
                raw = decode_frame(f, memoryview(data)[off:off + f.stored_len],
                                   f"pack blob {digest}")
                self._store(f.chunk, raw)
                if kept is not None:
                    kept[f.chunk] = raw

    def _store(self, cid: bytes, raw: bytes) -> None:
        if self.writer.put(cid, raw):
            self.chunks += 1
            self.bytes += len(raw)
            self._uncommitted += len(raw)
            if self._uncommitted >= COMMIT_BYTES:
                self.writer.commit()
                self._uncommitted = 0
        if self.progress is not None:
            self.progress(len(raw))


def pull_chunk_artifact(layers: Layers, remote: ChunkRemote, image_digest: str,
                        tag: str | None = None, config: bytes | None = None,
                        message: str = "pull",
                        progress: Callable[[int], None] | None = None
                        ) -> ChunkPullResult | None:
    """Pull the image whose manifest is `image_digest` through its chunk artifact;
    None if the remote has no chunk artifact for it. `config` (the image config's
    bytes, already verified) is kept beside the top layer."""
    received0 = remote.bytes_received
    got = remote.get_manifest(artifact_tag(image_digest))
    if got is None:
        return None
    art = decode_artifact(got[1], image_digest)
    res = pull_layers(layers, remote, art, tag, config, message, progress)
    res.bytes_received = remote.bytes_received - received0
    return res


def pull_layers(layers: Layers, remote: ChunkRemote, art: Artifact, tag: str | None = None,
                config: bytes | None = None, message: str = "pull",
                progress: Callable[[int], None] | None = None) -> ChunkPullResult:
    """Pull the chain of layers `art.layers` (oldest first, from a base layer; their
    index and pack blobs among `art.blobs`): the layers the store lacks, fetching only
    the chunks it lacks. `config` is kept beside the top layer, `tag` names it."""
    received0 = remote.bytes_received
    res = ChunkPullResult(art.layers[-1].layer_id, [la.layer_id for la in art.layers])
    present = _present_prefix(layers, art)
    missing = art.layers[present:]
    parent = art.layers[present - 1].layer_id if present else None
    store = layers.store
    with store.writer() as writer:
        imp = _Importer(layers, writer, DEFAULT_MAX_LAYER_SIZE, None)
        if not missing:
            _finish(layers, res.top, tag, config)
            res.bytes_received = remote.bytes_received - received0
            return res
        indexes = _indexes(remote, art, present, parent)
        where: dict[bytes, tuple[str, int, FrameRef]] = {}
        for idx in indexes:
            for f in idx.frames:
                digest, size = idx.packs[f.pack]
                where.setdefault(f.chunk, (digest, size, f))
        fetcher = _Fetcher(remote, writer, where, progress)
        # round one: the manifests
        mcids = [cid for idx in indexes for cid, _ in idx.manifest if not writer.has(cid)]
        fetched = fetcher.fetch(mcids, True, "a layer manifest")
        reads: list[_Read] = []
        tree = layers.tree(parent) if parent is not None else []
        expect_parent = parent
        for idx in indexes:
            data = b"".join(fetched[cid] if cid in fetched else store.read_chunk(cid)
                            for cid, _ in idx.manifest)
            what = f"layer {idx.layer_id.hex()[:12]}"
            if blake3.blake3(data).digest() != idx.layer_id:
                raise CorruptData(f"{what}: its manifest from the chunk artifact does not "
                                  "match its id")
            got_parent, own = decode_manifest(data)
            if got_parent != expect_parent:
                raise CorruptData(f"{what}: its manifest names another parent than the "
                                  "layer before it in the image")
            tree = apply_layer(tree, own)
            validate_tree(tree, own, what)
            reads.append(_Read(own, ""))
            expect_parent = idx.layer_id
        del fetched
        # round two: the files' chunks
        need = [cid for r in reads for cid in _file_chunks(r.own) if not writer.has(cid)]
        fetcher.fetch(need, False, "a file")
        ids = imp.commit(parent, reads, tag, message, config)
        if ids != [la.layer_id for la in missing]:  # encode(decode(m)) == m: never
            raise CorruptData("the layers pulled got other ids than the chunk artifact's")
    res.layers_fetched = len(missing)
    res.chunks_fetched = fetcher.chunks
    res.chunk_bytes = fetcher.bytes
    res.bytes_received = remote.bytes_received - received0
    return res


def _finish(layers: Layers, top: bytes, tag: str | None, config: bytes | None) -> None:
    from . import config as image_config

    if config is not None:
        image_config.save(layers.store, top, config, (tag,) if tag is not None else ())
    elif tag is not None:
        layers.set_tag(tag, top)


def _file_chunks(own: list[Entry]) -> list[bytes]:
    return [cid for e in own if e.kind == REG for cid, _n in e.chunk_list()]


def _present_prefix(layers: Layers, art: Artifact) -> int:
    """How many of the artifact's layers, from the oldest, the store has; their chain
    must be the artifact's."""
    n = 0
    parent = None
    for la in art.layers:
        if not layers.exists(la.layer_id):
            break
        if layers.record(la.layer_id).parent != parent:
            raise CorruptData(f"the chunk artifact's layers do not form a chain (layer "
                              f"{la.layer_id.hex()[:12]})")
        parent = la.layer_id
        n += 1
    for la in art.layers[n:]:
        if layers.exists(la.layer_id):
            raise CorruptData(f"the chunk artifact's layers do not form a chain (layer "
                              f"{la.layer_id.hex()[:12]})")
    return n


def _indexes(remote: ChunkRemote, art: Artifact, present: int,
             parent: bytes | None) -> list[LayerIndex]:
    out = []
    for la in art.layers[present:]:
        what = f"layer index {la.index_digest}"
        idx = LayerIndex.decode(remote.get_blob(la.index_digest, la.index_size), what)
        if idx.layer_id != la.layer_id or idx.parent != parent:
            raise CorruptData(f"{what} names another layer than the chunk artifact")
        for digest, size in idx.packs:
            if art.blobs.get(digest) != size:
                raise CorruptData(f"{what} names pack blob {digest}, which the chunk "
                                  "artifact does not list")
        out.append(idx)
        parent = la.layer_id
    return out
