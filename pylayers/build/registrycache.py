"""A build cache shared through a registry (`build --cache-to REF`, `--cache-from REF`;
docs/format.md, "Build cache artifacts").

The cache is one OCI artifact under a tag: its config blob lists *records* (a step's
cache key -> the layer it made, with what the key was made of, for `--explain`), and
its layers are the records' layers as chunk blobs, exactly as the chunk artifact
carries them (`oci/chunkpush.py`, `oci/chunkpull.py`): per layer an index blob
(annotated with the layer's id and its parent's) and pack blobs. Every layer's
ancestors are listed too, so any record's layer can be pulled from the artifact alone.
The files a COPY or ADD key read are in an *inputs blob* per record, read only by
`--explain` (`candidates`), so that a miss on a fresh machine names what changed.

Import (`--cache-from`, repeatable): the artifact's records are read before the build
(a ref the registry lacks is a warning, nothing more). A step whose key the store's
cache lacks is looked up in the records; a record whose layer's parent is the layer
the step would run on (and whose instruction is the key's) is a hit, and the step is
CACHED without running. The
layer is pulled (only the chunks the store lacks) when the build needs it: a step that
misses runs on it, a `COPY --from` reads it, a WORKDIR looks into it, or it is the
result. A layer that cannot be pulled (its blobs missing or damaged) is dropped with a
warning, with every record built on it, and the build starts again from the store it
left (the steps it did run are cached locally by then): such a record is a miss, never
a hit on other bytes, as every chunk pulled is checked against its id and every layer
manifest against the layer id.

Export (`--cache-to`): the artifact under the tag is read, this build's records are
merged in (a key keeps one layer: this build's), and when that adds nothing the export
ends there: two requests, no blob checked or sent, whatever the layer count. Otherwise
the layers the artifact lacks are pushed (blobs the artifact lists are known to be there
and never asked about; the others are asked about (HEAD) and sent when missing), then
the inputs blobs it lacks, the records blob and the manifest. Concurrent exporters to
one tag: before the PUT the tag is checked again (HEAD) and, if another exporter moved
it, the merge is redone on its manifest; after the PUT it is checked once more and, if
it moved, the export runs again (whatever is already in the tag is a no-op to merge).
Two exporters can still lose one's records only if both PUTs and the second's check fall
between the other's last check and its PUT: the distribution API has no conditional PUT.

Untrusted input: the manifest and the records blob are decoded strictly (one-line
`CorruptData`, exit 8, for anything malformed); blobs are read through their digest;
layers through the chunk pull's checks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import CorruptData, InvalidArgument, NotFound, PylayersError, UsageError
from ..layers.repo import Layers
from ..oci import config as image_config
from ..oci.auth import AuthError, Credentials
from ..oci.chunkartifact import (
    INDEX_TYPE,
    LAYER_ANNOTATION,
    MANIFEST_TYPE,
    PACK_TYPE,
    Artifact,
    ArtifactLayer,
    descriptor,
    sha256_digest,
)
from ..oci.chunkpull import pull_layers
from ..oci.chunkpush import LayerPusher
from ..oci.chunkregistry import RegistryRemote
from ..oci.reference import Reference, parse_reference
from ..oci.registry import RegistryClient, RegistryError
from ..oci.streams import Verifying, parse_digest
from .cachekeys import BuildCache, CacheKey

if TYPE_CHECKING:
    import os

    from .builder import Builder, BuildResult

FORMAT = 1  # the build cache artifact's version (docs/format.md)
ARTIFACT_TYPE = "application/vnd.pylayers.buildcache.v1"
RECORDS_TYPE = "application/vnd.pylayers.buildcache.records.v1+json"
INPUTS_TYPE = "application/vnd.pylayers.buildcache.inputs.v1+json"
VERSION_ANNOTATION = "dev.pylayers.buildcache.version"
PARENT_ANNOTATION = "dev.pylayers.parent"
MAX_MANIFEST = 4 << 20  # what registries take (distribution's limit)
MAX_RECORDS_BLOB = 64 << 20
MAX_INPUTS_BLOB = 64 << 20
MAX_RECORDS = 5_000  # an export keeps the newest records up to this many
MAX_LAYERS = 4_000  # ... and the layers they need up to this many
MAX_RETRIES = 5  # exports re-run after another exporter moved the tag
_PARENT_KINDS = ("none", "key", "layer")

Credentials_ = Credentials | Callable[[str], Credentials | None] | None


class CacheLayerUnavailable(PylayersError):
    """A layer the build took from a registry cache could not be pulled."""

    def __init__(self, message: str, layer: bytes) -> None:
        super().__init__(message)
        self.layer = layer


@dataclass
class CacheLayer:
    layer_id: bytes
    parent: bytes | None
    index: dict  # the index blob's descriptor
    packs: list[dict]  # the pack blobs' descriptors


@dataclass
class CacheRecord:
    key: bytes
    layer: bytes
    parent: dict  # {"kind": none|key|layer, "id": hex or None}: the key's parent
    instruction: str
    options: dict
    created: int
    inputs: dict | None = None  # the inputs blob's descriptor (COPY and ADD)

    def to_json(self) -> dict:
        return {"key": self.key.hex(), "layer": self.layer.hex(), "parent": self.parent,
                "instruction": self.instruction, "options": self.options,
                "created": self.created, "inputs": self.inputs}

    def parent_ref(self) -> bytes:
        """The key's parent as the store's cachekeys index has it: kind byte, id."""
        kind = _PARENT_KINDS.index(self.parent["kind"])
        pid = self.parent["id"]
        return bytes([kind]) + (bytes.fromhex(pid) if pid is not None else bytes(32))


@dataclass
class CacheArtifact:
    layers: dict[bytes, CacheLayer] = field(default_factory=dict)
    records: dict[bytes, CacheRecord] = field(default_factory=dict)
    inputs: dict[str, int] = field(default_factory=dict)  # inputs blobs: digest -> size
    digest: str | None = None  # of its manifest, as read

    def blobs(self) -> dict[str, int]:
        out: dict[str, int] = dict(self.inputs)
        for la in self.layers.values():
            for d in (la.index, *la.packs):
                out[d["digest"]] = d["size"]
        return out

    def chain(self, layer: bytes) -> list[bytes]:
        """`layer` and its ancestors, oldest first (the artifact lists them all)."""
        out = [layer]
        while (parent := self.layers[out[-1]].parent) is not None:
            out.append(parent)
        return out[::-1]


# -- encoding and decoding -------------------------------------------------------------
def _hex32(value, what: str) -> bytes:
    if isinstance(value, str) and len(value) == 64:
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raw = b""
        if len(raw) == 32 and raw.hex() == value:
            return raw
    raise CorruptData(f"{what}: {str(value)[:80]!r} is not 64 lowercase hex digits")


def _descriptor(d, what: str, types: Iterable[str]) -> dict:
    if not isinstance(d, dict):
        raise CorruptData(f"{what}: a descriptor is not an object")
    digest, size, mt = d.get("digest"), d.get("size"), d.get("mediaType")
    if not isinstance(digest, str) or not isinstance(size, int) or isinstance(size, bool) \
            or size < 0:
        raise CorruptData(f"{what}: a descriptor lacks a digest or size")
    if parse_digest(digest)[0] != "sha256":
        raise CorruptData(f"{what}: blob {digest} is not named by sha256")
    if mt not in types:
        raise CorruptData(f"{what}: blob {digest} has media type {str(mt)[:80]!r}")
    return d


def decode_manifest(data: bytes, what: str) -> tuple[CacheArtifact, dict]:
    """The layers a cache manifest lists, and its records blob's descriptor."""
    if len(data) > MAX_MANIFEST:
        raise CorruptData(f"{what} is too large ({len(data)} bytes)")
    doc = image_config.parse(data, what)
    if doc.get("artifactType") != ARTIFACT_TYPE:
        cfg = doc.get("config")
        got = doc.get("artifactType") or (cfg.get("mediaType") if isinstance(cfg, dict)
                                          else None)
        raise CorruptData(f"{what} is not a pylayers build cache (artifactType "
                          f"{str(got)[:80]!r}); choose another tag")
    ann = doc.get("annotations")
    version = ann.get(VERSION_ANNOTATION) if isinstance(ann, dict) else None
    if version != str(FORMAT):
        raise CorruptData(f"{what} has version {str(version)[:20]}; this pylayers reads "
                          f"version {FORMAT}")
    if doc.get("schemaVersion") != 2 or not isinstance(doc.get("layers"), list):
        raise CorruptData(f"{what} is not an OCI image manifest")
    config = _descriptor(doc.get("config"), what, (RECORDS_TYPE,))
    if config["size"] > MAX_RECORDS_BLOB:
        raise CorruptData(f"{what}: its records blob is too large ({config['size']} bytes)")
    art = CacheArtifact()
    current: CacheLayer | None = None
    for d in doc["layers"]:
        _descriptor(d, what, (INDEX_TYPE, PACK_TYPE, INPUTS_TYPE))
        if d["mediaType"] == INPUTS_TYPE:
            if d["size"] > MAX_INPUTS_BLOB:
                raise CorruptData(f"{what}: inputs blob {d['digest']} is too large")
            art.inputs[d["digest"]] = d["size"]
            continue
        if d["mediaType"] == PACK_TYPE:
            if current is None:
                raise CorruptData(f"{what}: pack blob {d['digest']} before any layer index")
            current.packs.append(descriptor(PACK_TYPE, d["digest"], d["size"]))
            continue
        ann = d.get("annotations")
        if not isinstance(ann, dict):
            raise CorruptData(f"{what}: index blob {d['digest']} names no layer")
        lid = _hex32(ann.get(LAYER_ANNOTATION), f"{what}: index blob {d['digest']}")
        parent = ann.get(PARENT_ANNOTATION)
        pid = _hex32(parent, f"{what}: index blob {d['digest']}") \
            if parent is not None else None
        if lid in art.layers:
            raise CorruptData(f"{what}: layer {lid.hex()[:12]} is listed twice")
        current = CacheLayer(lid, pid, descriptor(INDEX_TYPE, d["digest"], d["size"]), [])
        art.layers[lid] = current
        if len(art.layers) > MAX_LAYERS:
            raise CorruptData(f"{what} lists more than {MAX_LAYERS} layers")
    for la in art.layers.values():  # every ancestor listed, no cycle
        seen = {la.layer_id}
        p = la.parent
        while p is not None:
            if p not in art.layers:
                raise CorruptData(f"{what}: the parent {p.hex()[:12]} of layer "
                                  f"{la.layer_id.hex()[:12]} is not listed")
            if p in seen:
                raise CorruptData(f"{what}: layer {la.layer_id.hex()[:12]}'s parents form "
                                  "a cycle")
            seen.add(p)
            p = art.layers[p].parent
    return art, config


