"""Layers: snapshot a directory into a layer, resolve references, read trees back.

A layer is a manifest (its own entries: what differs from its parent, with whiteouts)
stored as chunks in the chunk store, plus a record in the `layers` table. Its id is
the BLAKE3 of the canonical manifest, which includes the parent id, so the same tree
snapshotted twice onto the same parent gets the same id.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import blake3

from ..chunking import cut_points
from ..errors import AlreadyExists, CorruptData, FailedPrecondition, InvalidArgument, NotFound
from ..store.ingest import ChunkWriter
from ..store.readahead import read_ahead
from ..store.repository import Store
from . import fingerprint
from .checkout import checkout_tree
from .manifest import REG, Entry, decode_manifest, encode_manifest
from .scan import Scanner, ScanStats
from .statcache import RACY_NS
from .tree import apply_layer, diff_layer, validate_tree

TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._:/@+-]{0,127}$")
REF_RE = re.compile(r"^(?P<base>[^~]+)(?:~(?P<n>\d*))?$")


@dataclass
class LayerRecord:
    """The `layers` table's value (docs/format.md, "Layer records")."""

    parent: bytes | None
    manifest: list[tuple[bytes, int]]
    created: float
    message: str
    entries: int
    file_bytes: int  # bytes of regular-file content in this layer's own entries
    new_bytes: int  # chunk bytes this layer added to the store
    kept: bool = False  # made (or made again) by `snapshot`: the snapshotter never collects it

    def encode(self) -> bytes:
        d = {
            "parent": self.parent.hex() if self.parent else None,
            "manifest": [[cid.hex(), n] for cid, n in self.manifest],
            "created": self.created, "message": self.message, "entries": self.entries,
            "file_bytes": self.file_bytes, "new_bytes": self.new_bytes,
        }
        if self.kept:
            d["kept"] = True
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> LayerRecord:
        try:
            d = json.loads(data)
            return cls(bytes.fromhex(d["parent"]) if d["parent"] else None,
                       [(bytes.fromhex(c), n) for c, n in d["manifest"]], d["created"],
                       d["message"], d["entries"], d["file_bytes"], d["new_bytes"],
                       d.get("kept") is True)
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptData(f"layer record is malformed: {e}") from None


@dataclass
class SnapshotResult:
    layer_id: bytes
    stats: ScanStats
    entries: int
    existed: bool


def _mark_kept(txn, layers_db, layer_id: bytes, raw: bytes) -> None:
    """Set `kept` in the layer record `raw` of `layer_id`, if it is not set yet."""
    rec = LayerRecord.decode(raw)
    if not rec.kept:
        rec.kept = True
        txn.put(layer_id, rec.encode(), db=layers_db)


def check_tag(name: str) -> None:
    if not TAG_RE.match(name) or re.fullmatch(r"[0-9a-f]{6,64}", name):
        raise InvalidArgument(f"invalid tag name {name!r} (letters, digits and ._:/@+- ; "
                              "not a hex string that could be a layer id)")


