"""The chunk artifact (docs/format.md, "Chunk artifacts"): an OCI artifact pushed beside
a standard image that carries its layers as pylayers layers, so that a pylayers client
fetches only the chunks its store lacks.

Terms. For each layer of the image the artifact holds a *layer index* blob and
*pack* blobs. A pack blob is a 16-byte header followed by *frames*, one per chunk: the
chunk's bytes compressed alone as one zstd frame (or raw when that is not smaller), so
an HTTP range covering one frame decodes on its own and is verified by the chunk's
BLAKE3 id. The layer index names the layer (id, parent), lists the chunks of its
pylayers manifest and, for every frame of its packs, where it lies: (pack, offset,
stored length, codec, raw length, chunk id).

Determinism: the same layer always gives the same blobs. A layer's chunks are taken in
manifest order (its manifest's chunks first, then each file's, each chunk once); the
manifest's chunks fill packs of their own, and the file chunks are cut into packs at
chunks whose id says so (content-defined, between a minimum and a maximum size), so an
edit inside a layer changes the packs around it and leaves the others byte-identical:
the registry already has them and the push sends none of them again.

Every encoder has its decoder beside it; the decoders are strict (untrusted bytes).
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import zstandard

from ..errors import CorruptData
from .streams import parse_digest

FORMAT = 1  # the chunk artifact's version (docs/format.md, "Chunk artifacts")
ARTIFACT_TYPE = "application/vnd.pylayers.chunks.v1"
INDEX_TYPE = "application/vnd.pylayers.chunks.index.v1"
PACK_TYPE = "application/vnd.pylayers.chunks.pack.v1"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY = b"{}"
EMPTY_DIGEST = "sha256:" + hashlib.sha256(EMPTY).hexdigest()
LAYER_ANNOTATION = "dev.pylayers.layer"  # on an index blob's descriptor: the layer id
VERSION_ANNOTATION = "dev.pylayers.chunks.version"
TAG_SUFFIX = ".pylayers"

INDEX_MAGIC = b"PLYRXIDX"
PACK_MAGIC = b"PLYRXPAK"
HEADER = struct.Struct("<8sII")  # magic, version, reserved (0)
MANIFEST_CHUNK = struct.Struct("<32sI")  # chunk id, length
PACK_ENTRY = struct.Struct("<32sQ")  # sha256 of the pack blob, its size
FRAME_ENTRY = struct.Struct("<IQIBI32s")  # pack, offset, stored_len, codec, raw_len, id
COUNT = struct.Struct("<I")
CODEC_RAW = 0
CODEC_ZSTD = 1

# Packs: file chunks are cut into packs after a chunk whose id's first four bytes, read
# as a little-endian integer, are a multiple of PACK_DIVISOR once the pack holds
# PACK_MIN raw bytes, or when it reaches PACK_MAX (about 4-5 MiB of chunks on average).
PACK_MIN = 1 << 20
PACK_MAX = 16 << 20
PACK_DIVISOR = 64
DEFAULT_LEVEL = 9  # zstd level of the frames (the pusher's choice; any level decodes)
MAX_CHUNK = 16 << 20  # no chunk in an artifact is larger (a decoder's sanity bound)
MAX_INDEX = 256 << 20  # no layer index blob is larger
MAX_MANIFEST = 4 << 20  # no artifact manifest is larger


def artifact_tag(image_digest: str) -> str:
    """The tag the chunk artifact of the image manifest `image_digest` is pushed under:
    `sha256-<hex>.pylayers` (cosign's scheme: every registry has tags, not all have the
    referrers API)."""
    algo, hexpart = parse_digest(image_digest)
    return f"{algo}-{hexpart}{TAG_SUFFIX}"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class FrameRef:
    """Where one chunk lies in a pack blob: `stored_len` bytes at `offset`."""

    pack: int  # index into LayerIndex.packs
    offset: int
    stored_len: int
    codec: int
    raw_len: int
    chunk: bytes


@dataclass
class LayerIndex:
    """The layer index blob (docs/format.md, "Chunk artifacts")."""

    layer_id: bytes
    parent: bytes | None
    manifest: list[tuple[bytes, int]]  # the pylayers manifest's chunks
    packs: list[tuple[str, int]] = field(default_factory=list)  # (digest, size)
    frames: list[FrameRef] = field(default_factory=list)

    def encode(self) -> bytes:
        out = [HEADER.pack(INDEX_MAGIC, FORMAT, 0), self.layer_id,
               self.parent or bytes(32), COUNT.pack(len(self.manifest))]
        out += [MANIFEST_CHUNK.pack(cid, n) for cid, n in self.manifest]
        out.append(COUNT.pack(len(self.packs)))
        out += [PACK_ENTRY.pack(bytes.fromhex(parse_digest(d)[1]), size)
                for d, size in self.packs]
        out.append(COUNT.pack(len(self.frames)))
        out += [FRAME_ENTRY.pack(f.pack, f.offset, f.stored_len, f.codec, f.raw_len, f.chunk)
                for f in self.frames]
        return b"".join(out)

    @classmethod
    def decode(cls, data: bytes, what: str = "layer index") -> LayerIndex:
        """Refuses anything `encode` would not write (see docs/format.md)."""
        mv = memoryview(data)
        pos = 0

        def take(n: int) -> memoryview:
            nonlocal pos
            if pos + n > len(mv):
                raise CorruptData(f"{what} is truncated")
            pos += n
            return mv[pos - n:pos]

        def count(item: int) -> int:
            n = COUNT.unpack(take(4))[0]
            if n * item > len(mv) - pos:
                raise CorruptData(f"{what} is truncated")
            return n

        magic, version, reserved = HEADER.unpack(take(HEADER.size))
        if magic != INDEX_MAGIC:
            raise CorruptData(f"{what} is not a pylayers layer index")
        if version != FORMAT or reserved:
            raise CorruptData(f"{what} has version {version}; this pylayers reads "
                              f"version {FORMAT}")
        layer_id = bytes(take(32))
        parent = bytes(take(32))
        manifest = [MANIFEST_CHUNK.unpack(take(MANIFEST_CHUNK.size))
                    for _ in range(count(MANIFEST_CHUNK.size))]
        if not manifest or any(not 0 < n <= MAX_CHUNK for _, n in manifest):
            raise CorruptData(f"{what}: bad manifest chunk list")
        packs = []
        for _ in range(count(PACK_ENTRY.size)):
            digest, size = PACK_ENTRY.unpack(take(PACK_ENTRY.size))
            packs.append(("sha256:" + digest.hex(), size))
        frames = [FrameRef(*FRAME_ENTRY.unpack(take(FRAME_ENTRY.size)))
                  for _ in range(count(FRAME_ENTRY.size))]
        if pos != len(mv):
            raise CorruptData(f"{what} has trailing bytes")
        _check_frames(packs, frames, what)
        return cls(layer_id, parent if parent != bytes(32) else None,
                   [(bytes(c), n) for c, n in manifest], packs, frames)


def _check_frames(packs: list[tuple[str, int]], frames: list[FrameRef], what: str) -> None:
    """Frames in pack order, back to back from each pack's header to its end, each a
    plausible chunk, every id once."""
    seen: set[bytes] = set()
    expect = [HEADER.size] * len(packs)
    last = -1
    for f in frames:
        if not 0 <= f.pack < len(packs) or f.pack < last:
            raise CorruptData(f"{what}: frames out of pack order")
        last = f.pack
        if f.offset != expect[f.pack]:
            raise CorruptData(f"{what}: frames of pack {f.pack} are not contiguous")
        if not 0 < f.raw_len <= MAX_CHUNK or f.codec not in (CODEC_RAW, CODEC_ZSTD) or \
                not 0 < f.stored_len <= f.raw_len or (
                    f.codec == CODEC_RAW and f.stored_len != f.raw_len):
            raise CorruptData(f"{what}: a frame at offset {f.offset} is malformed")
        if f.chunk in seen:
            raise CorruptData(f"{what}: chunk {f.chunk.hex()} is listed twice")
        seen.add(f.chunk)
        expect[f.pack] += f.stored_len
    for i, (digest, size) in enumerate(packs):
        if expect[i] != size:
            raise CorruptData(f"{what}: the frames of pack {digest} do not fill it")


def decode_frame(f: FrameRef, data: bytes | memoryview, where: str) -> bytes:
    """The chunk a frame's bytes hold, verified against its id. CorruptData if not."""
    from ..store.ingest import chunk_id

    if f.codec == CODEC_RAW:
        raw = bytes(data)
    else:
        try:
            raw = zstandard.ZstdDecompressor().decompress(bytes(data),
                                                          max_output_size=f.raw_len)
        except zstandard.ZstdError as e:
            raise CorruptData(f"chunk {f.chunk.hex()} in {where}: cannot decompress "
                              f"({e})") from None
    if len(raw) != f.raw_len or chunk_id(raw) != f.chunk:
        raise CorruptData(f"chunk {f.chunk.hex()} in {where} at offset {f.offset} does "
                          "not match its id")
    return raw


