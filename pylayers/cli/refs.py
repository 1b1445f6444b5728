"""`pylayers tag`, `tags` and `rm`."""

from __future__ import annotations

import click

from ..layers.refs import remove_refs
from ..oci import config as image_config
from .app import cli, emit_json, open_layers, ref_param, tag_param


@cli.command()
@click.argument("name", callback=tag_param)
@click.argument("ref", callback=ref_param)
@click.pass_context
def tag(ctx: click.Context, name: str, ref: str) -> None:
    """Point tag NAME at layer REF (at the image REF names, when REF is a tag written
    with an image config: build, import or pull -t)."""
    with open_layers(ctx, create=False) as layers:
        image_config.tag(layers, name, ref)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/cli.md).")
@click.pass_context
def tags(ctx: click.Context, as_json: bool) -> None:
    """List tags and the layers they name."""
    with open_layers(ctx, create=False) as layers:
        rows = sorted(layers.tags().items())
    if as_json:
        emit_json([{"tag": name, "id": lid.hex()} for name, lid in rows])
        return
    for name, lid in rows:
        click.echo(f"{name}\t{lid.hex()}")


@cli.command()
@click.argument("refs", nargs=-1, required=True, callback=ref_param)
@click.pass_context
def rm(ctx: click.Context, refs: tuple[str, ...]) -> None:
    """Remove tags, and layers that no tag, child layer or snapshot references. Every
    REF is resolved before anything is removed; layers go children first."""
    with open_layers(ctx, create=False) as layers:
        for kind, ref, lid in remove_refs(layers, list(refs)):
            click.echo(f"removed {kind} {ref if kind == 'tag' else lid.hex()}")
