"""`pylayers mount`, `umount` and `commit` (`snapshots` is in snapshots.py)."""

from __future__ import annotations

import click

from ..errors import FailedPrecondition
from ..layers.presize import directory_bytes
from ..layers.repo import check_tag
from ..mounts import Kind, Snapshotter, driver_names
from ..mounts.mountpoints import mount_ref, release, unmount_at
from ..mounts.snapshotter import GC_ROOT_LABEL
from .app import cli, open_layers
from .progress import Progress, mode_of, progress_options


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
    """Mount layer REF at MOUNTPOINT, an empty directory; prints the snapshot key.

    Without the privilege to mount (a plain user: the copy driver), MOUNTPOINT becomes
    a symbolic link to the snapshot's directory; `umount` puts the empty directory
    back."""
    with open_layers(ctx, create=False) as layers:
        click.echo(mount_ref(Snapshotter(layers), ref, mountpoint, writable=rw,
                             force=force, driver=driver))


@cli.command()
@click.argument("mountpoint", type=click.Path())
@click.option("--discard", is_flag=True, help="Also remove the snapshot and its changes.")
@click.pass_context
def umount(ctx: click.Context, mountpoint: str, discard: bool) -> None:
    """Unmount MOUNTPOINT; a writable snapshot is kept for `commit` unless --discard."""
    with open_layers(ctx, create=False) as layers:
        kept = unmount_at(Snapshotter(layers), mountpoint, discard=discard)
    if kept is not None:
        click.echo(kept.key)


@cli.command()
@click.argument("key")
@click.option("--tag", "-t", help="Tag the new layer.")
@click.option("-m", "--message", default="", help="A message kept with the layer.")
@click.option("--name", help="Name of the committed snapshot (default: the layer id).")
@progress_options
@click.pass_context
def commit(ctx: click.Context, key: str, tag: str | None, message: str,
           name: str | None, progress_lines: bool, quiet: bool) -> None:
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
        release(snaps, key)  # one lifecycle: mount, work, umount, then commit
        # made by a person at the command line: keep it until they remove it; named
        # after its layer unless --name says otherwise
        content = snaps.content_dir(key)
        progress = Progress("commit", mode_of(progress_lines, quiet),
                            total_fn=lambda: directory_bytes(content))
        try:
            layer_id = snaps.commit(name, key, message=message, tag=tag,
                                    labels={GC_ROOT_LABEL: "cli"}, progress=progress)
        finally:
            progress.close()
        click.echo(layer_id.hex())