# -- building packs ----------------------------------------------------------------
@dataclass
class PackBlob:
    data: bytes
    digest: str
    frames: list[tuple[int, int, int, int, bytes]]  # offset, stored_len, codec, raw_len, id


_local = threading.local()


def _compress(level: int, chunk: bytes) -> tuple[int, bytes]:
    comp = getattr(_local, "comp", None)
    if comp is None or _local.level != level:
        comp = _local.comp = zstandard.ZstdCompressor(level=level, write_checksum=False,
                                                      write_content_size=True)
        _local.level = level
    packed = comp.compress(chunk)
    if len(packed) < len(chunk):
        return CODEC_ZSTD, packed
    return CODEC_RAW, chunk


def pack_boundary(cid: bytes, raw: int) -> bool:
    """Whether a file-chunk pack holding `raw` bytes ends after the chunk `cid`."""
    return raw >= PACK_MAX or (raw >= PACK_MIN and
                               int.from_bytes(cid[:4], "little") % PACK_DIVISOR == 0)


def plan_packs(manifest: list[tuple[bytes, int]],
               files: list[tuple[bytes, int]]) -> list[list[tuple[bytes, int]]]:
    """The chunks (id, length) of each pack of a layer whose manifest chunks are
    `manifest` and whose file chunks are `files` (in order, each id once): the
    manifest's chunks in packs of their own (at most PACK_MAX bytes each), then the
    file chunks cut by `pack_boundary`. Lengths and ids alone decide, so which packs a
    layer has is known before any chunk is read or compressed."""
    out: list[list[tuple[bytes, int]]] = []
    for seq, by_id in ((manifest, False), (files, True)):
        cur: list[tuple[bytes, int]] = []
        raw = 0
        for cid, n in seq:
            cur.append((cid, n))
            raw += n
            if raw >= PACK_MAX or (by_id and pack_boundary(cid, raw)):
                out.append(cur)
                cur, raw = [], 0
        if cur:
            out.append(cur)
    return out


