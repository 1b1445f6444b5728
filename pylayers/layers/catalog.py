"""What a store holds, for people and programs: every layer with its parent, tags,
date, size and message; a layer's history; a directory of a layer's tree.

`new_bytes` is what a layer added to the store (its chunk bytes the store did not
hold yet, uncompressed); `file_bytes` the file content of the layer's own entries.
Neither is a size on disk (`pylayers.du` says that: `stored_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import NotFound
from .manifest import DIR, HARDLINK, Entry
from .repo import Layers


@dataclass
class LayerInfo:
    id: bytes
    parent: bytes | None
    tags: list[str]
    created: float
    message: str
    entries: int  # the layer's own entries (a diff against its parent)
    file_bytes: int
    new_bytes: int
    manifest_bytes: int
    manifest_chunks: int

    def to_json(self) -> dict:
        return {"id": self.id.hex(), "parent": self.parent.hex() if self.parent else None,
                "tags": self.tags, "created": self.created, "message": self.message,
                "entries": self.entries, "file_bytes": self.file_bytes,
                "new_bytes": self.new_bytes, "manifest_bytes": self.manifest_bytes,
                "manifest_chunks": self.manifest_chunks}


def tags_by_layer(layers: Layers) -> dict[bytes, list[str]]:
    out: dict[bytes, list[str]] = {}
    for name, lid in sorted(layers.tags().items()):
        out.setdefault(lid, []).append(name)
    return out


def describe(layers: Layers, layer_id: bytes,
             tags: dict[bytes, list[str]] | None = None) -> LayerInfo:
    rec = layers.record(layer_id)
    if tags is None:
        tags = tags_by_layer(layers)
    return LayerInfo(layer_id, rec.parent, tags.get(layer_id, []), rec.created,
                     rec.message, rec.entries, rec.file_bytes, rec.new_bytes,
                     sum(n for _, n in rec.manifest), len(rec.manifest))


def list_layers(layers: Layers) -> list[LayerInfo]:
    """Every layer, tagged or not, newest first."""
    tags = tags_by_layer(layers)
    out = [describe(layers, lid, tags) for lid in layers.all_ids()]
    return sorted(out, key=lambda i: (-i.created, i.id))


def history(layers: Layers, layer_id: bytes) -> list[LayerInfo]:
    """The layer and its ancestors, newest first."""
    tags = tags_by_layer(layers)
    return [describe(layers, lid, tags) for lid in layers.chain(layer_id)]


def find(tree: list[Entry], path: str | bytes) -> Entry:
    """The entry at `path` ("/" is the root) of a tree."""
    raw = path if isinstance(path, bytes) else path.encode("utf-8", "surrogateescape")
    want = raw.strip(b"/")
    for e in tree:
        if e.path == want:
            return e
    raise NotFound(f"/{want.decode(errors='replace')}: no such path in the layer")


def list_dir(layers: Layers, layer_id: bytes, path: str | bytes = "/") -> list[Entry]:
    """The entries of the directory at `path` in the layer's tree (or the one entry,
    when it is not a directory), in path order."""
    tree = layers.tree(layer_id)
    target = find(tree, path)
    if target.kind != DIR:
        return [target]
    prefix = target.path + b"/" if target.path else b""
    return [e for e in tree if e.path.startswith(prefix) and e.path != target.path
            and b"/" not in e.path[len(prefix):]]


def file_entry(layers: Layers, layer_id: bytes, path: str | bytes) -> Entry:
    """The entry whose content `cat` writes: a hardlink is followed to its file."""
    tree = layers.tree(layer_id)
    e = find(tree, path)
    if e.kind == HARDLINK:
        e = find(tree, e.target)
    return e


__all__ = ["LayerInfo", "describe", "file_entry", "find", "history", "list_dir",
           "list_layers", "tags_by_layer"]
