"""`export`: a layer and its ancestors as an OCI image (layout directory or docker
archive). Each layer is its own entries written as a changeset tar (`tarwrite.py`),
compressed, hashed twice as it is written (the blob digest and, uncompressed, the
diffID) and renamed into `blobs/sha256/` when complete. The config is the one stored
beside the top layer by `import` (its rootfs made to match), else a minimal one;
`created` times only come from `source_date_epoch`, so the same layers and options
give byte-identical blobs, config and manifest."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidArgument
from ..layers.manifest import Entry
from ..layers.repo import Layers
from ..layers.tree import apply_layer
from ..store import Store
from ..store.readahead import read_ahead
from . import config as image_config
from .dockerarchive import pack_layout
from .layout import CONFIG, LAYER_TYPES, MANIFEST, Descriptor, LayoutWriter, canonical
from .streams import COMPRESSIONS, Compressor
from .tarwrite import write_layer


@dataclass
class ExportResult:
    manifest_digest: str
    config_digest: str
    layers: list[str] = field(default_factory=list)  # blob digests, oldest first
    diff_ids: list[str] = field(default_factory=list)


class _Hashing:
    """Counts, and hashes unless `hashing` is off, what it writes to `f`."""

    def __init__(self, f, hashing: bool = True) -> None:
        self.f = f
        self.hash = hashlib.sha256() if hashing else None
        self.size = 0

    def write(self, data) -> None:
        if self.hash is not None:
            self.hash.update(data)
        self.size += len(data)
        self.f.write(data)


class _Batched:
    """Gathers the many small writes of a tar (headers, padding, small files) into
    1 MiB writes."""

    def __init__(self, write) -> None:
        self._write = write
        self.buf = bytearray()

    def __call__(self, data) -> None:
        if len(data) >= 1 << 20:
            self.flush()
            self._write(data)
            return
        self.buf += data
        if len(self.buf) >= 1 << 20:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            self._write(bytes(self.buf))
            self.buf.clear()


def parse_dest(dest: str) -> tuple[str, Path, str | None]:
    if dest.startswith("oci:"):
        rest = dest[4:]
        path, ref = rest, None
        if ":" in rest and not Path(rest).exists():
            path, _, ref = rest.rpartition(":")
        if not path:
            raise InvalidArgument(f"{dest!r}: no directory after oci:")
        return "oci", Path(path), ref or None
    if dest.startswith("docker-archive:"):
        rest = dest[len("docker-archive:"):]
        path, _, ref = rest.partition(":")
        if not path:
            raise InvalidArgument(f"{dest!r}: no file after docker-archive:")
        return "docker-archive", Path(path), ref or None
    raise InvalidArgument(f"{dest!r}: say oci:DIR[:TAG] or docker-archive:FILE[:NAME:TAG]")


def export_image(layers: Layers, layer_id: bytes, dest: str, compression: str = "gzip",
                 source_date_epoch: int | None = None, *,
                 config: bytes | None = None) -> ExportResult:
    """Export the image of top layer `layer_id` with `config` (default: the config last
    stored with that layer; oci/config.for_ref gives a tag's own)."""
    if compression not in COMPRESSIONS:
        raise InvalidArgument(f"unknown compression {compression!r} "
                              f"(one of {', '.join(COMPRESSIONS)})")
    kind, path, ref = parse_dest(dest)
    if kind == "oci":
        return _export_layout(layers, layer_id, LayoutWriter(path), ref, compression,
                              source_date_epoch, config)
    if path.is_dir():
        raise InvalidArgument(f"{path} is a directory")
    if not path.parent.is_dir():
        raise InvalidArgument(f"{path.parent} is not a directory")
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        res = _export_layout(layers, layer_id, LayoutWriter(work), None, compression,
                             source_date_epoch, config)
        tags = [ref] if ref else []
        entry = {"Config": "blobs/sha256/" + res.config_digest[7:], "RepoTags": tags,
                 "Layers": ["blobs/sha256/" + d[7:] for d in res.layers]}
        pack_layout(work, path, source_date_epoch or 0, entry)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return res


def image_documents(store: Store, top: bytes, diff_ids: list[str], descs: list[Descriptor],
                    sde: int | None, config: bytes | None = None) -> tuple[bytes, bytes]:
    """(config, manifest) of the image of `top` whose layer blobs are `descs` (with
    `diff_ids`), as export writes them (push builds them from known blobs too)."""
    created = None
    if sde is not None:
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(sde))
    stored = config if config is not None else image_config.load(store, top)
    cfg = image_config.for_export(stored, diff_ids, created)
    cdesc = Descriptor(CONFIG, "sha256:" + hashlib.sha256(cfg).hexdigest(), len(cfg), {}, {})
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST, "config": cdesc.to_json(),
                "layers": [d.to_json() for d in descs]}
    return cfg, canonical(manifest)


def _export_layout(layers: Layers, top: bytes, out: LayoutWriter, ref: str | None,
                   compression: str, sde: int | None, config: bytes | None) -> ExportResult:
    store = layers.store
    chain = list(reversed(layers.chain(top)))
    tree: list[Entry] = []
    res = ExportResult("", "")
    descs = []
    for lid in chain:
        own = layers.entries(lid)
        tree = apply_layer(tree, own)
        after = {e.path: e for e in tree}
        tmp = out.temp()
        try:
            # uncompressed, the blob is the tar itself: one hash for both digests
            blob = _Hashing(tmp, hashing=compression != "none")
            comp = Compressor(blob, compression)
            diff = hashlib.sha256()

            def write(data, diff=diff, comp=comp) -> None:
                diff.update(data)
                comp.write(data)

            batched = _Batched(write)
            write_layer(batched, own, after, lambda cids: read_ahead(store, cids), sde)
            batched.flush()
            comp.close()
            tmp.flush()
            os.fsync(tmp.fileno())
            tmp.close()
            digest = "sha256:" + (blob.hash or diff).hexdigest()
            out.add_file(tmp.name, digest)
        except BaseException:
            tmp.close()
            if os.path.exists(tmp.name):
                os.unlink(tmp.name)
            raise
        res.layers.append(digest)
        res.diff_ids.append("sha256:" + diff.hexdigest())
        descs.append(Descriptor(LAYER_TYPES[compression], digest, blob.size, {}, {}))
    cfg, manifest = image_documents(store, top, res.diff_ids, descs, sde, config)
    cdesc = out.add_bytes(cfg, CONFIG)
    res.config_digest = cdesc.digest
    mdesc = out.add_bytes(manifest, MANIFEST)
    out.set_ref(mdesc, ref)
    res.manifest_digest = mdesc.digest
    return res