class PackEncoder:
    """Compresses packs' frames on `threads` threads (the output does not depend on
    how many). Close it, or use it as a context manager."""

    def __init__(self, level: int = DEFAULT_LEVEL, threads: int = 2) -> None:
        self.level = level
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pylayers-pack")

    def encode(self, chunks: Iterable[tuple[bytes, bytes]]) -> PackBlob:
        """The pack blob holding `chunks` ((id, bytes), in order)."""
        return _pack([(cid, len(data), self._pool.submit(_compress, self.level, data))
                      for cid, data in chunks])

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> PackEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_packs(manifest: Iterable[tuple[bytes, bytes]], files: Iterable[tuple[bytes, bytes]],
                level: int = DEFAULT_LEVEL, threads: int = 2) -> Iterator[PackBlob]:
    """The pack blobs of a layer (`plan_packs`) from its chunks' bytes ((id, bytes), in
    order, each id once)."""
    mdata, fdata = list(manifest), list(files)
    data = dict(mdata + fdata)
    plan = plan_packs([(c, len(d)) for c, d in mdata], [(c, len(d)) for c, d in fdata])
    with PackEncoder(level, threads) as enc:
        for group in plan:
            yield enc.encode((cid, data[cid]) for cid, _n in group)


def _pack(pending: list) -> PackBlob:
    parts = [HEADER.pack(PACK_MAGIC, FORMAT, 0)]
    offset = HEADER.size
    frames = []
    for cid, raw_len, fut in pending:
        codec, stored = fut.result()
        frames.append((offset, len(stored), codec, raw_len, cid))
        parts.append(stored)
        offset += len(stored)
    data = b"".join(parts)
    return PackBlob(data, sha256_digest(data), frames)


