"""`pylayers init`, `du`, `gc` and `fsck`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..chunking import DEFAULT_AVG, DEFAULT_MAX, DEFAULT_MIN, ChunkerParams
from ..errors import AlreadyExists
from ..layers import maintenance as m
from ..mounts import Snapshotter
from ..mounts.registry import collect_driver_caches, driver_cache_bytes
from ..store import Store, StoreConfig, default_store_path
from .app import cli, human, open_layers


@cli.command()
@click.option("--min-size", default=DEFAULT_MIN, show_default=True, help="Minimum chunk size.")
@click.option("--avg-size", default=DEFAULT_AVG, show_default=True, help="Target chunk size.")
@click.option("--max-size", default=DEFAULT_MAX, show_default=True, help="Maximum chunk size.")
@click.option("--compression-level", default=2, show_default=True, help="zstd level (0: none).")
@click.pass_context
def init(ctx: click.Context, min_size: int, avg_size: int, max_size: int,
         compression_level: int) -> None:
    """Create a store. Chunk sizes are fixed for the store's life."""
    path = ctx.obj["store"] or default_store_path()
    if (Path(path) / "config.json").exists():
        raise AlreadyExists(f"a store exists at {path}")
    cfg = StoreConfig(ChunkerParams(min_size, avg_size, max_size).validate(), compression_level)
    Store.open(path, config=cfg).close()
    click.echo(f"initialised store at {path}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def du(ctx: click.Context, as_json: bool) -> None:
    """Logical bytes held, bytes on disk, and the dedup ratio."""
    with open_layers(ctx, create=False) as layers:
        usage = m.disk_usage(layers.store)
        # materialised layers and the file cache live under the store: rebuildable
        usage["cache_bytes"] = driver_cache_bytes(layers)
    if as_json:
        click.echo(json.dumps(usage, indent=2))
        return
    click.echo(f"layers          {usage['layers']}")
    click.echo(f"chunks          {usage['chunks']}")
    click.echo(f"logical bytes   {usage['logical_bytes']} ({human(usage['logical_bytes'])})")
    click.echo(f"stored bytes    {usage['stored_bytes']} ({human(usage['stored_bytes'])})")
    click.echo(f"dedup ratio     {usage['dedup_ratio']}")
    click.echo(f"caches          {usage['cache_bytes']} ({human(usage['cache_bytes'])}; "
               "included in stored bytes; rebuilt on demand)")


@cli.command()
@click.pass_context
def gc(ctx: click.Context) -> None:
    """Delete chunks no layer needs; waits for running snapshots to finish."""
    with open_layers(ctx, create=False, exclusive=True) as layers:
        snaps = Snapshotter(layers).collect()
        res = m.gc(layers.store)
        cache_freed = collect_driver_caches(layers, set(layers.all_ids()))
    click.echo(f"removed {len(snaps)} unreferenced snapshots, {res.chunks_removed} chunks, "
               f"{res.packs_removed} packs; rewrote {res.packs_rewritten} packs; freed "
               f"{human(res.bytes_freed + cache_freed)}")


@cli.command()
@click.pass_context
def fsck(ctx: click.Context) -> None:
    """Verify every chunk, manifest and reference; exit 1 listing what is damaged."""
    with open_layers(ctx, create=False) as layers:
        report = m.fsck(layers.store)
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    for line in report.damaged:
        click.echo(f"damaged: {line}")
    click.echo(f"checked {report.chunks_checked} chunks, {report.layers_checked} layers: "
               + ("ok" if report.ok else f"{len(report.damaged)} problems"), err=True)
    if not report.ok:
        ctx.exit(1)
