"""`pylayers tag`, `tags` and `rm`."""

from __future__ import annotations

import click

from .app import cli, open_layers


@cli.command()
@click.argument("name")
@click.argument("ref")
@click.pass_context
def tag(ctx: click.Context, name: str, ref: str) -> None:
    """Point tag NAME at layer REF."""
    with open_layers(ctx, create=False) as layers:
        layers.set_tag(name, layers.resolve(ref))


@cli.command()
@click.pass_context
def tags(ctx: click.Context) -> None:
    """List tags and the layers they name."""
    with open_layers(ctx, create=False) as layers:
        for name, lid in sorted(layers.tags().items()):
            click.echo(f"{name}\t{lid.hex()}")


@cli.command()
@click.argument("ref")
@click.pass_context
def rm(ctx: click.Context, ref: str) -> None:
    """Remove a tag, or a layer that no tag or child layer references."""
    with open_layers(ctx, create=False) as layers:
        kind, lid = layers.remove(ref)
        click.echo(f"removed {kind} {ref if kind == 'tag' else lid.hex()}")
