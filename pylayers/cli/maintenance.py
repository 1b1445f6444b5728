"""`pylayers init`, `du`, `gc` and `fsck`."""

from __future__ import annotations

import click

from ..chunking import DEFAULT_AVG, DEFAULT_MAX, DEFAULT_MIN, ChunkerParams
from ..errors import InvalidArgument
from ..store import Store, StoreConfig, default_store_path
from .app import Size, cli, emit_json, human, open_layers
from .progress import Progress, mode_of, progress_options

_LEVELS = click.IntRange(0, 22)  # zstd's levels; 0: stored uncompressed


@cli.command()
@click.option("--min-size", default=DEFAULT_MIN, type=Size(), show_default=True,
              help="Minimum chunk size (bytes, or with K, M, G).")
@click.option("--avg-size", default=DEFAULT_AVG, type=Size(), show_default=True,
              help="Target chunk size.")
@click.option("--max-size", default=DEFAULT_MAX, type=Size(), show_default=True,
              help="Maximum chunk size.")
@click.option("--compression-level", default=StoreConfig.compression_level, type=_LEVELS,
              show_default=True,
              help="zstd level, 0 to 22 (0: none).")
@click.pass_context
def init(ctx: click.Context, min_size: int, avg_size: int, max_size: int,
         compression_level: int) -> None:
    """Create a store. Chunk sizes are fixed for the store's life."""
    path = ctx.obj["store"] or default_store_path()
    try:  # at the door: a bad size is a usage error, before anything is created
        params = ChunkerParams(min_size, avg_size, max_size).validate()
    except InvalidArgument as e:
        raise click.UsageError(str(e)) from None
    Store.init(path, StoreConfig(params, compression_level))  # AlreadyExists if there is one
    click.echo(f"initialised store at {path}")


def _maintenance():
    from .. import maintenance  # mounts' and the build cache's imports: not for init
    return maintenance


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def du(ctx: click.Context, as_json: bool) -> None:
    """Logical bytes held against bytes on disk, and the dedup ratio."""
    with open_layers(ctx, create=False) as layers:
        usage = _maintenance().du(layers.store)
    if as_json:
        emit_json(usage.to_json())
        return
    click.echo(f"layers          {usage.layers}")
    click.echo(f"chunks          {usage.chunks}")
    click.echo(f"logical bytes   {usage.logical_bytes} ({human(usage.logical_bytes)}; "
               "file content of every layer's own entries)")
    click.echo(f"data bytes      {usage.data_bytes} ({human(usage.data_bytes)}; distinct "
               "file chunks, uncompressed)")
    click.echo(f"manifest bytes  {usage.manifest_bytes} ({human(usage.manifest_bytes)}; "
               "metadata)")
    click.echo(f"stored bytes    {usage.stored_bytes} ({human(usage.stored_bytes)} on disk)")
    click.echo(f"  packs         {usage.pack_bytes} ({human(usage.pack_bytes)}; chunks, "
               "compressed)")
    click.echo(f"  index         {usage.index_bytes} ({human(usage.index_bytes)}; "
               "mostly fixed overhead on a small store)")
    click.echo(f"  caches        {usage.cache_bytes} ({human(usage.cache_bytes)}; "
               "rebuilt on demand)")
    click.echo(f"  other         {usage.other_bytes} ({human(usage.other_bytes)})")
    click.echo(f"dedup ratio     {usage.dedup_ratio} (logical / data bytes)")
    click.echo(f"compression     {usage.compression_ratio} (chunk bytes / pack bytes)")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@progress_options
@click.pass_context
def gc(ctx: click.Context, as_json: bool, progress_lines: bool, quiet: bool) -> None:
    """Delete what nothing needs: unreferenced committed snapshots, chunks no layer
    needs, stale build-cache keys and driver caches; waits for running snapshots."""
    with open_layers(ctx, create=False, exclusive=True) as layers:
        progress = Progress("gc", mode_of(progress_lines, quiet), unit="steps")
        try:
            res = _maintenance().gc(layers.store, progress=progress.stage)
        finally:
            progress.close()
    if as_json:
        emit_json(res.to_json())
        return
    click.echo(f"removed {len(res.snapshots)} unreferenced snapshots, {len(res.layers)} "
               f"layers, {res.cache_keys} build cache keys, {res.image_configs} image "
               f"configs, {res.cache_dirs} cached layer "
               f"directories, {res.chunks} chunks, {res.packs_removed} packs; "
               f"rewrote {res.packs_rewritten} packs; freed {human(res.bytes_freed)}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@progress_options
@click.pass_context
def fsck(ctx: click.Context, as_json: bool, progress_lines: bool, quiet: bool) -> None:
    """Verify every chunk, manifest and reference; exit 1 listing what is damaged."""
    with open_layers(ctx, create=False) as layers:
        progress = Progress("fsck", mode_of(progress_lines, quiet), unit="steps")
        try:
            report = _maintenance().fsck(layers.store, progress=progress.stage)
        finally:
            progress.close()
    if as_json:
        emit_json(report.to_json())
        if not report.ok:
            ctx.exit(1)
        return
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    for line in report.damaged:
        click.echo(f"damaged: {line}")
    if not quiet:
        click.echo(f"checked {report.chunks_checked} chunks, {report.layers_checked} layers, "
                   f"{report.snapshots_checked} snapshots: "
                   + ("ok" if report.ok else f"{len(report.damaged)} problems"), err=True)
    if not report.ok:
        ctx.exit(1)
