"""`pylayers log`, `show`, `ls` and `cat`."""

from __future__ import annotations

import stat as st
import sys
import time

import click

from ..errors import InvalidArgument, NotFound
from ..layers.manifest import BLK, CHR, DIR, HARDLINK, KIND_NAMES, SYMLINK, Entry
from .app import cli, display_bytes, display_path, human, open_layers


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


@cli.command()
@click.argument("ref")
@click.pass_context
def log(ctx: click.Context, ref: str) -> None:
    """REF and its ancestors, newest first."""
    with open_layers(ctx, create=False) as layers:
        tags: dict[bytes, list[str]] = {}
        for name, lid in layers.tags().items():
            tags.setdefault(lid, []).append(name)
        for lid in layers.chain(layers.resolve(ref)):
            rec = layers.record(lid)
            names = ",".join(sorted(tags.get(lid, [])))
            click.echo(f"{lid.hex()}  {_when(rec.created)}  {rec.entries:>6} entries  "
                       f"{human(rec.file_bytes):>10}  {names:<12}  {rec.message}".rstrip())


@cli.command()
@click.argument("ref")
@click.pass_context
def show(ctx: click.Context, ref: str) -> None:
    """Details of one layer."""
    with open_layers(ctx, create=False) as layers:
        lid = layers.resolve(ref)
        rec = layers.record(lid)
        names = sorted(n for n, v in layers.tags().items() if v == lid)
        click.echo(f"layer     {lid.hex()}")
        click.echo(f"parent    {rec.parent.hex() if rec.parent else '-'}")
        click.echo(f"created   {_when(rec.created)}")
        click.echo(f"tags      {', '.join(names) or '-'}")
        click.echo(f"entries   {rec.entries}")
        click.echo(f"files     {rec.file_bytes} bytes ({human(rec.file_bytes)})")
        click.echo(f"new       {rec.new_bytes} bytes stored by this layer")
        click.echo(f"manifest  {sum(n for _, n in rec.manifest)} bytes in "
                   f"{len(rec.manifest)} chunks")
        click.echo(f"message   {rec.message}")


def _mode_string(e: Entry) -> str:
    return st.filemode(e.file_type_bits() | e.mode)


def _find(tree: list[Entry], path: str) -> Entry:
    want = path.strip("/").encode("utf-8", "surrogateescape")
    for e in tree:
        if e.path == want:
            return e
    raise NotFound(f"/{want.decode(errors='replace')}: no such path in the layer")


@cli.command(name="ls")
@click.argument("ref")
@click.argument("path", default="/")
@click.pass_context
def ls_(ctx: click.Context, ref: str, path: str) -> None:
    """List a directory of REF's tree (or one entry)."""
    with open_layers(ctx, create=False) as layers:
        tree = layers.tree(layers.resolve(ref))
        target = _find(tree, path)
        if target.kind == DIR:
            prefix = target.path + b"/" if target.path else b""
            rows = [e for e in tree if e.path.startswith(prefix) and e.path != target.path
                    and b"/" not in e.path[len(prefix):]]
        else:
            rows = [target]
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
@click.argument("ref")
@click.argument("path")
@click.pass_context
def cat(ctx: click.Context, ref: str, path: str) -> None:
    """Write a file of REF's tree to stdout."""
    with open_layers(ctx, create=False) as layers:
        tree = layers.tree(layers.resolve(ref))
        e = _find(tree, path)
        if e.kind == HARDLINK:
            e = _find(tree, "/" + e.target.decode("utf-8", "surrogateescape"))
        if e.kind != 1:
            raise InvalidArgument(f"{display_path(e.path)} is a {KIND_NAMES[e.kind]}, "
                                  "not a regular file")
        out = sys.stdout.buffer
        for cid, _ in e.chunk_list():
            out.write(layers.store.read_chunk(cid))
        out.flush()
