"""`push` and `pull`: images to and from OCI registries (the distribution API)."""

from __future__ import annotations

import sys
import time

import click

from ..oci.auth import find_credentials
from ..oci.config import for_ref
from ..oci.importer import DEFAULT_MAX_LAYER_SIZE
from ..oci.reference import parse_reference
from ..oci.registry import DEFAULT_CHUNK
from ..oci.registry_transfer import pull_image, push_image
from .app import Size, cli, emit_json, human, open_layers, ref_param, tag_param
from .progress import LINES, Progress, mode_of, progress_options


def registry_options(f):
    f = click.option("--ca-file", type=click.Path(dir_okay=False), envvar="PYLAYERS_REGISTRY_CA",
                     help="Trust this CA certificate (PEM) for the registry's TLS "
                          "(default: $PYLAYERS_REGISTRY_CA).")(f)
    f = click.option("--user", "-u", metavar="USER[:PASS]",
                     help="Log in as USER (password after ':' or from "
                          "$PYLAYERS_REGISTRY_PASSWORD); default: $PYLAYERS_REGISTRY_USER, "
                          "else docker's config.json.")(f)
    return click.option("--insecure", is_flag=True,
                        help="Allow plain HTTP and skip TLS certificate checks.")(f)


def _reference(text: str):
    try:
        return parse_reference(text)
    except Exception as e:  # a UsageError: click's form of it
        raise click.BadParameter(str(e)) from None


class _Stages:
    """Progress of a transfer: a bar (or lines) per stage with bytes (upload,
    download); a stage without a byte count (export) gets one line when it ends."""

    def __init__(self, label: str, mode: str) -> None:
        self.label = label
        self.mode = mode
        self.bar: Progress | None = None
        self.stage = ""
        self.started = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.close()
            self.stage = stage
            self.started = time.monotonic()
            if not total and not done:
                return
            self.bar = Progress(f"{self.label}: {stage}", self.mode, total=total or None)
        if self.bar is None:
            return
        self.bar.total = total or None
        self.bar(done - self.bar.done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.stage and self.mode == LINES:
            click.echo(f"{self.label}: {self.stage}: done in "
                       f"{time.monotonic() - self.started:.1f} s", err=True)
        self.stage = ""


@cli.command()
@click.argument("ref", callback=ref_param)
@click.argument("dest")
@registry_options
@click.option("--compression", type=click.Choice(["none", "gzip", "zstd"]),
              default="gzip", show_default=True)
@click.option("--source-date-epoch", type=int, envvar="SOURCE_DATE_EPOCH",
              help="Clamp mtimes to this time and use it as the image's creation time.")
@click.option("--chunk-size", type=Size(), default=str(DEFAULT_CHUNK >> 20) + "M",
              show_default=True, help="Upload blobs larger than this in chunks of this size.")
@click.option("--chunks/--no-chunks", default=False, show_default=True,
              help="Also push the chunk artifact: pylayers pulls of the image then fetch "
                   "only the chunks they lack.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@progress_options
@click.pass_context
def push(ctx: click.Context, ref: str, dest: str, insecure: bool, user: str | None,
         ca_file: str | None, compression: str, source_date_epoch: int | None,
         chunk_size: int, chunks: bool, as_json: bool, progress_lines: bool,
         quiet: bool) -> None:
    """Push REF and its ancestors to DEST, REGISTRY/REPO:TAG, as an OCI image (the
    blobs of `export oci:`). Blobs the repository has are not sent again; those seen
    in another repository of the registry are mounted. Prints the manifest's digest."""
    target = _reference(dest)
    if target.digest is not None:
        raise click.BadParameter("push to a tag, not a digest", param_hint="'DEST'")
    if chunk_size <= 0:
        raise click.BadParameter("must be positive", param_hint="'--chunk-size'")
    creds = find_credentials(target.host, user)
    stages = _Stages("push", mode_of(progress_lines, quiet))
    with open_layers(ctx, create=False) as layers:
        lid, config = for_ref(layers, ref)
        try:
            res = push_image(layers, lid, target, insecure=insecure, credentials=creds,
                             ca_file=ca_file, compression=compression,
                             source_date_epoch=source_date_epoch, chunk_size=chunk_size,
                             progress=stages, chunks=chunks, config=config)
        finally:
            stages.close()
    if as_json:
        emit_json(res.to_json())
        return
    if not quiet:
        print(f"{res.reference}: {res.uploaded} blob{'' if res.uploaded == 1 else 's'} uploaded "
              f"({human(res.counters['blob_bytes_sent'])}), {res.mounted} mounted, "
              f"{res.present} already there; manifest "
              f"{'pushed' if res.manifest_pushed else 'unchanged'}"
              + (f"; chunk artifact: {res.chunks['blobs_sent']} of {res.chunks['blobs']} "
                 "blobs sent" if res.chunks else ""), file=sys.stderr)
    click.echo(res.manifest_digest)


@cli.command()
@click.argument("source")
@click.option("-t", "--tag", callback=tag_param, help="Tag the top layer.")
@registry_options
@click.option("--platform", metavar="OS/ARCH[/VARIANT]",
              help="From an index, the image for this platform (default: this machine's).")
@click.option("--max-layer-size", type=Size(), default=f"{DEFAULT_MAX_LAYER_SIZE >> 30}G",
              show_default=True, help="Refuse a layer larger than this uncompressed.")
@click.option("--chunks/--no-chunks", default=True, show_default=True,
              help="Pull through the image's chunk artifact when the registry has one.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@progress_options
@click.pass_context
def pull(ctx: click.Context, source: str, tag: str | None, insecure: bool, user: str | None,
         ca_file: str | None, platform: str | None, max_layer_size: int, chunks: bool,
         as_json: bool, progress_lines: bool, quiet: bool) -> None:
    """Pull SOURCE, REGISTRY/REPO[:TAG|@DIGEST], into layers (one per image layer; the
    config kept beside the top one). Prints each layer id, the top one last."""
    ref = _reference(source)
    creds = find_credentials(ref.host, user)
    stages = _Stages("pull", mode_of(progress_lines, quiet))
    with open_layers(ctx) as layers:
        try:
            res = pull_image(layers, ref, tag=tag, platform=platform, insecure=insecure,
                             credentials=creds, ca_file=ca_file,
                             max_layer_size=max_layer_size, progress=stages,
                             chunks=chunks)
        finally:
            stages.close()
    if as_json:
        emit_json(res.to_json())
        return
    if not quiet:
        print(f"{res.reference}: {res.fetched} layer{'' if res.fetched == 1 else 's'} fetched "
              f"({human(res.counters['blob_bytes_received'])}), {res.reused} already "
              f"in the store" + (f", {res.resumed} resumed" if res.resumed else "")
              + (f"; through the chunk artifact: {res.chunks['chunks_fetched']} chunks "
                 "fetched" if res.chunks else ""), file=sys.stderr)
    for lid in res.layers:
        click.echo(lid.hex())
