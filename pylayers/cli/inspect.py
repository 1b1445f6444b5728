"""`pylayers log`, `layers`, `show`, `ls` and `cat`."""

from __future__ import annotations

import stat as st
import sys
import time

import click

from ..errors import InvalidArgument
from ..layers.catalog import LayerInfo, file_entry, history, list_dir, list_layers
from ..layers.manifest import BLK, CHR, HARDLINK, KIND_NAMES, REG, SYMLINK, Entry
from .app import (
    cli,
    display_bytes,
    display_path,
    emit_json,
    human,
    open_layers,
    path_json,
    ref_param,
)

JSON_OPTION = click.option("--json", "as_json", is_flag=True,
                           help="Machine-readable output (docs/cli.md).")


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _row(i: LayerInfo, with_parent: bool) -> str:
    parent = (i.parent.hex()[:12] if i.parent else "-") if with_parent else ""
    names = ",".join(i.tags) or "-"
    cols = [i.id.hex()[:16] if with_parent else i.id.hex()]
    if with_parent:
        cols.append(f"{parent:<12}")
    cols += [_when(i.created), f"{i.entries:>6} entries", f"{human(i.new_bytes):>10} new",
             f"{names:<12}", i.message]
    return "  ".join(cols).rstrip()


@cli.command()
@click.argument("ref", callback=ref_param)
@JSON_OPTION
@click.pass_context
def log(ctx: click.Context, ref: str, as_json: bool) -> None:
    """REF and its ancestors, newest first."""
    with open_layers(ctx, create=False) as layers:
        infos = history(layers, layers.resolve(ref))
    if as_json:
        emit_json([i.to_json() for i in infos])
        return
    for i in infos:
        click.echo(_row(i, False))


@cli.command(name="layers")
@JSON_OPTION
@click.pass_context
def layers_(ctx: click.Context, as_json: bool) -> None:
    """Every layer, tagged or not, newest first: id, parent, date, entries, new bytes,
    tags and message."""
    with open_layers(ctx, create=False) as layers:
        infos = list_layers(layers)
    if as_json:
        emit_json([i.to_json() for i in infos])
        return
    for i in infos:
        click.echo(_row(i, True))


@cli.command()
@click.argument("ref", callback=ref_param)
@JSON_OPTION
@click.pass_context
def show(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Details of one layer."""
    with open_layers(ctx, create=False) as layers:
        i = history(layers, layers.resolve(ref))[0]
    if as_json:
        emit_json(i.to_json())
        return
    click.echo(f"layer      {i.id.hex()}")
    click.echo(f"parent     {i.parent.hex() if i.parent else '-'}")
    click.echo(f"created    {_when(i.created)}")
    click.echo(f"tags       {', '.join(i.tags) or '-'}")
    click.echo(f"entries    {i.entries}")
    click.echo(f"files      {i.file_bytes} bytes ({human(i.file_bytes)}) of file content")
    click.echo(f"new bytes  {i.new_bytes} ({human(i.new_bytes)}) added to the store by "
               "this layer, before compression")
    click.echo(f"manifest   {i.manifest_bytes} bytes in {i.manifest_chunks} chunks")
    click.echo(f"message    {i.message}")


def _mode_string(e: Entry) -> str:
    return st.filemode(e.file_type_bits() | e.mode)


def _entry_json(e: Entry) -> dict:
    d = path_json(e.path)
    d.update({"kind": KIND_NAMES[e.kind], "mode": e.mode, "uid": e.uid, "gid": e.gid,
              "size": e.size, "mtime_ns": e.mtime_ns})
    if e.kind == SYMLINK:
        d.update(path_json(e.target, "target", root=False))
    elif e.kind == HARDLINK:
        d.update(path_json(e.target, "target"))
    elif e.kind in (CHR, BLK):
        d["rdev"] = list(e.rdev)
    if e.xattrs:
        d["xattrs"] = [path_json(k, "name", root=False) for k, _ in e.xattrs]
    return d


@cli.command(name="ls")
@click.argument("ref", callback=ref_param)
@click.argument("path", default="/")
@JSON_OPTION
@click.pass_context
def ls_(ctx: click.Context, ref: str, path: str, as_json: bool) -> None:
    """List a directory of REF's tree (or one entry)."""
    with open_layers(ctx, create=False) as layers:
        rows = list_dir(layers, layers.resolve(ref), path)
    if as_json:
        emit_json([_entry_json(e) for e in rows])
        return
    for e in rows:
        extra = ""
        if e.kind == SYMLINK:
            extra = " -> " + display_bytes(e.target)
        elif e.kind == HARDLINK:
            extra = " link to " + display_path(e.target)
        size = f"{e.rdev[0]},{e.rdev[1]}" if e.kind in (CHR, BLK) else str(e.size)
        click.echo(f"{_mode_string(e)} {e.uid:>5} {e.gid:>5} {size:>12} "
                   f"{_when(e.mtime_ns / 1e9)} {display_path(e.path)}{extra}")


@cli.command()
@click.argument("ref", callback=ref_param)
@click.argument("path")
@click.pass_context
def cat(ctx: click.Context, ref: str, path: str) -> None:
    """Write a file of REF's tree to stdout."""
    with open_layers(ctx, create=False) as layers:
        e = file_entry(layers, layers.resolve(ref), path)
        if e.kind != REG:
            raise InvalidArgument(f"{display_path(e.path)} is a {KIND_NAMES[e.kind]}, "
                                  "not a regular file")
        out = sys.stdout.buffer
        out.write(e.data)  # a small file's content is in its entry (no chunks)
        for cid, _ in e.chunk_list():
            out.write(layers.store.read_chunk(cid))
        out.flush()
