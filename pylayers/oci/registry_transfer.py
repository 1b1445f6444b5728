"""`push` and `pull`: an image between the store and a registry, layer by layer.

Push exports the image with the exporter (the same bytes as `export oci:`, so a push
is reproducible) into a work directory inside the store, then sends what the
repository lacks: each blob is checked (HEAD) and skipped when there; else mounted
from another repository of the same registry where this store saw it
(STORE/registry/blobs.json, hints only); else uploaded (one PUT, or chunks). The
manifest goes last, and not at all when the tag already names it. A re-push, or a push
of the same image to another repository of the registry, sends no blob data.

Pull reads the manifest (an index: this machine's platform, or `platform`), checks it
and the config against their digests, and imports the layers as they arrive
(`registry_downloads.py`): each blob streams through its digest and size check and the
importer's diffID check into the store's writer, and the layers are committed only
when every one has passed, so a damaged or wrong blob leaves no layer and no tag.
Layers the store has already (an earlier pull or import recorded the same chain of
diffIDs with its config) are not fetched at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform as _platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CorruptData, InvalidArgument, UsageError
from ..layers.repo import Layers, check_tag
from ..store import Store
from . import config as image_config
from .auth import Credentials
from .chunkpull import pull_chunk_artifact
from .chunkpush import push_chunk_artifact
from .chunkregistry import RegistryRemote
from .config import GOARCH, MAX_JSON
from .exporter import export_image, image_documents
from .importer import DEFAULT_MAX_LAYER_SIZE, LAYER_SUFFIXES, _Importer
from .layout import (
    CONFIG,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    INDEX,
    LAYER_TYPES,
    MANIFEST,
    Descriptor,
)
from .reference import Reference, parse_reference
from .registry import DEFAULT_CHUNK, RegistryClient
from .registry_downloads import DownloadArea, Downloads
from .streams import COMPRESSIONS, Verifying, parse_digest

Progress = Callable[[str, int, int], None]  # (stage, done, total)
_HINTS_PER_REGISTRY = 100_000
CONFIG_TYPES = (CONFIG, "application/vnd.docker.container.image.v1+json")
_REPOS_PER_BLOB = 8


@dataclass
class PushResult:
    reference: str
    manifest_digest: str
    config_digest: str
    layers: list[str] = field(default_factory=list)  # blob digests, oldest first
    uploaded: int = 0  # blobs sent
    mounted: int = 0  # blobs mounted from another repository
    present: int = 0  # blobs the repository had
    manifest_pushed: bool = False
    exported: bool = False  # the layers were exported (else known from an earlier push)
    counters: dict = field(default_factory=dict)
    chunks: dict | None = None  # the chunk artifact pushed (chunkpush.ChunkPushResult)

    def to_json(self) -> dict:
        return {"reference": self.reference, "digest": self.manifest_digest,
                "config": self.config_digest, "layers": self.layers,
                "blobs_uploaded": self.uploaded, "blobs_mounted": self.mounted,
                "blobs_present": self.present, "manifest_pushed": self.manifest_pushed,
                "exported": self.exported, "chunk_artifact": self.chunks, **self.counters}


@dataclass
class PullResult:
    reference: str
    manifest_digest: str
    config_digest: str
    top: bytes
    layers: list[bytes] = field(default_factory=list)  # layer ids, oldest first
    fetched: int = 0  # layer blobs imported (from the network or the download area)
    reused: int = 0  # layers the store had
    resumed: int = 0  # blobs continued from an earlier, interrupted pull
    counters: dict = field(default_factory=dict)
    chunks: dict | None = None  # pulled through the chunk artifact: its figures

    def to_json(self) -> dict:
        return {"reference": self.reference, "digest": self.manifest_digest,
                "config": self.config_digest, "id": self.top.hex(),
                "layers": [lid.hex() for lid in self.layers],
                "layers_fetched": self.fetched, "layers_reused": self.reused,
                "blobs_resumed": self.resumed, "chunk_transfer": self.chunks,
                **self.counters}


# -- where blobs were seen: hints for cross-repository mounts ------------------------------
class BlobHints:
    """STORE/registry/blobs.json: {registry: {digest: [repositories]}}, the repositories
    this store pushed a blob to or pulled it from. Only hints: a mount the registry
    refuses is an upload."""

    def __init__(self, store_path: Path) -> None:
        self.path = store_path / "registry" / "blobs.json"

    def _load(self) -> dict:
        try:
            doc = json.loads(self.path.read_bytes()[:64 << 20])
            return doc if isinstance(doc, dict) else {}
        except (OSError, ValueError, UnicodeDecodeError):
            return {}

    def repositories(self, registry: str, digest: str) -> list[str]:
        repos = self._load().get(registry, {}).get(digest, [])
        return [r for r in repos if isinstance(r, str)] if isinstance(repos, list) else []

    def add(self, registry: str, repository: str, digests: list[str]) -> None:
        doc = self._load()
        reg = doc.setdefault(registry, {})
        if not isinstance(reg, dict):
            reg = doc[registry] = {}
        for d in digests:
            repos = [r for r in reg.pop(d, []) if r != repository]
            reg[d] = ([repository] + repos)[:_REPOS_PER_BLOB]  # most recent first
        while len(reg) > _HINTS_PER_REGISTRY:
            del reg[next(iter(reg))]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc, separators=(",", ":")))
        os.replace(tmp, self.path)


def _stage(progress: Progress | None, stage: str) -> Callable[[int], None] | None:
    """A byte-count callback reporting to `progress` as `stage`."""
    if progress is None:
        return None
    done = 0

    def report(n: int) -> None:
        nonlocal done
        done += n
        progress(stage, done, 0)

    return report


def _client(ref: Reference, insecure: bool, credentials: Credentials | None,
            ca_file: str | None, push: bool) -> RegistryClient:
    return RegistryClient(ref, insecure=insecure, credentials=credentials, ca_file=ca_file,
                          push=push)


# -- push ----------------------------------------------------------------------------------
class ExportCache:
    """STORE/registry/exports.json: for a layer id, a compression and a
    source-date-epoch, the blob export made of it (digest, size, diffID). The export
    is reproducible, so a push whose blobs the registry has (or can mount) needs no
    export at all: the config and manifest are built from these. Only a cache: a blob
    the registry lacks is exported again."""

    VERSION = 1

    def __init__(self, store_path: Path) -> None:
        self.path = store_path / "registry" / "exports.json"

    def _load(self) -> dict:
        try:
            doc = json.loads(self.path.read_bytes()[:64 << 20])
        except (OSError, ValueError, UnicodeDecodeError):
            return {}
        if not isinstance(doc, dict) or doc.get("version") != self.VERSION or \
                not isinstance(doc.get("layers"), dict):
            return {}
        return doc["layers"]

    @staticmethod
    def _key(lid: bytes, compression: str, sde: int | None) -> str:
        return f"{lid.hex()}:{compression}:{'' if sde is None else sde}"

    def get(self, chain: list[bytes], compression: str, sde: int | None
            ) -> list[tuple[str, int, str]] | None:
        """(blob digest, size, diffID) of each layer of `chain` (oldest first), or None
        unless all are known."""
        known = self._load()
        out = []
        for lid in chain:
            e = known.get(self._key(lid, compression, sde))
            if not (isinstance(e, list) and len(e) == 3 and isinstance(e[0], str)
                    and isinstance(e[1], int) and isinstance(e[2], str)):
                return None
            try:
                parse_digest(e[0])
                parse_digest(e[2])
            except CorruptData:
                return None
            out.append((e[0], e[1], e[2]))
        return out

    def put(self, chain: list[bytes], compression: str, sde: int | None,
            blobs: list[tuple[str, int, str]]) -> None:
        known = self._load()
        for lid, b in zip(chain, blobs, strict=True):
            known.pop(self._key(lid, compression, sde), None)
            known[self._key(lid, compression, sde)] = list(b)
        while len(known) > _HINTS_PER_REGISTRY:
            del known[next(iter(known))]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": self.VERSION, "layers": known},
                                  separators=(",", ":")))
        os.replace(tmp, self.path)


def push_image(layers: Layers, layer_id: bytes, dest: str | Reference, *,
               insecure: bool = False, credentials: Credentials | None = None,
               ca_file: str | None = None, compression: str = "gzip",
               source_date_epoch: int | None = None, chunk_size: int = DEFAULT_CHUNK,
               progress: Progress | None = None, chunks: bool = False,
               config: bytes | None = None) -> PushResult:
    """Push the image of `layer_id` (with `config`, default the config last stored with
    that layer: oci/config.for_ref gives a tag's) to `dest` (a tag). Blobs the repository has are
    not sent, those this store saw in another repository of the registry are mounted;
    when that places every layer blob, nothing is exported (`ExportCache`). `chunks`:
    also push the chunk artifact (chunkpush.py), after the image, so that pylayers
    clients pull only the chunks they lack."""
    ref = parse_reference(dest) if isinstance(dest, str) else dest
    if ref.digest is not None:
        raise UsageError(f"{ref}: push to a tag, not a digest")
    if compression not in COMPRESSIONS:
        raise InvalidArgument(f"unknown compression {compression!r}")
    assert ref.tag is not None
    store = layers.store
    chain = list(reversed(layers.chain(layer_id)))
    cache = ExportCache(store.path)
    with _client(ref, insecure, credentials, ca_file, push=True) as client:
        known = cache.get(chain, compression, source_date_epoch)
        if known is not None:
            descs = [Descriptor(LAYER_TYPES[compression], d, size, {}, {})
                     for d, size, _ in known]
            cfg, manifest = image_documents(store, layer_id, [x[2] for x in known], descs,
                                            source_date_epoch, config)
            res = PushResult(str(ref), sha256_of(manifest), sha256_of(cfg),
                             [d for d, _, _ in known])
            placed = _place(client, ref, store, res.layers, res)
            if placed:
                if not _place(client, ref, store, [res.config_digest], res):
                    client.push_blob(res.config_digest, cfg)  # a few KB we have
                    res.uploaded += 1
                return _finish(client, ref, layers, layer_id, res, manifest, chunks,
                               progress)
            mounted = res.mounted  # counted as present by the second pass
        else:
            mounted = 0
        res = _export_and_push(layers, layer_id, chain, client, ref, cache, compression,
                               source_date_epoch, chunk_size, progress, chunks, config)
        res.mounted += mounted
        res.present -= mounted
        return res


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _place(client: RegistryClient, ref: Reference, store: Store, digests: list[str],
           res: PushResult) -> bool:
    """Make sure the repository has each blob without sending data (present, or
    mounted from where this store saw it): False at the first one it cannot."""
    hints = BlobHints(store.path)
    for d in dict.fromkeys(digests):
        if client.has_blob(d):
            res.present += 1
            continue
        if any(repo != ref.repository and client.mount_blob(d, repo)
               for repo in hints.repositories(ref.registry, d)):
            res.mounted += 1
            continue
        return False
    return True


def _finish(client: RegistryClient, ref: Reference, layers: Layers, layer_id: bytes,
            res: PushResult, manifest: bytes, chunks: bool,
            progress: Progress | None) -> PushResult:
    assert ref.tag is not None
    store = layers.store
    if client.head_manifest(ref.tag) != res.manifest_digest:
        client.put_manifest(ref.tag, MANIFEST, manifest)
        res.manifest_pushed = True
    if chunks:
        image = Descriptor(MANIFEST, res.manifest_digest, len(manifest), {}, {})
        pushed = push_chunk_artifact(layers, layer_id, RegistryRemote(client),
                                     image.to_json(), progress=_stage(progress, "chunks"))
        res.chunks = pushed.to_json()
    res.counters = client.counters()
    BlobHints(store.path).add(ref.registry, ref.repository, [res.config_digest, *res.layers])
    return res


def _export_and_push(layers: Layers, layer_id: bytes, chain: list[bytes],
                     client: RegistryClient, ref: Reference, cache: ExportCache,
                     compression: str, sde: int | None, chunk_size: int,
                     progress: Progress | None, chunks: bool,
                     config: bytes | None) -> PushResult:
    store = layers.store
    area = store.path / "registry"
    area.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="push-", dir=area))
    try:
        if progress:
            progress("export", 0, 0)
        exported = export_image(layers, layer_id, f"oci:{work}", compression, sde,
                                config=config)
        blobs = work / "blobs" / "sha256"
        cache.put(chain, compression, sde,
                  [(d, (blobs / d[7:]).stat().st_size, diff)
                   for d, diff in zip(exported.layers, exported.diff_ids, strict=True)])
        manifest = (blobs / exported.manifest_digest[7:]).read_bytes()
        res = PushResult(str(ref), exported.manifest_digest, exported.config_digest,
                         list(exported.layers), exported=True)
        _push_blobs(client, ref, store, blobs, [exported.config_digest, *exported.layers],
                    res, chunk_size, progress)
        return _finish(client, ref, layers, layer_id, res, manifest, chunks, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _push_blobs(client: RegistryClient, ref: Reference, store: Store, blobs: Path,
                digests: list[str], res: PushResult, chunk_size: int,
                progress: Progress | None) -> None:
    hints = BlobHints(store.path)
    todo = []
    for d in dict.fromkeys(digests):  # an image may hold the same layer twice
        if client.has_blob(d):
            res.present += 1
            continue
        mounted = False
        for repo in hints.repositories(ref.registry, d):
            if repo != ref.repository and client.mount_blob(d, repo):
                mounted = True
                break
        if mounted:
            res.mounted += 1
        else:
            todo.append(d)
    total = sum((blobs / d[7:]).stat().st_size for d in todo)
    done = 0

    def report(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress("upload", done, total)

    for d in todo:
        path = blobs / d[7:]
        with open(path, "rb") as f:
            client.push_blob(d, f, os.fstat(f.fileno()).st_size, chunk_size=chunk_size,
                             progress=report)
        res.uploaded += 1


# -- pull ----------------------------------------------------------------------------------
def parse_platform(text: str | None) -> tuple[str, str, str | None]:
    """(os, architecture, variant) of `os/arch[/variant]`; this machine's by default."""
    if text is None:
        return "linux", GOARCH.get(_platform.machine(), _platform.machine()), None
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise UsageError(f"--platform {text!r}: say OS/ARCH[/VARIANT] (linux/amd64)")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def _pick(index: dict, want: tuple[str, str, str | None], what: str) -> Descriptor:
    items = index.get("manifests")
    if not isinstance(items, list):
        raise CorruptData(f"{what}: an index without a manifests list")
    descs = [Descriptor.parse(d, what) for d in items]
    os_, arch, variant = want
    found = [d for d in descs if d.platform.get("os") == os_
             and d.platform.get("architecture") == arch
             and (variant is None or d.platform.get("variant") == variant)]
    if not found:
        have = sorted({"/".join(str(d.platform.get(k)) for k in ("os", "architecture"))
                       for d in descs if d.platform})
        raise InvalidArgument(f"{what} has no image for {os_}/{arch}"
                              f"{'/' + variant if variant else ''} (it has "
                              f"{', '.join(have) or 'none'}; choose with --platform)")
    return found[0]


def _image_manifest(client: RegistryClient, ref: Reference,
                    want: tuple[str, str, str | None]) -> tuple[str, dict]:
    """(digest, document) of the image manifest `ref` names, through an index."""
    what = f"manifest {ref}"
    mt, data, digest = client.get_manifest(ref.ref)
    for _depth in range(3):
        doc = image_config.parse(data, what)
        if doc.get("schemaVersion") == 1 or "fsLayers" in doc:
            raise InvalidArgument(f"{what} is a docker schema 1 manifest, which pylayers "
                                  "does not read")
        if mt in (INDEX, DOCKER_LIST) or (isinstance(doc.get("manifests"), list)
                                          and "layers" not in doc):
            desc = _pick(doc, want, what)
            what = f"manifest {desc.digest} (from {ref})"
            mt, data, digest = client.get_manifest(desc.digest)
            if len(data) != desc.size:
                raise CorruptData(f"{what} has {len(data)} bytes, its index says {desc.size}")
            continue
        if mt not in (MANIFEST, DOCKER_MANIFEST, "") and "layers" not in doc:
            raise InvalidArgument(f"{what} has media type {mt!r}, not an image manifest")
        if doc.get("schemaVersion") != 2 or not isinstance(doc.get("layers"), list):
            raise CorruptData(f"{what} is not an image manifest")
        return digest, doc
    raise CorruptData(f"{what}: image indexes nest too deeply")


def _fetch_small(client: RegistryClient, desc: Descriptor, what: str) -> bytes:
    if desc.size > MAX_JSON:
        raise CorruptData(f"{what} {desc.digest} is too large ({desc.size} bytes)")
    with client.open_blob(desc.digest) as s:
        v = Verifying(s, desc.digest, desc.size, f"{what} {desc.digest}")
        data = v.read(desc.size + 1)
        v.check()
    return data


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The OCI ChainIDs of a list of diffIDs (image-spec config.md)."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else
                   "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def stored_configs(layers: Layers) -> list[tuple[bytes, bytes]]:
    """(top layer id, config) of every image config the store keeps."""
    return image_config.images(layers.store)


def known_chains(layers: Layers, configs: list[tuple[bytes, bytes]]) -> dict[str, bytes]:
    """ChainID -> layer id, for every layer of an image whose config the store keeps
    (import and pull keep the config beside the top layer; its diffIDs were checked
    against the layers' data then)."""
    out: dict[str, bytes] = {}
    for top, cfg in configs:
        if not layers.exists(top):
            continue
        try:
            ids = image_config.diff_ids(image_config.parse(cfg))
        except CorruptData:
            continue
        chain = list(reversed(layers.chain(top)))
        if len(chain) != len(ids):
            continue
        for cid, lid in zip(chain_ids(ids), chain, strict=True):
            out.setdefault(cid, lid)
    return out


def pull_image(layers: Layers, source: str | Reference, *, tag: str | None = None,
               platform: str | None = None, insecure: bool = False,
               credentials: Credentials | None = None, ca_file: str | None = None,
               max_layer_size: int = DEFAULT_MAX_LAYER_SIZE,
               progress: Progress | None = None, chunks: bool = True) -> PullResult:
    """`chunks`: pull through the image's chunk artifact when the registry has one
    (chunkpull.py: only the chunks the store lacks), else the layers."""
    if tag is not None:
        check_tag(tag)
    if max_layer_size <= 0:
        raise InvalidArgument("--max-layer-size must be positive")
    ref = parse_reference(source) if isinstance(source, str) else source
    want = parse_platform(platform)
    store = layers.store
    area = DownloadArea(store.path)
    area.prune_stale()
    with _client(ref, insecure, credentials, ca_file, push=False) as client:
        mdigest, manifest = _image_manifest(client, ref, want)
        cdesc = Descriptor.parse(manifest.get("config"), "manifest config")
        if cdesc.media_type not in CONFIG_TYPES:
            raise InvalidArgument(f"{ref}: its config has media type {cdesc.media_type!r}: "
                                  "an artifact, not a container image")
        configs = stored_configs(layers)
        config = image_config.by_digest(store, cdesc.digest)
        if config is None or len(config) != cdesc.size:
            config = _fetch_small(client, cdesc, "config")
        diff_ids = image_config.diff_ids(image_config.parse(config))
        descs = [Descriptor.parse(d, "manifest layers") for d in manifest["layers"]]
        if len(descs) != len(diff_ids):
            raise CorruptData(f"{ref}: the config lists {len(diff_ids)} diffIDs for "
                              f"{len(descs)} layers")
        for i, d in enumerate(descs):
            if not d.media_type.endswith(LAYER_SUFFIXES):
                raise InvalidArgument(f"layer {i + 1} ({d.digest}) has media type "
                                      f"{d.media_type!r}, not a tar layer pylayers can read")
        known = known_chains(layers, configs)
        chain = chain_ids(diff_ids)
        skip = 0
        for k in range(len(chain), 0, -1):
            if chain[k - 1] in known:
                skip = k
                break
        parent = known[chain[skip - 1]] if skip else None
        res = PullResult(str(ref), mdigest, cdesc.digest, b"", reused=skip)
        message = f"pull {ref}"
        if skip == len(descs):
            _tag_known(layers, parent, tag, config)
            res.top = parent
            res.layers = list(reversed(layers.chain(parent)))
        elif chunks and (pulled := pull_chunk_artifact(
                layers, RegistryRemote(client), mdigest, tag, config, message,
                _stage(progress, "chunks"))) is not None:
            if len(pulled.layers) != len(descs):
                raise CorruptData(f"{ref}: its chunk artifact has {len(pulled.layers)} "
                                  f"layers, the image {len(descs)}")
            res.top, res.layers = pulled.top, pulled.layers
            res.fetched, res.reused = pulled.layers_fetched, len(descs) - pulled.layers_fetched
            res.chunks = pulled.to_json()
        else:
            try:
                _import(layers, client, area, descs, diff_ids, skip, parent, tag, message,
                        config, max_layer_size, progress, res)
            except (CorruptData, InvalidArgument):
                # refused for what it holds: no later pull can use these bytes
                for d in descs:
                    area.remove(d.digest)
                raise
        res.counters = client.counters()
    for d in descs:
        area.remove(d.digest)
    BlobHints(store.path).add(ref.registry, ref.repository,
                              [cdesc.digest, *(d.digest for d in descs)])
    return res


def _tag_known(layers: Layers, top: bytes, tag: str | None, config: bytes) -> None:
    with layers.store.write() as t:
        image_config.save_in(t, top, config, (tag,) if tag is not None else ())


def _import(layers: Layers, client: RegistryClient, area: DownloadArea,
            descs: list[Descriptor], diff_ids: list[str], skip: int, parent: bytes | None,
            tag: str | None, message: str, config: bytes, max_layer_size: int,
            progress: Progress | None, res: PullResult) -> None:
    total = sum(d.size for d in descs[skip:])
    done = 0

    def report(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress("download", done, total)

    blobs = [(d.digest, d.size) for d in descs[skip:]]
    with layers.store.writer() as writer, Downloads(area, client, blobs) as downloads:
        imp = _Importer(layers, writer, max_layer_size, None)
        tree = layers.tree(parent) if parent is not None else []
        reads = []
        seen: set[str] = set()  # verified by this pull (an image may repeat a blob)
        for i, dl in zip(range(skip, len(descs)), downloads.items, strict=True):
            d = descs[i]
            what = f"layer {i + 1} ({d.digest})"
            dl.progress = report
            try:
                blob = Verifying(dl, d.digest, d.size, f"{what} blob")
                try:
                    read, tree = imp.read_layer(blob, tree, diff_ids[i], what)
                    blob.check()
                except CorruptData:
                    # the blob's own digest, when it is wrong, says more than what its
                    # wrong bytes made the decompressor or the tar reader say
                    _check_whole(blob)
                    raise
                dl.verified()
            except CorruptData:
                dl.discard()
                raise
            if dl.resumed_from or (dl.from_disk and d.digest not in seen):
                res.resumed += 1
            seen.add(d.digest)
            res.fetched += 1
            reads.append(read)
        ids = imp.commit(parent, reads, tag, message, config)
    res.top = ids[-1]
    res.layers = list(reversed(layers.chain(res.top)))


def _check_whole(blob: Verifying) -> None:
    """Read the rest of a blob whose content was refused and check its digest: raises
    the digest's error if that is wrong, returns if the blob is what it claims."""
    try:
        blob.check()
    except CorruptData:
        raise
    except Exception:  # the network failing now hides nothing: report the first error
        return
