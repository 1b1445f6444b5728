"""Performing mounts: `mount_all` (containerd's `mount.All`), `unmount`, `is_mounted`,
and `attach`/`detach`, which also serve a process that may not mount at all.

`is_mounted` reads the kernel's mount table (/proc/self/mountinfo): os.path.ismount
compares device numbers, so it misses bind mounts within one file system (the copy
driver's, and the overlay driver's view of a one-layer chain).

Without the privilege to mount (a plain user outside a user namespace), a lone bind
mount of a directory, which is what the copy driver hands out, is *attached* by
making the target a symbolic link to that directory: reading and writing through the
target then reaches the snapshot, as a bind mount would, though nothing enforces a
view's read-only-ness. `detach` undoes either.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Literal

from .. import userns
from ..errors import FailedPrecondition, InvalidArgument, PylayersError
from .types import Mount, run_tool

MOUNTINFO = "/proc/self/mountinfo"


def _unescape(field: bytes) -> bytes:
    """A mountinfo field as the kernel escaped it (space, tab, newline and backslash as
    three-digit octal: `\\040`, `\\011`, `\\012`, `\\134`) back to its bytes."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def mount_points(mountinfo: bytes | None = None) -> list[bytes]:
    """Every mount point of this process's mount namespace, in mount order (a point
    mounted over twice appears twice). `mountinfo`: the table's text, read if None."""
    if mountinfo is None:
        with open(MOUNTINFO, "rb") as f:
            mountinfo = f.read()
    out = []
    for line in mountinfo.split(b"\n"):
        fields = line.split(b" ")
        if len(fields) > 4:
            out.append(_unescape(fields[4]))
    return out


def canonical_target(target: str | os.PathLike[str]) -> str:
    """`target` as the mount table shows it: absolute, its parent's symlinks resolved
    (the last component is left alone: it may be the link `attach` made)."""
    path = os.path.abspath(os.fspath(target))
    head, tail = os.path.split(path)
    return os.path.join(os.path.realpath(head), tail)


def mount_count(target: str | os.PathLike[str]) -> int:
    """How many mounts are stacked at `target` (0: none)."""
    want = os.fsencode(canonical_target(target))
    try:
        points = mount_points()
    except OSError:
        return int(os.path.ismount(target))
    return sum(1 for p in points if p == want)


def is_mounted(target: str | os.PathLike[str]) -> bool:
    """Whether something is mounted at `target`."""
    return mount_count(target) > 0


def can_mount() -> str | None:
    """None if this process may mount, else why not."""
    if userns.in_initial_userns():
        if os.geteuid() != 0:
            return "mounting needs root (or root in a user namespace: unshare -Urm)"
        if not userns.has_cap(userns.CAP_SYS_ADMIN):
            return "root without CAP_SYS_ADMIN (an unprivileged container?) cannot mount"
        return None
    if not userns.has_cap(userns.CAP_SYS_ADMIN):
        return "not root in this user namespace (no CAP_SYS_ADMIN)"
    if not userns.owns_mount_namespace():
        return "this user namespace does not own its mount namespace (unshare -Urm does)"
    return None


def mount_all(mounts: Sequence[Mount], target: str | os.PathLike[str]) -> None:
    """Mount each of `mounts` at `target`, in order; if one fails, those already
    mounted there are unmounted again and the error is raised."""
    done = 0
    try:
        for m in mounts:
            m.mount(target)
            done += 1
    except BaseException:
        for _ in range(done):
            try:
                unmount(target)
            except PylayersError:
                break
        raise


def unmount(target: str | os.PathLike[str], *, lazy: bool = False) -> None:
    """Unmount the topmost mount at `target`. Nothing mounted there is a
    FailedPrecondition; umount(8)'s own failure (busy...) a PylayersError with its
    reason."""
    path = canonical_target(target)
    if not is_mounted(path):
        raise FailedPrecondition(f"nothing is mounted at {path}")
    run_tool(["umount", *(["-l"] if lazy else []), path], f"umount {path}")


Attachment = Literal["mounted", "linked"]


def attach(mounts: Sequence[Mount], target: str | os.PathLike[str]) -> Attachment:
    """Make `target` show the snapshot `mounts` describe: mount them where this
    process may mount ("mounted"); else, for a lone bind mount (the copy driver's),
    replace the empty directory `target` by a symbolic link to its source
    ("linked"). Anything else that cannot be mounted is an error saying why."""
    reason = can_mount()
    if reason is None:
        mount_all(mounts, target)
        return "mounted"
    if len(mounts) != 1 or mounts[0].type != "bind":
        kinds = ", ".join(m.type for m in mounts) or "nothing"
        raise FailedPrecondition(f"cannot mount {kinds} at {os.fspath(target)}: {reason}")
    path = canonical_target(target)
    try:
        os.rmdir(path)
    except OSError as err:
        raise InvalidArgument(f"cannot use {path} as the mount point: {err.strerror} "
                              "(without the privilege to mount, it is replaced by a "
                              "symbolic link to the snapshot, so it must be an empty "
                              "directory)") from None
    try:
        os.symlink(mounts[0].source, path)
    except OSError as err:
        os.mkdir(path)
        raise PylayersError(f"cannot link {path} to {mounts[0].source}: "
                            f"{err.strerror}") from None
    return "linked"


def detach(target: str | os.PathLike[str], source: str | None = None) -> Attachment:
    """Undo `attach`: unmount what is mounted at `target`, or, where `target` is the
    symbolic link `attach` made (to `source`, if given), put an empty directory back
    in its place. Neither is a FailedPrecondition."""
    path = canonical_target(target)
    if is_mounted(path):
        unmount(path)
        return "mounted"
    if os.path.islink(path) and (source is None or os.readlink(path) == source):
        os.unlink(path)
        os.mkdir(path)
        return "linked"
    raise FailedPrecondition(f"nothing is mounted at {path}")
