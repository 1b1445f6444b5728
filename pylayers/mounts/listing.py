"""Every snapshot of a store as one row: what `pylayers snapshots` shows (and prints as
JSON, docs/cli.md), gathered in one call."""

from __future__ import annotations

from ..errors import PylayersError
from ..layers.catalog import tags_by_layer
from ..layers.repo import Layers
from .mountpoints import MOUNTPOINT_LABEL
from .snapshotter import Snapshotter


def list_snapshots(layers: Layers) -> list[dict]:
    """Snapshots sorted by kind and key, each with its own size (None when it cannot be
    measured, e.g. a snapshot of another mode), its parent and committed layer by id
    with the tags they have now, and where it is mounted."""
    snaps = Snapshotter(layers)
    tags = tags_by_layer(layers)

    def tags_of(layer_hex: str | None) -> list[str]:
        return tags.get(bytes.fromhex(layer_hex), []) if layer_hex else []

    rows = []
    for info in sorted(snaps.walk(), key=lambda i: (i.kind.value, i.key)):
        try:
            size: int | None = snaps.usage(info.key).size
        except PylayersError:
            size = None
        rows.append({
            "key": info.key, "kind": info.kind.value, "driver": info.driver,
            "size": size, "parent": info.parent_layer,
            "parent_tags": tags_of(info.parent_layer),
            "layer": info.layer, "layer_tags": tags_of(info.layer),
            "mountpoint": info.labels.get(MOUNTPOINT_LABEL) or None,
            "created": info.created, "labels": info.labels})
    return rows