def decode_records(data: bytes, art: CacheArtifact, what: str) -> dict[bytes, CacheRecord]:
    doc = image_config.parse(data, what)
    if doc.get("version") != FORMAT or not isinstance(doc.get("records"), list):
        raise CorruptData(f"{what} is not a version {FORMAT} list of build cache records")
    out: dict[bytes, CacheRecord] = {}
    for r in doc["records"]:
        if not isinstance(r, dict):
            raise CorruptData(f"{what}: a record is not an object")
        key = _hex32(r.get("key"), f"{what}: a record's key")
        layer = _hex32(r.get("layer"), f"{what}: record {key.hex()[:12]}'s layer")
        if layer not in art.layers:
            raise CorruptData(f"{what}: record {key.hex()[:12]} names layer "
                              f"{layer.hex()[:12]}, which the cache does not list")
        parent = r.get("parent")
        if not isinstance(parent, dict) or parent.get("kind") not in _PARENT_KINDS or \
                set(parent) != {"kind", "id"}:
            raise CorruptData(f"{what}: record {key.hex()[:12]} has a malformed parent")
        if parent["kind"] == "none":
            if parent["id"] is not None:
                raise CorruptData(f"{what}: record {key.hex()[:12]} has a malformed parent")
        else:
            _hex32(parent["id"], f"{what}: record {key.hex()[:12]}'s parent")
        instruction, options, created = r.get("instruction"), r.get("options"), r.get("created")
        if not isinstance(instruction, str) or not isinstance(options, dict) or \
                not isinstance(created, int) or isinstance(created, bool):
            raise CorruptData(f"{what}: record {key.hex()[:12]} is malformed")
        inputs = r.get("inputs")
        if inputs is not None:
            if not isinstance(inputs, dict) or set(inputs) != {"digest", "size"} or \
                    art.inputs.get(inputs["digest"]) != inputs["size"]:
                raise CorruptData(f"{what}: record {key.hex()[:12]} names an inputs blob "
                                  "the cache does not list")
        if key in out:
            raise CorruptData(f"{what}: key {key.hex()[:12]} is listed twice")
        out[key] = CacheRecord(key, layer, {"kind": parent["kind"], "id": parent["id"]},
                               instruction, options, created, inputs)
    return out