# -- the artifact manifest -----------------------------------------------------------
@dataclass(frozen=True)
class ArtifactLayer:
    layer_id: bytes
    index_digest: str
    index_size: int


@dataclass
class Artifact:
    """What a client reads from the artifact manifest: the image it belongs to, its
    layers (oldest first) with their index blobs, and the blobs it lists."""

    subject: str
    layers: list[ArtifactLayer]
    blobs: dict[str, int]  # every blob the manifest lists: digest -> size


def descriptor(media_type: str, digest: str, size: int,
               annotations: dict | None = None) -> dict:
    d: dict = {"mediaType": media_type, "digest": digest, "size": size}
    if annotations:
        d["annotations"] = annotations
    return d


def encode_artifact(subject: dict, layers: list[tuple[bytes, dict, list[dict]]]) -> bytes:
    """The artifact manifest: `subject` is the image manifest's descriptor; `layers`
    holds, oldest first, (layer id, index blob descriptor, pack blob descriptors).
    Canonical JSON, so the same image and layers give the same manifest."""
    blobs: list[dict] = []
    for lid, index, packs in layers:
        blobs.append({**index, "annotations": {LAYER_ANNOTATION: lid.hex()}})
        blobs += packs
    doc = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "artifactType": ARTIFACT_TYPE,
           "config": descriptor(EMPTY_TYPE, EMPTY_DIGEST, len(EMPTY)),
           "layers": blobs, "subject": subject,
           "annotations": {VERSION_ANNOTATION: str(FORMAT)}}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def decode_artifact(data: bytes, image_digest: str, what: str = "chunk artifact") -> Artifact:
    """The artifact manifest's content, refusing one that is not a version-1 chunk
    artifact of the image manifest `image_digest`."""
    if len(data) > MAX_MANIFEST:
        raise CorruptData(f"{what} is too large ({len(data)} bytes)")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptData(f"{what} is not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("artifactType") != ARTIFACT_TYPE or \
            not isinstance(doc.get("layers"), list):
        raise CorruptData(f"{what} is not a pylayers chunk artifact")
    ann = doc.get("annotations")
    version = ann.get(VERSION_ANNOTATION) if isinstance(ann, dict) else None
    if version != str(FORMAT):
        raise CorruptData(f"{what} has version {version}; this pylayers reads "
                          f"version {FORMAT}")
    subject = doc.get("subject")
    if not isinstance(subject, dict) or subject.get("digest") != image_digest:
        raise CorruptData(f"{what} belongs to another image than {image_digest}")
    layers: list[ArtifactLayer] = []
    blobs: dict[str, int] = {}
    for d in doc["layers"]:
        if not isinstance(d, dict):
            raise CorruptData(f"{what}: a descriptor is not an object")
        digest, size, mt = d.get("digest"), d.get("size"), d.get("mediaType")
        if not isinstance(digest, str) or not isinstance(size, int) or size < 0:
            raise CorruptData(f"{what}: a descriptor lacks a digest or size")
        if parse_digest(digest)[0] != "sha256":
            raise CorruptData(f"{what}: blob {digest} is not named by sha256")
        blobs[digest] = size
        if mt == INDEX_TYPE:
            lid = (d.get("annotations") or {}).get(LAYER_ANNOTATION)
            try:
                layer_id = bytes.fromhex(lid) if isinstance(lid, str) else b""
            except ValueError:
                layer_id = b""
            if len(layer_id) != 32:
                raise CorruptData(f"{what}: index blob {digest} names no layer")
            if size > MAX_INDEX:
                raise CorruptData(f"{what}: index blob {digest} is too large")
            layers.append(ArtifactLayer(layer_id, digest, size))
        elif mt != PACK_TYPE:
            raise CorruptData(f"{what}: blob {digest} has media type {mt!r}")
    if not layers:
        raise CorruptData(f"{what} holds no layer")
    return Artifact(image_digest, layers, blobs)
