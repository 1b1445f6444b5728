"""`pylayers diff`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from ..layers.diffstat import compare
from ..layers.manifest import KIND_NAMES
from .app import cli, display_path, human, open_layers, warn


@cli.command()
@click.argument("ref1")
@click.argument("ref2")
@click.option("--json", "as_json", is_flag=True, help="A JSON list of changes.")
@click.option("--stat", "as_stat", is_flag=True, help="Sum up bytes added, removed and new.")
@click.pass_context
def diff(ctx: click.Context, ref1: str, ref2: str, as_json: bool, as_stat: bool) -> None:
    """What changed from REF1 to REF2 (REF2 may be a directory, compared without
    storing): `A`dded, `C`hanged or `D`eleted paths, sorted by path."""
    with open_layers(ctx, create=False) as layers:
        def side(arg: str):
            return Path(arg) if os.path.isdir(arg) else layers.resolve(arg)

        res = compare(layers, side(ref1), side(ref2))
    warn(res.warnings)
    if as_stat:
        stat = res.stat
        if as_json:
            click.echo(json.dumps(stat.to_json(), indent=2))
        else:
            click.echo(f"{stat.added} added, {stat.changed} changed, {stat.deleted} deleted; "
                       f"+{human(stat.bytes_added)} -{human(stat.bytes_removed)}; "
                       f"{human(stat.new_bytes)} new in store")
        return
    if as_json:
        out = []
        for c in res.changes:
            e = c.new or c.old
            out.append({"path": "/" + os.fsdecode(c.path), "change": c.change,
                        "kind": KIND_NAMES[e.kind], "attributes": c.attributes})
        click.echo(json.dumps(out, indent=2))
        return
    for c in res.changes:
        click.echo(f"{c.change} {display_path(c.path)}")