def encode_inputs(inputs: list) -> bytes:
    """The inputs blob: a key record's `inputs` (per input its name and, per file, what
    --explain compares)."""
    return json.dumps({"version": FORMAT, "inputs": inputs}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True).encode()


def _opt(v, kind) -> bool:
    return v is None or isinstance(v, kind)


def decode_inputs(data: bytes, what: str) -> list:
    """An inputs blob, refusing anything `differences` could not compare."""
    doc = image_config.parse(data, what)
    inputs = doc.get("inputs")
    if doc.get("version") != FORMAT or not isinstance(inputs, list):
        raise CorruptData(f"{what} is not a version {FORMAT} inputs list")
    for inp in inputs:
        if not isinstance(inp, dict) or not isinstance(inp.get("name"), str) or \
                not isinstance(inp.get("files"), dict):
            raise CorruptData(f"{what}: an input is malformed")
        for path, f in inp["files"].items():
            if not (isinstance(f, list) and len(f) == 9 and isinstance(f[0], str)
                    and all(isinstance(x, int) for x in f[1:5]) and _opt(f[5], str)
                    and _opt(f[6], str) and (f[7] is None or (
                        isinstance(f[7], list) and len(f[7]) == 2
                        and all(isinstance(x, int) for x in f[7])))
                    and isinstance(f[8], dict)
                    and all(isinstance(v, str) for v in f[8].values())):
                raise CorruptData(f"{what}: the record of {path[:80]!r} is malformed")
    return inputs