class Layers:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._trees: dict[bytes, list[Entry]] = {}

    # -- records and references --------------------------------------------------
    def record(self, layer_id: bytes) -> LayerRecord:
        raw = self.store.get("layers", layer_id)
        if raw is None:
            raise NotFound(f"layer {layer_id.hex()} not found")
        return LayerRecord.decode(raw)

    def exists(self, layer_id: bytes) -> bool:
        return self.store.get("layers", layer_id) is not None

    def all_ids(self) -> list[bytes]:
        return [k for k, _ in self.store.items("layers")]

    def tags(self) -> dict[str, bytes]:
        return {k.decode(): v for k, v in self.store.items("tags")}

    def resolve(self, ref: str) -> bytes:
        """A full id, a unique prefix of >= 6 hex digits, a tag, each optionally ~N."""
        m = REF_RE.match(ref)
        if not m:
            raise InvalidArgument(f"invalid reference {ref!r}")
        base, n = m.group("base"), m.group("n")
        steps = 0 if n is None else (int(n) if n else 1)
        layer_id = self._resolve_base(base)
        for i in range(steps):
            parent = self.record(layer_id).parent
            if parent is None:
                raise NotFound(f"{ref}: layer has only {i} ancestors")
            layer_id = parent
        return layer_id

    def _resolve_base(self, base: str) -> bytes:
        tagged = self.store.get("tags", base.encode())
        if tagged is not None:
            return tagged
        if re.fullmatch(r"[0-9a-fA-F]{64}", base):
            lid = bytes.fromhex(base)
            if self.exists(lid):
                return lid
            raise NotFound(f"layer {base} not found")
        if re.fullmatch(r"[0-9a-fA-F]{6,63}", base):
            prefix = base.lower()
            hits = [k for k in self.all_ids() if k.hex().startswith(prefix)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise InvalidArgument(f"layer id prefix {base} is ambiguous ({len(hits)} layers)")
        raise NotFound(f"no layer or tag named {base!r}")

    # -- reading -------------------------------------------------------------------
    def manifest_bytes(self, layer_id: bytes) -> bytes:
        rec = self.record(layer_id)
        return b"".join(self.store.read_chunk(cid) for cid, _ in rec.manifest)

    def entries(self, layer_id: bytes) -> list[Entry]:
        """The layer's own entries (a diff against its parent)."""
        rec = self.record(layer_id)
        data = b"".join(self.store.read_chunk(cid) for cid, _ in rec.manifest)
        if blake3.blake3(data).digest() != layer_id:
            raise CorruptData(f"manifest of layer {layer_id.hex()} does not match its id")
        parent, own = decode_manifest(data)
        if parent != rec.parent:  # the record is covered by no id; the manifest is
            raise CorruptData(f"layer {layer_id.hex()[:12]}: its record and its manifest "
                              "name different parents")
        return own

    def chain(self, layer_id: bytes) -> list[bytes]:
        """The layer and its ancestors, newest first."""
        out = [layer_id]
        while (parent := self.record(out[-1]).parent) is not None:
            if parent in out:
                raise CorruptData(f"layer {layer_id.hex()} has a cycle in its parents")
            out.append(parent)
        return out

    def tree(self, layer_id: bytes) -> list[Entry]:
        """The full tree of a layer: its chain of diffs applied, oldest first."""
        cached = self._trees.get(layer_id)
        if cached is not None:
            return cached
        chain = self.chain(layer_id)
        tree: list[Entry] = []
        start = len(chain)
        for i, lid in enumerate(chain):
            if lid in self._trees:
                tree, start = self._trees[lid], i
                break
        own: list[Entry] = []
        for lid in reversed(chain[:start]):
            own = self.entries(lid)
            tree = apply_layer(tree, own)
        validate_tree(tree, own, f"layer {layer_id.hex()[:12]}")  # what every reader relies on
        self._trees = {layer_id: tree}
        return tree

    def read_file(self, e: Entry) -> bytes:
        return b"".join(self.store.read_chunk(cid) for cid, _ in e.chunk_list())

    def checkout(self, layer_id: bytes, dest: Path, progress=None) -> None:
        checkout_tree(self.tree(layer_id), dest, lambda cids: read_ahead(self.store, cids),
                      progress)

    # -- writing -------------------------------------------------------------------
    def snapshot(self, directory: str | Path, parent: bytes | None = None,
                 tag: str | None = None, message: str = "",
                 progress: Callable[[int], None] | None = None,
                 kept: bool = True, allow_changing: bool = False) -> SnapshotResult:
        """Store `directory` as a layer on `parent`. `kept`: a layer the user asked for
        (False for a snapshotter's commit, which its collection may remove). A file that
        keeps changing while read fails the snapshot with SourceChanged, unless
        `allow_changing`: then its last read is stored and listed in `stats.changed`."""
        if tag is not None:
            check_tag(tag)
        start_ns = time.time_ns()
        fp = fp_key = None
        if os.path.isdir(directory):
            fp_key = fingerprint.cache_key(directory)
            try:
                fp, max_ctime = fingerprint.tree_fingerprint(directory)
            except OSError:
                fp = None  # the full scan reports the problem properly
        with self.store.writer() as writer:
            same_as = self._unchanged_since(fp, fp_key)
            if same_as is not None:
                # The directory holds exactly the tree of layer `same_as`.
                stats = ScanStats(unchanged_since=same_as)
                rec = self.record(same_as)
                if rec.parent == parent and self._recommit(writer, same_as, tag, kept):
                    # That very layer again (layer ids are of the manifest, which a
                    # snapshot derives from the tree and the parent alone): nothing to
                    # decode, diff or store.
                    return SnapshotResult(same_as, stats, rec.entries, True)
                if parent == same_as:
                    own: list[Entry] = []
                else:
                    tree = self.tree(same_as)
                    own = diff_layer(self.tree(parent), tree) if parent is not None else tree
                layer_id, existed = self._commit(writer, parent, own, tag, message, [],
                                                 kept=kept)
                return SnapshotResult(layer_id, stats, len(own), existed)
            base = self.tree(parent) if parent is not None else []
            scanner = Scanner(self.store, self.store.config.chunker, writer.put,
                              progress=progress, allow_changing=allow_changing)
            tree = scanner.scan(directory)
            own = diff_layer(base, tree) if parent is not None else tree
            cache = list(scanner.statcache_updates)
            record_fp = fp is not None and max_ctime < start_ns - RACY_NS
            layer_id, existed = self._commit(writer, parent, own, tag, message, cache,
                                             (fp_key, fp) if record_fp else None, kept=kept)
        return SnapshotResult(layer_id, scanner.stats, len(own), existed)

    def _unchanged_since(self, fp: bytes | None, fp_key: bytes | None) -> bytes | None:
        if fp is None:
            return None
        known = self.store.get("statcache", fp_key)
        if known is None or known[:32] != fp:
            return None
        layer_id = bytes(known[32:64])
        return layer_id if self.exists(layer_id) else None

    def _recommit(self, writer: ChunkWriter, layer_id: bytes, tag: str | None,
                  kept: bool) -> bool:
        """Tag (and mark kept) the existing layer `layer_id`, as a snapshot that made it
        again would; False if it was removed meanwhile."""
        if tag is not None:
            check_tag(tag)
        db = self.store.db
        found = []

        def extra(txn) -> None:
            old = txn.get(layer_id, db=db["layers"])
            if old is None:
                return
            found.append(True)
            if kept:
                _mark_kept(txn, db["layers"], layer_id, old)
            if tag is not None:
                txn.put(tag.encode(), layer_id, db=db["tags"])

        writer.commit(extra)
        return bool(found)

    def commit_entries(self, parent: bytes | None, own: list[Entry], writer: ChunkWriter,
                       tag: str | None = None, message: str = "") -> bytes:
        """Store a layer made of `own` entries (whose chunks `writer` holds)."""
        return self._commit(writer, parent, own, tag, message, [])[0]

    def _commit(self, writer: ChunkWriter, parent: bytes | None, own: list[Entry],
                tag: str | None, message: str, statcache: list[tuple[bytes, bytes]],
                tree_fp: tuple[bytes, bytes] | None = None,
                kept: bool = False) -> tuple[bytes, bool]:
        if tag is not None:
            check_tag(tag)  # here, where tags are written, whoever the caller
        data = encode_manifest(parent, own)
        layer_id = blake3.blake3(data).digest()
        existed = self.exists(layer_id)
        manifest = []
        start = 0
        p = self.store.config.chunker
        for end in cut_points(data, min_size=p.min_size, avg_size=p.avg_size,
                              max_size=p.max_size):
            piece = data[start:end]
            cid = blake3.blake3(piece).digest()
            writer.put(cid, piece)
            manifest.append((cid, len(piece)))
            start = end
        new_bytes = writer.new_bytes
        rec = LayerRecord(parent, manifest, time.time(), message, len(own),
                          sum(e.size for e in own if e.kind == REG), new_bytes, kept)
        db = self.store.db

        def extra(txn) -> None:
            if parent is not None and txn.get(parent, db=db["layers"]) is None:
                raise NotFound(f"parent layer {parent.hex()} was removed meanwhile")
            old = txn.get(layer_id, db=db["layers"])
            if old is None:
                txn.put(layer_id, rec.encode(), db=db["layers"])
            elif kept:  # a snapshot of a tree a build step committed too: the user's now
                _mark_kept(txn, db["layers"], layer_id, old)
            if tag is not None:
                txn.put(tag.encode(), layer_id, db=db["tags"])
            for key, value in statcache:
                txn.put(key, value, db=db["statcache"])
            if tree_fp is not None:
                txn.put(tree_fp[0], tree_fp[1] + layer_id, db=db["statcache"])

        writer.commit(extra)
        return layer_id, existed

    def set_tag(self, name: str, layer_id: bytes) -> None:
        check_tag(name)
        self.record(layer_id)
        self.store.put("tags", name.encode(), layer_id)

    def children(self) -> dict[bytes, list[bytes]]:
        out: dict[bytes, list[bytes]] = {}
        for lid, raw in self.store.items("layers"):
            parent = LayerRecord.decode(raw).parent
            if parent is not None:
                out.setdefault(parent, []).append(lid)
        return out

    def remove(self, ref: str) -> tuple[str, bytes]:
        """Remove a tag (if `ref` is one) or else an unreferenced layer."""
        if self.store.get("tags", ref.encode()) is not None:
            lid = self.store.get("tags", ref.encode())
            self.store.delete("tags", ref.encode())
            return "tag", lid
        lid = self.resolve(ref)
        kids = self.children().get(lid)
        if kids:
            raise FailedPrecondition(f"layer {lid.hex()[:12]} is the parent of "
                                     f"{len(kids)} layer(s); remove them first")
        for key, raw in self.store.items("snapshots"):
            snap = json.loads(raw)
            if lid.hex() in (snap.get("parent_layer"), snap.get("layer")):
                raise FailedPrecondition(f"layer {lid.hex()[:12]} is used by snapshot "
                                         f"{key.decode(errors='replace')!r}; remove it first")
        tagged = [t for t, v in self.tags().items() if v == lid]
        if tagged:
            raise FailedPrecondition(f"layer {lid.hex()[:12]} is tagged {', '.join(tagged)}; "
                                     "remove the tag first")
        if not self.store.delete("layers", lid):
            raise NotFound(f"layer {lid.hex()} not found")
        return "layer", lid


__all__ = ["Layers", "LayerRecord", "SnapshotResult", "AlreadyExists", "Path"]
