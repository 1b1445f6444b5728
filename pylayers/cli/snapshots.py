"""`pylayers snapshots`."""

from __future__ import annotations

import click

from ..errors import PylayersError
from ..layers.catalog import tags_by_layer
from ..mounts import Snapshotter
from ..mounts.mountpoints import MOUNTPOINT_LABEL
from .app import cli, emit_json, human, open_layers


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/cli.md).")
@click.pass_context
def snapshots(ctx: click.Context, as_json: bool) -> None:
    """List snapshots (active, view, committed) with their own sizes, their parent
    layer by id and the tags it has now, and where they are mounted."""
    rows = []
    with open_layers(ctx, create=False) as layers:
        snaps = Snapshotter(layers)
        tags = tags_by_layer(layers)
        for info in sorted(snaps.walk(), key=lambda i: (i.kind.value, i.key)):
            try:
                size: int | None = snaps.usage(info.key).size
            except PylayersError:
                size = None
            parent = info.parent_layer
            rows.append({
                "key": info.key, "kind": info.kind.value, "driver": info.driver,
                "size": size, "parent": parent,
                "parent_tags": tags.get(bytes.fromhex(parent), []) if parent else [],
                "layer": info.layer,
                "layer_tags": tags.get(bytes.fromhex(info.layer), []) if info.layer else [],
                "mountpoint": info.labels.get(MOUNTPOINT_LABEL) or None,
                "created": info.created, "labels": info.labels})
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        size = human(r["size"]) if r["size"] is not None else "?"
        parent = "-"
        if r["parent"]:
            parent = r["parent"][:12] + (f" ({','.join(r['parent_tags'])})"
                                         if r["parent_tags"] else "")
        click.echo(f"{r['key']:<24} {r['kind']:<9} {r['driver']:<7} {size:>10}  "
                   f"parent={parent}  {r['mountpoint'] or ''}".rstrip())