def encode_records(records: Iterable[CacheRecord]) -> bytes:
    doc = {"version": FORMAT,
           "records": [r.to_json() for r in sorted(records, key=lambda r: r.key)]}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def encode_manifest(art: CacheArtifact, records_blob: bytes) -> bytes:
    """Canonical JSON; layers parents first, then by id."""
    blobs: list[dict] = []
    done: set[bytes] = set()

    def add(lid: bytes) -> None:
        for x in art.chain(lid):
            if x in done:
                continue
            done.add(x)
            la = art.layers[x]
            ann = {LAYER_ANNOTATION: x.hex()}
            if la.parent is not None:
                ann[PARENT_ANNOTATION] = la.parent.hex()
            blobs.append({**la.index, "annotations": ann})
            blobs.extend(la.packs)

    for lid in sorted(art.layers):
        add(lid)
    blobs += [descriptor(INPUTS_TYPE, d, n) for d, n in sorted(art.inputs.items())]
    doc = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "artifactType": ARTIFACT_TYPE,
           "config": descriptor(RECORDS_TYPE, sha256_digest(records_blob), len(records_blob)),
           "layers": blobs, "annotations": {VERSION_ANNOTATION: str(FORMAT)}}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


# -- the registry side -----------------------------------------------------------------
def _read(client: RegistryClient, ref: Reference) -> CacheArtifact | None:
    """The cache artifact under `ref`'s tag, or None when the registry has no such tag."""
    assert ref.tag is not None
    what = f"build cache {ref}"
    try:
        _mt, data, digest = client.get_manifest(ref.tag, accept=[MANIFEST_TYPE])
    except NotFound:
        return None
    art, config = decode_manifest(data, what)
    size = config["size"]
    with client.open_blob(config["digest"]) as stream:
        v = Verifying(stream, config["digest"], size, f"{what}: its records blob")
        blob = v.read(size + 1)
        v.check()
    art.records = decode_records(blob, art, f"{what}: its records blob")
    art.digest = digest
    return art


