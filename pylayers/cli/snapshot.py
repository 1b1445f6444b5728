"""`pylayers snapshot` and `pylayers checkout`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..layers import walkahead
from ..layers.ignore import Exclusions
from ..layers.presize import directory_bytes, tree_bytes
from .app import cli, human, open_layers, ref_param, tag_param, warn
from .progress import Progress, mode_of, progress_options


@cli.command()
@click.argument("directory", type=click.Path())
@click.option("--parent", "-p", callback=ref_param,
              help="Store only what differs from this layer.")
@click.option("--tag", "-t", callback=tag_param, help="Tag the new layer.")
@click.option("-m", "--message", default="", help="A message kept with the layer.")
@click.option("--allow-changing", is_flag=True,
              help="Store a file that keeps changing while read as last read (a warning "
                   "and exit status 1, as tar) instead of failing.")
@click.option("--exclude", "-x", "patterns", multiple=True, metavar="PATTERN",
              help="Leave out paths matching PATTERN (as in .dockerignore; repeatable), "
                   "after DIRECTORY/.pylayersignore's patterns.")
@progress_options
@click.pass_context
def snapshot(ctx: click.Context, directory: str, parent: str | None, tag: str | None,
             message: str, allow_changing: bool, patterns: tuple[str, ...],
             progress_lines: bool, quiet: bool) -> None:
    """Snapshot DIRECTORY into a new layer; prints its id as the last line. Paths
    matching DIRECTORY/.pylayersignore or --exclude are left out, and so is the store
    when it lies inside DIRECTORY."""
    exclude = Exclusions.for_directory(directory, patterns)  # a bad pattern: usage error
    with open_layers(ctx) as layers:
        parent_id = layers.resolve(parent) if parent is not None else None
        progress = Progress("snapshot", mode_of(progress_lines, quiet),
                            total_fn=lambda: directory_bytes(directory))
        try:
            res = layers.snapshot(directory, parent_id, tag, message, progress,
                                  allow_changing=allow_changing, exclude=exclude,
                                  ahead=walkahead.take(directory))
        finally:
            progress.close()
        warn(res.stats.warnings)
        s = res.stats
        if quiet:
            pass
        elif s.unchanged_since is not None:
            print(f"{res.entries} entries; directory unchanged since layer "
                  f"{s.unchanged_since.hex()[:12]} (nothing read)", file=sys.stderr)
        else:
            print(f"{res.entries} entries, {s.files} files, {human(s.bytes_total)}; "
                  f"read {human(s.bytes_read)}, new bytes {human(s.new_bytes)}"
                  + (" (layer existed)" if res.existed else ""), file=sys.stderr)
        click.echo(res.layer_id.hex())
        if s.changed:  # stored, but not as any one version of those files
            ctx.exit(1)


@cli.command()
@click.argument("ref", callback=ref_param)
@click.argument("dest", type=click.Path())
@click.option("--link", is_flag=True,
              help="Regular files as hardlinks into the store's checkout cache (written "
                   "there once): much faster again, for READ-ONLY use (editing a file in "
                   "place changes every linked copy). DEST must be on the store's file "
                   "system.")
@progress_options
@click.pass_context
def checkout(ctx: click.Context, ref: str, dest: str, link: bool, progress_lines: bool,
             quiet: bool) -> None:
    """Write the full tree of REF into DEST (which must not exist, or be empty)."""
    with open_layers(ctx, create=False) as layers:
        layer_id = layers.resolve(ref)
        progress = Progress("checkout", mode_of(progress_lines, quiet))
        if progress.wanted:
            progress.total = tree_bytes(layers.tree(layer_id))  # the checkout reuses it
        try:
            layers.checkout(layer_id, Path(dest), progress, link=link, reader_process=True)
        finally:
            progress.close()
