"""`pylayers mount`, `umount` and `commit` (`snapshots` is in snapshots.py)."""

from __future__ import annotations

import os

import click

from ..errors import FailedPrecondition, InvalidArgument, NotFound, PylayersError
from ..layers.repo import check_tag
from ..mounts import Kind, Snapshotter, attach, detach, driver_names, is_mounted
from ..mounts.mounting import canonical_target, mount_count
from ..mounts.snapshotter import GC_ROOT_LABEL
from .app import cli, open_layers

MOUNTPOINT_LABEL = "pylayers.mountpoint"


def _check_mountpoint(target: str, force: bool) -> None:
    """A mount point must be an empty directory that nothing is mounted on: mounting
    over files hides them, and a second mount stacks on the first (--force allows
    both)."""
    if not os.path.isdir(target):
        raise NotFound(f"{target}: no such directory")
    if force:
        return
    if mount_count(target):
        raise FailedPrecondition(f"{target} is already a mount point (use --force to "
                                 "mount over it)")
    try:
        busy = any(os.scandir(target))
    except OSError as err:
        raise InvalidArgument(f"cannot read {target}: {err.strerror}") from None
    if busy:
        raise FailedPrecondition(f"{target} is not empty (use --force to mount over "
                                 "what it holds)")


@cli.command()
@click.argument("ref")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--rw", is_flag=True, help="Writable (an active snapshot to commit later).")
@click.option("--driver", type=click.Choice(driver_names()), help="Default: overlay "
              "where this process can mount overlayfs, else copy.")
@click.option("--force", is_flag=True, help="Mount even over a non-empty directory or "
              "an existing mount point.")
@click.pass_context
def mount(ctx: click.Context, ref: str, mountpoint: str, rw: bool, driver: str | None,
          force: bool) -> None:
    """Mount layer REF at MOUNTPOINT; prints the snapshot key.

    Without the privilege to mount (a plain user: the copy driver), MOUNTPOINT, an
    empty directory, becomes a symbolic link to the snapshot's directory; `umount`
    puts the empty directory back."""
    target = canonical_target(mountpoint)  # as the kernel's mount table shows it
    _check_mountpoint(target, force)
    with open_layers(ctx, create=False) as layers:
        snaps = Snapshotter(layers, driver)
        key = ("rw-" if rw else "ro-") + os.urandom(6).hex()
        labels = {MOUNTPOINT_LABEL: target}
        make = snaps.prepare if rw else snaps.view
        mounts = make(key, ref, labels=labels)
        try:
            attach(mounts, target)
        except BaseException:
            snaps.remove(key)
            raise
        click.echo(key)


def _find_mounted(snaps: Snapshotter, target: str):
    for info in snaps.walk(labels={MOUNTPOINT_LABEL: target}):
        return info
    raise NotFound(f"nothing of this store is mounted at {target}")


def _link_source(snaps: Snapshotter, info) -> str | None:
    """The directory `attach` links a mount point to for this snapshot, if any."""
    try:
        mounts = snaps.mounts(info.key)
    except PylayersError:
        return None
    return mounts[0].source if len(mounts) == 1 and mounts[0].type == "bind" else None


def _attached(snaps: Snapshotter, info, target: str) -> bool:
    """Whether the snapshot `info` is still mounted (or linked) at `target`."""
    if is_mounted(target):
        return True
    source = _link_source(snaps, info)
    return source is not None and os.path.islink(target) and os.readlink(target) == source


@cli.command()
@click.argument("mountpoint", type=click.Path())
@click.option("--discard", is_flag=True, help="Also remove the snapshot and its changes.")
@click.pass_context
def umount(ctx: click.Context, mountpoint: str, discard: bool) -> None:
    """Unmount MOUNTPOINT; a writable snapshot is kept for `commit` unless --discard."""
    target = canonical_target(mountpoint)
    with open_layers(ctx, create=False) as layers:
        snaps = Snapshotter(layers)
        info = _find_mounted(snaps, target)
        if _attached(snaps, info, target):  # else unmounted by hand: nothing to undo
            detach(target, _link_source(snaps, info))
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
            what = "a view" if info.kind == Kind.VIEW else info.kind.value
            raise FailedPrecondition(f"snapshot {key} is {what}, not writable")
        if tag is not None:
            check_tag(tag)
        target = info.labels.get(MOUNTPOINT_LABEL)
        if target:  # one lifecycle: mount, work, umount, then commit
            if _attached(snaps, info, target):
                raise FailedPrecondition(f"snapshot {key} is mounted at {target}; run "
                                         f"`pylayers umount {target}` first")
            snaps.update(key, {MOUNTPOINT_LABEL: ""})  # unmounted by hand
        # made by a person at the command line: keep it until they remove it; named
        # after its layer unless --name says otherwise
        layer_id = snaps.commit(name, key, message=message, tag=tag,
                                labels={GC_ROOT_LABEL: "cli"})
        click.echo(layer_id.hex())