@dataclass
class ExportResult:
    reference: str
    digest: str | None  # the manifest under the tag after the export
    records: int = 0  # records in the cache
    records_added: int = 0  # by this build
    layers_pushed: int = 0
    blobs_sent: int = 0
    attempts: int = 0  # 1, more when another exporter moved the tag
    counters: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"reference": self.reference, "digest": self.digest, "records": self.records,
                "records_added": self.records_added, "layers_pushed": self.layers_pushed,
                "blobs_sent": self.blobs_sent, "attempts": self.attempts, **self.counters}


class RegistryCache:
    """The registry caches of one build: `cache_from` refs to read records from,
    `cache_to` the ref to export them to. `build(builder, context, **kw)` runs
    `builder.build(context, **kw)` with them."""

    def __init__(self, layers: Layers, cache_from: Iterable[str | Reference] = (),
                 cache_to: str | Reference | None = None, *, insecure: bool = False,
                 credentials: Credentials_ = None, ca_file: str | None = None) -> None:
        self.layers = layers
        self.sources = [self._ref(r) for r in cache_from]
        self.target = self._ref(cache_to) if cache_to is not None else None
        self.insecure = insecure
        self.credentials = credentials
        self.ca_file = ca_file
        self.loaded: list[tuple[Reference, CacheArtifact]] = []
        self.clients: dict[tuple[str, str, bool], RegistryClient] = {}
        self.bad: set[bytes] = set()  # layers that could not be pulled
        self.hits: dict[bytes, bytes] = {}  # key -> layer, taken from a registry cache
        self.warnings: list[str] = []
        self.pulled = 0  # layers pulled
        self._inputs: dict[str, list] = {}  # inputs blobs read, by digest
        self.bytes_received = 0
        self.export_result: ExportResult | None = None

    @staticmethod
    def _ref(r: str | Reference) -> Reference:
        ref = parse_reference(r) if isinstance(r, str) else r
        if ref.digest is not None or ref.tag is None:
            raise UsageError(f"{ref}: a build cache is named by a tag, not a digest")
        return ref

    def _client(self, ref: Reference, push: bool = False) -> RegistryClient:
        k = (ref.registry, ref.repository, push)
        c = self.clients.get(k)
        if c is None:
            creds = self.credentials(ref.host) if callable(self.credentials) \
                else self.credentials
            c = self.clients[k] = RegistryClient(ref, insecure=self.insecure,
                                                 credentials=creds, ca_file=self.ca_file,
                                                 push=push)
        return c

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        self.clients.clear()

    # -- import ----------------------------------------------------------------------
    def load(self) -> None:
        """Read the records of every `cache_from` ref."""
        self.loaded = []
        for ref in self.sources:
            art = _read(self._client(ref), ref)
            if art is None:
                self.warnings.append(f"build cache {ref} not found: nothing imported from it")
                continue
            self.loaded.append((ref, art))

    def lookup(self, key: CacheKey, parent_layer: bytes | None) -> bytes | None:
        """The layer a registry cache holds for `key`, if it was made on `parent_layer`
        by the same instruction (anything else is a miss)."""
        for _ref, art in self.loaded:
            rec = art.records.get(key.digest)
            if rec is None or rec.layer in self.bad or \
                    art.layers[rec.layer].parent != parent_layer:
                continue
            if key.record is not None and (
                    key.record.get("instruction") != rec.instruction
                    or key.record.get("parent") != rec.parent):
                continue
            if any(x in self.bad for x in art.chain(rec.layer)):
                continue
            self.hits[key.digest] = rec.layer
            return rec.layer
        return None

    def candidates(self, prefix: bytes) -> list[tuple[bytes, dict]]:
        """For --explain: the records whose key's parent reference starts with `prefix`,
        as (key, record) in the form BuildCache.explain_miss compares (with their
        inputs, read from the registry)."""
        out = []
        for ref, art in self.loaded:
            for rec in art.records.values():
                if not rec.parent_ref().startswith(prefix):
                    continue
                inputs = self._read_inputs(ref, rec.inputs) if rec.inputs else []
                out.append((rec.key, {"parent": rec.parent, "instruction": rec.instruction,
                                      "options": rec.options, "inputs": inputs,
                                      "created": rec.created}))
        return out

    def _read_inputs(self, ref: Reference, desc: dict) -> list:
        digest, size = desc["digest"], desc["size"]
        if digest not in self._inputs:
            what = f"build cache {ref}: inputs blob {digest}"
            with self._client(ref).open_blob(digest) as stream:
                v = Verifying(stream, digest, size, what)
                data = v.read(size + 1)
                v.check()
            self._inputs[digest] = decode_inputs(data, what)
        return self._inputs[digest]

    def need(self, layer: bytes | None) -> None:
        """Make sure the store has `layer`, pulling it from the cache that listed it."""
        if layer is None or self.layers.exists(layer):
            return
        for ref, art in self.loaded:
            if layer in art.layers:
                self._pull(ref, art, layer)
                return
        raise NotFound(f"layer {layer.hex()} is in no build cache read")

    def _pull(self, ref: Reference, art: CacheArtifact, layer: bytes) -> None:
        chain = art.chain(layer)
        artifact = Artifact("", [ArtifactLayer(x, art.layers[x].index["digest"],
                                               art.layers[x].index["size"]) for x in chain],
                            art.blobs())
        client = self._client(ref)
        before = client.bytes_received
        try:
            res = pull_layers(self.layers, RegistryRemote(client), artifact,
                              message=f"build cache {ref}")
        except (NotFound, CorruptData, RegistryError, AuthError) as e:
            raise CacheLayerUnavailable(f"build cache {ref}: layer {layer.hex()[:12]} "
                                        f"cannot be pulled: {e}", layer) from None
        finally:
            self.bytes_received += client.bytes_received - before
        self.pulled += res.layers_fetched

    def drop(self, layer: bytes) -> None:
        self.bad.add(layer)

    def remember(self, entries: Iterable[tuple[CacheKey, bytes]]) -> None:
        """Record in the store's cache the registry hits whose layer was pulled, so the
        next build hits them without the registry."""
        cache = BuildCache(self.layers.store)
        for key, layer in entries:
            if self.hits.get(key.digest) == layer and key.record is not None and \
                    self.layers.exists(layer) and cache.get(key) is None:
                cache.put(key, layer)

    # -- a build ---------------------------------------------------------------------
    def build(self, builder: Builder, context: str | os.PathLike[str], *args,
              **kw) -> BuildResult:
        """`builder.build(context, *args, **kw)` with these caches: records read first, a
        layer that cannot be pulled dropped and the build run again, the result's
        records exported last. Returns the BuildResult (warnings added)."""
        self.load()
        builder.remote = self
        try:
            while True:
                try:
                    res = builder.build(context, *args, **kw)
                    break
                except CacheLayerUnavailable as e:
                    if e.layer in self.bad:
                        raise
                    self.drop(e.layer)
                    self.warnings.append(f"{e}; the steps it cached run again")
        finally:
            builder.remote = None
        self.remember(builder.entries)
        if self.target is not None:
            self.export(builder.entries)
        res.warnings = self.warnings + res.warnings
        return res

    # -- export ----------------------------------------------------------------------
    def export(self, entries: Iterable[tuple[CacheKey, bytes]]) -> ExportResult:
        """Merge the records of `entries` ((key, layer) of each step) into the
        `cache_to` artifact."""
        ref = self.target
        if ref is None:
            raise InvalidArgument("no --cache-to to export to")
        now = int(time.time())
        mine: dict[bytes, CacheRecord] = {}
        inputs: dict[str, bytes] = {}  # inputs blobs of this build's records
        for key, layer in entries:
            rec = key.record
            if rec is None:
                continue
            desc = None
            if rec.get("inputs"):
                blob = encode_inputs(rec["inputs"])
                desc = {"digest": sha256_digest(blob), "size": len(blob)}
                inputs[desc["digest"]] = blob
            mine[key.digest] = CacheRecord(key.digest, layer, dict(rec["parent"]),
                                           rec["instruction"], dict(rec["options"]), now,
                                           desc)
        client = self._client(ref, push=True)
        res = ExportResult(str(ref), None)
        for attempt in range(1, MAX_RETRIES + 1):
            res.attempts = attempt
            have = _read(client, ref) or CacheArtifact()
            new = {k: r for k, r in mine.items()
                   if k not in have.records or have.records[k].layer != r.layer}
            res.records = len(have.records) + sum(1 for k in new if k not in have.records)
            if not new:  # everything is there: nothing to check, nothing to send
                res.digest = have.digest
                break
            res.records_added = len(new)
            digest = self._push(client, ref, have, new, set(mine), inputs, res)
            if digest is None:
                continue  # another exporter moved the tag before our PUT: merge again
            if client.head_manifest(ref.tag or "") == digest:
                res.digest = digest
                break
        else:
            raise RegistryError(f"build cache {ref}: the tag kept changing under "
                                f"{MAX_RETRIES} exports; try again")
        res.counters = client.counters()
        self.export_result = res
        return res

    def _push(self, client: RegistryClient, ref: Reference, have: CacheArtifact,
              new: Mapping[bytes, CacheRecord], mine: set[bytes],
              inputs: Mapping[str, bytes], res: ExportResult) -> str | None:
        records = dict(have.records)
        records.update(new)

        def priority(r: CacheRecord) -> tuple:  # this build's records, then the newest
            return (r.key not in mine, -r.created, r.key)

        if len(records) > MAX_RECORDS:
            keep = sorted(records.values(), key=priority)
            records = {r.key: r for r in keep[:MAX_RECORDS]}
        out = CacheArtifact(records=records)
        need: list[bytes] = []
        for r in sorted(records.values(), key=priority):
            chain = have.chain(r.layer) if r.layer in have.layers else self._chain(r.layer)
            fresh = [x for x in chain if x not in out.layers and x not in need]
            if len(out.layers) + len(need) + len(fresh) > MAX_LAYERS:
                del records[r.key]
                continue
            for x in chain:
                if x in have.layers:
                    out.layers[x] = have.layers[x]
                elif x not in need:
                    need.append(x)
        known = set(have.blobs())
        with LayerPusher(self.layers, RegistryRemote(client), known=known) as pusher:
            for x in need:
                index, packs = pusher.push(x)
                out.layers[x] = CacheLayer(x, self.layers.record(x).parent, index, packs)
                res.layers_pushed += 1
            res.blobs_sent += pusher.blobs_sent
        for r in records.values():
            if r.inputs is None:
                continue
            digest = r.inputs["digest"]
            out.inputs[digest] = r.inputs["size"]
            if digest not in have.inputs and not client.has_blob(digest):
                client.push_blob(digest, inputs[digest])
                res.blobs_sent += 1
        blob = encode_records(records.values())
        bdigest = sha256_digest(blob)
        if not client.has_blob(bdigest):
            client.push_blob(bdigest, blob)
            res.blobs_sent += 1
        manifest = encode_manifest(out, blob)
        if len(manifest) > MAX_MANIFEST:
            raise InvalidArgument(f"build cache {ref}: its manifest would be "
                                  f"{len(manifest)} bytes, over the registries' limit")
        if client.head_manifest(ref.tag or "") != have.digest:
            return None
        return client.put_manifest(ref.tag or "", MANIFEST_TYPE, manifest)

    def _chain(self, layer: bytes) -> list[bytes]:
        """`layer` and its ancestors, oldest first, pulled first if the store lacks it
        (a layer a --cache-from hit gave, never needed by the build)."""
        if not self.layers.exists(layer):
            self.need(layer)
        return list(reversed(self.layers.chain(layer)))


__all__ = ["ARTIFACT_TYPE", "INPUTS_TYPE", "CacheArtifact", "CacheLayerUnavailable", "CacheRecord",
           "ExportResult", "RECORDS_TYPE", "RegistryCache", "decode_manifest",
           "decode_inputs", "decode_records", "encode_inputs", "encode_manifest",
           "encode_records"]
