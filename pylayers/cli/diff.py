"""`pylayers diff`."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..errors import InvalidArgument, NotFound, UsageError
from ..layers.diffstat import Side, compare
from ..layers.ignore import Exclusions
from ..layers.manifest import KIND_NAMES
from ..layers.repo import Layers
from .app import cli, display_path, emit_json, human, open_layers, path_json, ref_param, warn


def _directory(arg: str) -> Path:
    if not os.path.isdir(arg):
        what = "not a directory" if os.path.exists(arg) else "no such directory"
        raise NotFound(f"{arg}: {what} (an argument holding '/' is a directory)")
    return Path(arg)


def _side(layers: Layers, arg: str) -> Side:
    """The rule (README, "diff"): an argument holding '/' is a directory; any other is
    a REF, and when a directory of that name exists too, it is an error naming both."""
    if "/" in arg:
        return _directory(arg)
    try:
        layer_id = layers.resolve(arg)
    except (NotFound, InvalidArgument) as e:
        if os.path.isdir(arg):
            raise NotFound(f"{e}; for the directory {arg!r} write ./{arg} "
                           "(an argument without '/' is a REF)") from None
        raise
    if os.path.isdir(arg):
        raise UsageError(f"{arg!r} is both the layer {layer_id.hex()[:12]} and a "
                         f"directory: write ./{arg} for the directory, or the layer id")
    return layer_id


@cli.command()
@click.argument("ref1")
@click.argument("ref2", required=False)
@click.option("--dir", "directory", type=click.Path(),
              help="Compare REF1 with this directory (in place of REF2).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/cli.md).")
@click.option("--stat", "as_stat", is_flag=True, help="Sum up bytes added, removed and new.")
@click.option("--exclude", "-x", "patterns", multiple=True, metavar="PATTERN",
              help="Leave out of a directory's scan what snapshot --exclude would "
                   "(its .pylayersignore applies too).")
@click.pass_context
def diff(ctx: click.Context, ref1: str, ref2: str | None, directory: str | None,
         as_json: bool, as_stat: bool, patterns: tuple[str, ...]) -> None:
    """What changed from REF1 to REF2: `A`dded, `C`hanged or `D`eleted paths, sorted by
    path. Either may be a directory, compared without storing anything: an argument
    holding '/' (./rootfs, /srv/x) or given with --dir is a directory; any other is a
    REF, and if a directory of that name exists too, diff refuses to guess."""
    if (ref2 is None) == (directory is None):
        raise click.UsageError("give REF2 or --dir DIRECTORY (one of them)")
    for arg in (ref1, ref2):
        if arg is not None and "/" not in arg:
            ref_param(ctx, None, arg)
    with open_layers(ctx, create=False) as layers:
        old = _side(layers, ref1)
        new = _directory(directory) if directory is not None else _side(layers, ref2)
        res = compare(layers, old, new,
                      exclusions=lambda d: Exclusions.for_directory(d, patterns))
    warn(res.warnings)
    if as_stat:
        stat = res.stat
        if as_json:
            emit_json(stat.to_json())
        else:
            click.echo(f"{stat.added} added, {stat.changed} changed, {stat.deleted} deleted; "
                       f"+{human(stat.bytes_added)} -{human(stat.bytes_removed)}; "
                       f"{human(stat.new_bytes)} new in store")
        return
    if as_json:
        out = []
        for c in res.changes:
            e = c.new or c.old
            d = path_json(c.path)
            d.update({"change": c.change, "kind": KIND_NAMES[e.kind],
                      "attributes": c.attributes})
            out.append(d)
        emit_json(out)
        return
    for c in res.changes:
        click.echo(f"{c.change} {display_path(c.path)}")
