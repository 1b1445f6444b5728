"""`pylayers snapshots`."""

from __future__ import annotations

import click

from ..mounts.listing import list_snapshots
from .app import cli, emit_json, human, open_layers


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/cli.md).")
@click.pass_context
def snapshots(ctx: click.Context, as_json: bool) -> None:
    """List snapshots (active, view, committed) with their own sizes, their parent
    layer by id and the tags it has now, and where they are mounted."""
    with open_layers(ctx, create=False) as layers:
        rows = list_snapshots(layers)
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
