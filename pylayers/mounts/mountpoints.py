"""Snapshots mounted at a directory and remembered there: what `pylayers mount`,
`umount` and `commit` do, as library calls.

`mount_ref` makes a view (or, writable, an active snapshot) of a layer, labels it with
its mount point (`pylayers.mountpoint`), and attaches it there (`mounting.attach`: a
real mount, or for a plain user with the copy driver a symbolic link).
`unmount_at` finds the snapshot by that label, detaches it, and removes a view (or,
with `discard`, an active snapshot). One lifecycle: mount, work, unmount, commit;
`release` refuses a commit of a snapshot still mounted, naming the mount point.
"""

from __future__ import annotations

import os

from ..errors import FailedPrecondition, InvalidArgument, NotFound, PylayersError
from .mounting import attach, canonical_target, detach, is_mounted, mount_count
from .snapshotter import Snapshotter
from .types import Info, Kind

MOUNTPOINT_LABEL = "pylayers.mountpoint"


def check_mountpoint(target: str, force: bool = False) -> None:
    """A mount point must be an existing empty directory that nothing is mounted on:
    mounting over files hides them, and a second mount stacks on the first (`force`
    allows both)."""
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


def mount_ref(snaps: Snapshotter, ref: str, mountpoint: str | os.PathLike[str], *,
              writable: bool = False, force: bool = False, driver: str | None = None) -> str:
    """Mount layer (or committed snapshot) `ref` at `mountpoint`: a view, or with
    `writable` an active snapshot to commit after `unmount_at`. Returns its key. On
    any failure nothing is left: no snapshot, nothing mounted."""
    target = canonical_target(mountpoint)
    check_mountpoint(target, force)
    key = ("rw-" if writable else "ro-") + os.urandom(6).hex()
    make = snaps.prepare if writable else snaps.view
    mounts = make(key, ref, labels={MOUNTPOINT_LABEL: target}, driver=driver)
    try:
        attach(mounts, target)
    except BaseException:
        snaps.remove(key)
        raise
    return key


def mounted_at(snaps: Snapshotter, mountpoint: str | os.PathLike[str]) -> Info:
    """The snapshot of this store mounted at `mountpoint` (NotFound if none)."""
    target = canonical_target(mountpoint)
    for info in snaps.walk(labels={MOUNTPOINT_LABEL: target}):
        return info
    raise NotFound(f"nothing of this store is mounted at {target}")


def _link_source(snaps: Snapshotter, info: Info) -> str | None:
    """The directory `attach` links a mount point to for this snapshot, if any."""
    try:
        mounts = snaps.mounts(info.key)
    except PylayersError:
        return None
    return mounts[0].source if len(mounts) == 1 and mounts[0].type == "bind" else None


def is_attached(snaps: Snapshotter, info: Info, target: str) -> bool:
    """Whether the snapshot `info` is still mounted (or linked) at `target`."""
    if is_mounted(target):
        return True
    source = _link_source(snaps, info)
    return source is not None and os.path.islink(target) and os.readlink(target) == source


def unmount_at(snaps: Snapshotter, mountpoint: str | os.PathLike[str], *,
               discard: bool = False) -> Info | None:
    """Unmount the snapshot mounted at `mountpoint` (where it still is: an unmount by
    hand is no error). A view is removed, and so is an active snapshot with `discard`;
    an active one is otherwise kept for commit, and returned."""
    target = canonical_target(mountpoint)
    info = mounted_at(snaps, target)
    if is_attached(snaps, info, target):
        detach(target, _link_source(snaps, info))
    if discard or info.kind == Kind.VIEW:
        snaps.remove(info.key)
        return None
    return snaps.update(info.key, {MOUNTPOINT_LABEL: ""})


def release(snaps: Snapshotter, key: str) -> Info:
    """Before committing `key`: refuse while it is still mounted (naming where, and
    what to run); forget a mount point it was unmounted from by hand."""
    info = snaps.stat(key)
    target = info.labels.get(MOUNTPOINT_LABEL)
    if not target:
        return info
    if is_attached(snaps, info, target):
        raise FailedPrecondition(f"snapshot {key} is mounted at {target}; run "
                                 f"`pylayers umount {target}` first")
    return snaps.update(key, {MOUNTPOINT_LABEL: ""})
