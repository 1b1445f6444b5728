"""Store-wide jobs that need to know about layers: the live chunks (gc's roots from
layers), fsck of layers and tags, and du's logical bytes. `pylayers.maintenance` runs
them together with every other subsystem's part."""

from __future__ import annotations

from dataclasses import dataclass, field

import blake3

from ..errors import CorruptData
from ..store.check import verify_chunks
from ..store.repository import Store
from . import fingerprint
from .manifest import REG, decode_manifest
from .repo import LAYER_REF, LayerRecord, read_manifest
from .tree import tree_problems


def live_chunks(store: Store, extra_roots: set[bytes] | None = None) -> set[bytes]:
    """Every chunk a layer needs: its manifest's chunks and its files' chunks."""
    live: set[bytes] = set(extra_roots or ())
    with store.read() as t:
        records = [(bytes(lid), LayerRecord.decode(raw)) for lid, raw in t.layers.items()]
    for lid, rec in records:
        live.update(cid for cid, _ in rec.manifest)
        data = read_manifest(store, lid, rec.manifest)
        for e in decode_manifest(data)[1]:
            if e.kind == REG:
                c = e.chunks
                live.update(c[i : i + 32] for i in range(0, len(c), 36))
    return live


def prune_fingerprints(store: Store) -> int:
    """Delete the tree fingerprints whose layer is gone; how many (gc)."""
    with store.write() as t:
        return fingerprint.prune(t)


@dataclass
class FsckReport:
    chunks_checked: int = 0
    layers_checked: int = 0
    damaged: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged


def fsck(store: Store) -> FsckReport:
    """Verify every chunk against its id, every manifest against its layer id, and every
    reference (chunks of files, parents, tags, and the index's record of each parent's
    children, which `rm` relies on)."""
    v = verify_chunks(store)
    report = FsckReport(v.chunks_checked, 0, list(v.damaged), list(v.notes))
    with store.read() as t:
        layers = dict(t.layers.items())
        tags = list(t.tags.items())
        child_refs = {(lid, key) for lid, owner, key in t.refs.items() if owner == LAYER_REF}
    decoded: dict[bytes, tuple[bytes | None, list]] = {}
    with store.read() as t:

        def present(cid: bytes) -> bool:
            return t.chunks.has(cid) and cid not in v.bad_chunks

        for lid, raw in sorted(layers.items()):
            report.layers_checked += 1
            name = f"layer {lid.hex()[:12]}"
            try:
                rec = LayerRecord.decode(raw)
            except CorruptData as e:
                report.damaged.append(f"{name}: {e}")
                continue
            if rec.parent is not None and rec.parent not in layers:
                report.damaged.append(f"{name}: parent {rec.parent.hex()[:12]} is missing")
            elif rec.parent is not None and (rec.parent, lid) not in child_refs:
                report.damaged.append(f"{name}: the index does not record it as a child of "
                                      f"{rec.parent.hex()[:12]} (rm could remove that)")
            missing = [cid for cid, _ in rec.manifest if not present(cid)]
            if missing:
                report.damaged.append(f"{name}: manifest chunk {missing[0].hex()} is "
                                      "missing or damaged")
                continue
            try:
                data = read_manifest(store, lid, rec.manifest)
                if blake3.blake3(data).digest() != lid:
                    raise CorruptData("manifest does not match the layer id")
                parent, entries = decode_manifest(data)
                if parent != rec.parent:
                    raise CorruptData("manifest and record disagree on the parent")
            except CorruptData as e:
                report.damaged.append(f"{name}: {e}")
                continue
            decoded[lid] = (parent, entries)
            for e in entries:
                if e.kind != REG or e.inline:  # inline: the manifest holds its bytes
                    continue
                chunks = e.chunk_list()
                bad = [cid for cid, _ in chunks if not present(cid)]
                path = "/" + e.path.decode(errors="backslashreplace")
                if bad:
                    report.damaged.append(f"{name}: {path}: chunk {bad[0].hex()} is missing "
                                          "or damaged")
                elif sum(n for _, n in chunks) != e.size:
                    report.damaged.append(f"{name}: {path}: chunk lengths do not add up")
    for lid, problem in sorted(tree_problems(decoded)):  # a file under a symlink...
        report.damaged.append(f"layer {lid.hex()[:12]}: {problem}")
    for parent, child in sorted(child_refs):
        if child not in layers:
            report.notes.append(f"layer {parent.hex()[:12]}: the index records a child "
                                f"{child.hex()[:12]} that is gone (it only keeps `rm` from "
                                "removing the layer)")
    for tag, lid in tags:
        if lid not in layers:
            report.damaged.append(f"tag {tag}: points at missing layer {lid.hex()[:12]}")
    return report


def disk_usage(store: Store) -> dict:
    logical = inline = 0
    layers = 0
    with store.read() as t:
        for _lid, raw in t.layers.items():
            rec = LayerRecord.decode(raw)
            logical += rec.file_bytes
            inline += rec.inline_bytes
            layers += 1
    stored = store.disk_usage()
    return {
        "layers": layers,
        "inline_bytes": inline,
        "chunks": store.chunk_count(),
        "logical_bytes": logical,
        "stored_bytes": stored,
        "dedup_ratio": round(logical / stored, 3) if stored else 0.0,
    }
