"""`import` and `export`: OCI image layouts, docker archives and layer tarballs."""

from __future__ import annotations

import click

from ..oci import DEFAULT_MAX_LAYER_SIZE, export_image, import_source
from ..oci.config import for_ref
from .app import cli, open_layers
from .progress import Progress


def _size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in units and t[-1:] else ""
    try:
        return int(t[: len(t) - len(unit)]) * units[unit]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size (e.g. 512M, 64G)") from None


@cli.command("import")
@click.argument("source")
@click.option("-t", "--tag", help="Tag the top layer.")
@click.option("--parent", help="Apply a single layer tarball onto this layer.")
@click.option("--max-layer-size", default=f"{DEFAULT_MAX_LAYER_SIZE >> 30}G",
              show_default=True, help="Refuse a layer larger than this uncompressed.")
@click.pass_context
def import_cmd(ctx: click.Context, source: str, tag: str | None, parent: str | None,
               max_layer_size: str) -> None:
    """Import SOURCE: oci:DIR[:REF], docker-archive:FILE[:NAME:TAG], or a layer
    tarball (.tar, .tar.gz, .tar.zst). Prints each layer id, the top one last."""
    limit = _size(max_layer_size)
    progress = Progress("import")
    with open_layers(ctx) as layers:
        parent_id = layers.resolve(parent) if parent is not None else None
        try:
            res = import_source(layers, source, tag, parent_id, limit, progress)
        finally:
            progress.close()
    for lid in res.layers:
        click.echo(lid.hex())


@cli.command("export")
@click.argument("ref")
@click.argument("dest")
@click.option("--compression", type=click.Choice(["none", "gzip", "zstd"]),
              default="gzip", show_default=True)
@click.option("--source-date-epoch", type=int, envvar="SOURCE_DATE_EPOCH",
              help="Clamp mtimes to this time and use it as the image's creation time.")
@click.pass_context
def export_cmd(ctx: click.Context, ref: str, dest: str, compression: str,
               source_date_epoch: int | None) -> None:
    """Export REF and its ancestors to DEST: oci:DIR[:TAG] or
    docker-archive:FILE[:NAME:TAG]. Prints the image manifest's digest."""
    with open_layers(ctx) as layers:
        lid, config = for_ref(layers, ref)
        res = export_image(layers, lid, dest, compression, source_date_epoch, config=config)
    click.echo(res.manifest_digest)
