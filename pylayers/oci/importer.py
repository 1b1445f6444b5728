"""`import`: an OCI image layout, a docker archive or one layer tarball into layers.

Every layer is read, checked and turned into entries before anything is committed:
the archive streams through digest checks (the blob's, and the diffID of its
uncompressed tar against the config), a size limit and the changeset rules
(`changeset.py`), its files' chunks going to the store's writer as they come. Only when
every layer is whole and verified are the layers committed, oldest first, through
`Layers.commit_entries` (the path the overlay driver's commit takes), the tag with the
top one, then the config beside it. A failure before that leaves nothing (the writer's
uncommitted chunks are dropped with it; chunks it had to index on the way, every
256 MiB, are unreferenced and gc removes them); a failure while committing removes the
layers and the tag this import had made.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import blake3

from ..errors import CorruptData, InvalidArgument, NotFound
from ..layers.manifest import Entry, encode_manifest
from ..layers.repo import Layers, check_tag
from ..layers.tree import apply_layer, validate_tree
from ..store.ingest import ChunkWriter
from . import config as image_config
from .changeset import Changeset
from .dockerarchive import DockerArchive
from .layout import Layout
from .streams import Verifying, decompressed
from .tarread import read_members

DEFAULT_MAX_LAYER_SIZE = 64 << 30
LAYER_SUFFIXES = ("tar", "tar+gzip", "tar+zstd", "tar.gzip", "tar.zstd")


@dataclass
class ImportResult:
    top: bytes
    layers: list[bytes] = field(default_factory=list)  # oldest first
    config_digest: str | None = None


@dataclass
class _Read:
    own: list[Entry]
    diff_id: str


def parse_source(source: str) -> tuple[str, Path, str | None]:
    """(kind, path, ref) of `oci:DIR[:ref]`, `docker-archive:FILE[:ref]` or a path."""
    for kind in ("oci", "docker-archive"):
        if source.startswith(kind + ":"):
            rest = source[len(kind) + 1:]
            if not rest:
                raise InvalidArgument(f"{source!r}: no path after {kind}:")
            path, ref = rest, None
            if not Path(rest).exists() and ":" in rest:
                # the reference is what follows the path: for a docker archive a
                # NAME:TAG holds a colon itself
                head, sep, tail = rest.partition(":")
                if kind == "docker-archive":
                    path, ref = head, tail
                else:
                    path, _, ref = rest.rpartition(":")
            return kind, Path(path), ref or None
    return "tar", Path(source), None


class _Importer:
    def __init__(self, layers: Layers, writer: ChunkWriter, max_layer_size: int,
                 progress: Callable[[int], None] | None) -> None:
        self.layers = layers
        self.writer = writer
        self.params = layers.store.config.chunker
        self.max = max_layer_size
        self.progress = progress

    def read_layer(self, raw: BinaryIO, tree: list[Entry], diff_id: str | None,
                   what: str) -> tuple[_Read, list[Entry]]:
        """Read one layer blob onto `tree`: (its entries and diffID, the tree after)."""
        stream, _kind = decompressed(raw, self.max, what)
        diff = Verifying(stream, diff_id, what=f"{what} (uncompressed)")
        cs = Changeset(tree)
        for m in read_members(diff, self.params, self.writer.put, self.progress,
                              self.writer.file_hint):
            cs.add(m)
        digest = diff.check()  # the rest of the stream too: trailing data is read, limited
        own = cs.own_entries()
        after = apply_layer(tree, own)
        validate_tree(after)
        return _Read(own, digest), after

    def commit(self, parent: bytes | None, reads: list[_Read], tag: str | None,
               message: str, config: bytes | None) -> list[bytes]:
        store = self.layers.store
        made: list[bytes] = []
        old_tag = None
        if tag is not None:
            with store.read() as t:
                old_tag = t.tags.image(tag)
        ids = []
        try:
            for i, r in enumerate(reads):
                lid = blake3.blake3(encode_manifest(parent, r.own)).digest()
                new = not self.layers.exists(lid)
                last = i == len(reads) - 1
                got = self.layers.commit_entries(parent, r.own, self.writer,
                                                 tag if last else None,
                                                 f"{message} ({i + 1}/{len(reads)})"
                                                 if len(reads) > 1 else message)
                if new:
                    made.append(got)
                ids.append(got)
                parent = got
            if config is not None:
                image_config.save(store, ids[-1], config, (tag,) if tag is not None else ())
        except BaseException:
            with store.write() as t:  # undo: the tag as it was, the layers made
                if tag is not None and old_tag is None:
                    t.tags.delete(tag)
                elif tag is not None and old_tag is not None:
                    t.tags.put(tag, *old_tag)
                for lid in reversed(made):
                    self.layers.remove_unused_in(t, lid)
            raise
        return ids


def import_source(layers: Layers, source: str, tag: str | None = None,
                  parent: bytes | None = None,
                  max_layer_size: int = DEFAULT_MAX_LAYER_SIZE,
                  progress: Callable[[int], None] | None = None) -> ImportResult:
    """Import `source` (see `parse_source`); `parent` only for a layer tarball."""
    if tag is not None:
        check_tag(tag)
    if max_layer_size <= 0:
        raise InvalidArgument("--max-layer-size must be positive")
    kind, path, ref = parse_source(source)
    if kind != "tar" and parent is not None:
        raise InvalidArgument("--parent is for a single layer tarball; an image brings "
                              "its own base")
    with layers.store.writer() as writer:
        imp = _Importer(layers, writer, max_layer_size, progress)
        if kind == "tar":
            return _import_tar(imp, path, tag, parent, source)
        if kind == "oci":
            return _import_layout(imp, path, ref, tag, source)
        return _import_docker(imp, path, ref, tag, source)


def _import_tar(imp: _Importer, path: Path, tag: str | None, parent: bytes | None,
                source: str) -> ImportResult:
    tree = imp.layers.tree(parent) if parent is not None else []
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        raise NotFound(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InvalidArgument(f"{path} is a directory (oci:DIR for an image layout)") from None
    with f:
        read, _after = imp.read_layer(f, tree, None, str(path))
    ids = imp.commit(parent, [read], tag, f"import {source}", None)
    return ImportResult(ids[-1], ids)


def _check_layers(n: int, ids: list[str], what: str) -> None:
    if len(ids) != n:
        raise CorruptData(f"{what}: the config lists {len(ids)} diffIDs for {n} layers")


def _import_layout(imp: _Importer, path: Path, ref: str | None, tag: str | None,
                   source: str) -> ImportResult:
    layout = Layout(path)
    _desc, manifest = layout.manifest(ref)
    from .layout import Descriptor

    cdesc = Descriptor.parse(manifest.get("config"), "manifest config")
    config = layout.read_blob(cdesc, "config")
    diff_ids = image_config.diff_ids(image_config.parse(config))
    descs = [Descriptor.parse(d, "manifest layers") for d in manifest["layers"]]
    _check_layers(len(descs), diff_ids, str(path))
    tree: list[Entry] = []
    reads = []
    for i, d in enumerate(descs):
        if not d.media_type.endswith(LAYER_SUFFIXES):
            raise InvalidArgument(f"layer {d.digest} has media type {d.media_type!r}, "
                                  "not a tar layer pylayers can read")
        blob = layout.open_blob(d, f"layer {i + 1}")
        try:
            read, tree = imp.read_layer(blob, tree, diff_ids[i], f"layer {i + 1} ({d.digest})")
            blob.check()
        finally:
            blob.raw.close()
        reads.append(read)
    ids = imp.commit(None, reads, tag, f"import {source}", config)
    return ImportResult(ids[-1], ids, cdesc.digest)


def _import_docker(imp: _Importer, path: Path, ref: str | None, tag: str | None,
                   source: str) -> ImportResult:
    if not path.exists():
        raise NotFound(f"{path}: no such file")
    archive = DockerArchive(path)
    try:
        image = archive.image(ref)
        config = archive.read(image.get("Config"), "config")
        diff_ids = image_config.diff_ids(image_config.parse(config))
        _check_layers(len(image["Layers"]), diff_ids, str(path))
        tree: list[Entry] = []
        reads = []
        for i, name in enumerate(image["Layers"]):
            f, claimed = archive.open(name, f"layer {i + 1}")
            blob = Verifying(f, claimed, what=f"layer {i + 1} ({name})")
            read, tree = imp.read_layer(blob, tree, diff_ids[i], f"layer {i + 1} ({name})")
            blob.check()
            reads.append(read)
    finally:
        archive.close()
    digest = "sha256:" + hashlib.sha256(config).hexdigest()
    ids = imp.commit(None, reads, tag, f"import {source}", config)
    return ImportResult(ids[-1], ids, digest)
