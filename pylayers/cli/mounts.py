"""`pylayers mount`, `umount`, `commit` and `snapshots`."""

from __future__ import annotations

import os
import re
import subprocess

import click

from ..errors import FailedPrecondition, NotFound, PylayersError
from ..layers.repo import check_tag
from ..mounts import Kind, Snapshotter
from ..mounts.snapshotter import GC_ROOT_LABEL
from .app import cli, human, open_layers

MOUNTPOINT_LABEL = "pylayers.mountpoint"


def _run_mount(cmd: list[str]) -> None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise PylayersError(f"{cmd[0]} is not installed") from None
    if res.returncode != 0:
        err = (res.stderr or res.stdout).strip().splitlines()
        # Mount.command may wrap mount(8) in `sh -c 'cd DIR && exec mount ...'`
        shown = cmd[cmd.index("mount"):] if "mount" in cmd else cmd
        raise PylayersError(f"{' '.join(shown[:3])} failed: "
                            f"{err[-1] if err else res.returncode}")


def _unescape(field: bytes) -> bytes:
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def _is_mounted(target: str) -> bool:
    """Whether something is mounted at `target`. os.path.ismount compares device
    numbers, so it misses bind mounts within one file system (the copy driver's, and
    the overlay driver's view of a one-layer chain): ask the kernel's mount table."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            table = f.read()
    except OSError:
        return os.path.ismount(target)
    want = os.fsencode(target)
    return any(len(fields) > 4 and _unescape(fields[4]) == want
               for fields in (line.split(b" ") for line in table.splitlines()))


@cli.command()
@click.argument("ref")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--rw", is_flag=True, help="Writable (an active snapshot to commit later).")
@click.option("--driver", type=click.Choice(["overlay", "copy"]), help="Default: overlay "
              "where the kernel allows it, else copy.")
@click.pass_context
def mount(ctx: click.Context, ref: str, mountpoint: str, rw: bool, driver: str | None) -> None:
    """Mount layer REF at MOUNTPOINT; prints the snapshot key."""
    target = os.path.realpath(mountpoint)  # as the kernel's mount table shows it
    if not os.path.isdir(target):
        raise NotFound(f"{target}: no such directory")
    with open_layers(ctx, create=False) as layers:
        snaps = Snapshotter(layers, driver)
        key = ("rw-" if rw else "ro-") + os.urandom(6).hex()
        labels = {MOUNTPOINT_LABEL: target}
        make = snaps.prepare if rw else snaps.view
        mounts = make(key, ref, labels=labels)
        try:
            for m in mounts:
                _run_mount(m.command(target))
        except BaseException:
            snaps.remove(key)
            raise
        click.echo(key)


def _find_mounted(snaps: Snapshotter, target: str):
    for info in snaps.walk(labels={MOUNTPOINT_LABEL: target}):
        return info
    raise NotFound(f"nothing of this store is mounted at {target}")


@cli.command()
@click.argument("mountpoint", type=click.Path())
@click.option("--discard", is_flag=True, help="Also remove the snapshot and its changes.")
@click.pass_context
def umount(ctx: click.Context, mountpoint: str, discard: bool) -> None:
    """Unmount MOUNTPOINT; a writable snapshot is kept for `commit` unless --discard."""
    target = os.path.realpath(mountpoint)
    with open_layers(ctx, create=False) as layers:
        snaps = Snapshotter(layers)
        info = _find_mounted(snaps, target)
        if _is_mounted(target):
            _run_mount(["umount", target])
        if discard or info.kind == Kind.VIEW:
            snaps.remove(info.key)
        else:
            snaps.update(info.key, {MOUNTPOINT_LABEL: ""})
            click.echo(info.key)


@cli.command()
@click.argument("key")
@click.option("--tag", "-t", help="Tag the new layer.")
@click.option("-m", "--message", default="", help="A message kept with the layer.")
@click.option("--name", help="Name of the committed snapshot (default: the layer id).")
@click.pass_context
def commit(ctx: click.Context, key: str, tag: str | None, message: str,
           name: str | None) -> None:
    """Commit the writable snapshot KEY as a new layer; prints the layer id."""
    with open_layers(ctx, create=False) as layers:
        snaps = Snapshotter(layers)
        info = snaps.stat(key)
        # before touching its mount: a refusal changes nothing
        if info.kind != Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {key} is {info.kind.value}, not writable")
        if tag is not None:
            check_tag(tag)
        target = info.labels.get(MOUNTPOINT_LABEL)
        if target and _is_mounted(target):
            _run_mount(["umount", target])
        if target:
            snaps.update(key, {MOUNTPOINT_LABEL: ""})
        tmp_name = name or f"commit-{os.urandom(6).hex()}"
        # made by a person at the command line: keep it until they remove it
        layer_id = snaps.commit(tmp_name, key, message=message, tag=tag,
                                labels={GC_ROOT_LABEL: "cli"})
        if name is None:  # name the committed snapshot after its layer
            final = layer_id.hex()
            if snaps._get(final) is None:
                committed = snaps.stat(tmp_name)
                committed.key = final
                snaps._put(committed)
            snaps.store.delete("snapshots", tmp_name.encode())
        click.echo(layer_id.hex())


@cli.command()
@click.pass_context
def snapshots(ctx: click.Context) -> None:
    """List snapshots (active, view, committed) with their own sizes."""
    with open_layers(ctx, create=False) as layers:
        snaps = Snapshotter(layers)
        for info in sorted(snaps.walk(), key=lambda i: (i.kind.value, i.key)):
            try:
                u = snaps.usage(info.key)
                size = human(u.size)
            except PylayersError:
                size = "?"
            parent = info.parent or "-"
            where = info.labels.get(MOUNTPOINT_LABEL, "")
            click.echo(f"{info.key:<24} {info.kind.value:<9} {info.driver:<7} {size:>10}  "
                       f"parent={parent}  {where}".rstrip())
