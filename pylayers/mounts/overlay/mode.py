"""The overlay driver's two modes, and which one a snapshot was made in.

As root in the initial user namespace, overlayfs keeps its private xattrs under
`trusted.overlay.*` (and `user.overlay.*` is an ordinary xattr namespace, for the
files' owners). Without root, inside a user namespace that owns its mount namespace
(`unshare -Urm`, rootless containers), overlayfs is mounted with the `userxattr`
option and uses `user.overlay.*` instead, and only the namespace's mapped ids can own
files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ... import userns
from ...errors import FailedPrecondition, PylayersError

ROOT = "root"
USERXATTR = "userxattr"


@dataclass(frozen=True)
class Flavour:
    """How overlayfs is used in one mode: the xattrs it keeps its markers in, the
    mount options, and where under STORE/cache that mode's lower directories and
    cached files live (their markers and owners differ, so the modes never share)."""

    mode: str
    opaque_xattr: bytes
    private_prefix: bytes  # overlayfs's own xattrs: dropped from the upper dir at commit
    options: tuple[str, ...]  # added to every overlay mount
    rw_options: tuple[str, ...]  # added to writable mounts
    cache: str  # subdirectory of STORE/cache ("" for root mode)


# Commit reads the upper directory as plain files: writable mounts pin off the features
# that would leave it holding xattr references instead (a renamed directory's redirect,
# a chmod-ed file's metadata-only copy), whatever the module's defaults on this host.
# With `userxattr` the kernel refuses redirect_dir=off; nofollow is the same for us:
# redirects are neither made (a lower directory's rename is EXDEV) nor followed.
ROOT_FLAVOUR = Flavour(ROOT, b"trusted.overlay.opaque", b"trusted.overlay.", (),
                       ("index=off", "redirect_dir=off", "metacopy=off"), "")


def userxattr_flavour(mapping: str) -> Flavour:
    """Inside a user namespace. Files under one uid/gid mapping show other owners
    under another, so each mapping has its own cache."""
    return Flavour(USERXATTR, b"user.overlay.opaque", b"user.overlay.", ("userxattr",),
                   ("index=off", "redirect_dir=nofollow", "metacopy=off"),
                   f"userns/{mapping}")


def overlay_mode() -> tuple[str | None, str | None]:
    """(ROOT or USERXATTR, None) where this process can mount overlayfs, else
    (None, the reason it cannot)."""
    hint = "run inside `unshare -Urm` (a user namespace: overlayfs with userxattr), " \
        "or use the copy driver"
    if userns.in_initial_userns():
        if os.geteuid() != 0:
            return None, f"mounting overlayfs needs root; without root, {hint}"
        if not userns.has_cap(userns.CAP_SYS_ADMIN):
            return None, "root without CAP_SYS_ADMIN (an unprivileged container?) cannot " \
                "mount; use the copy driver"
        return ROOT, None
    if os.geteuid() != 0 or not userns.has_cap(userns.CAP_SYS_ADMIN):
        return None, f"not root in this user namespace (no CAP_SYS_ADMIN); {hint}"
    if not userns.owns_mount_namespace():
        return None, f"this user namespace does not own its mount namespace; {hint}"
    return USERXATTR, None


def current_flavour() -> Flavour:
    mode, _reason = overlay_mode()
    if mode == USERXATTR:
        return userxattr_flavour(userns.mapping_id())
    return ROOT_FLAVOUR


class HostIds:
    """Owners of a snapshot's layers read as ids *outside* the user namespace (the
    host's), as the kernel shows a real file there: a user who snapshotted their own
    tree (files owned by uid 1000) and mounts it in `unshare -Urm` (which maps only
    their id, as 0) sees their files owned by 0, and commits them as 1000 again, as
    rootless podman's storage keeps them. Used for a chain whose owners this
    namespace does not map as they are, but maps all of as host ids."""

    def __init__(self, maps: tuple[userns.IdMap, userns.IdMap]) -> None:
        self.uid_map, self.gid_map = maps

    def inside(self, uid: int, gid: int) -> tuple[int, int]:
        u, g = userns.to_inside(uid, self.uid_map), userns.to_inside(gid, self.gid_map)
        if u is None or g is None:  # not for a chain `applies` accepted
            raise PylayersError(f"uid {uid}, gid {gid} is not mapped from outside this "
                                "user namespace")
        return u, g

    def outside(self, uid: int, gid: int) -> tuple[int, int]:
        u, g = userns.to_outside(uid, self.uid_map), userns.to_outside(gid, self.gid_map)
        if u is None or g is None:
            raise PylayersError(f"uid {uid}, gid {gid} inside this user namespace has "
                                "no id outside it")
        return u, g

    def applies(self, owners: set[tuple[int, int]]) -> bool:
        """Whether a chain with these (uid, gid) owners is read as host ids: some owner
        is not mapped as it is, and every one is mapped from outside."""
        um, gm = self.uid_map, self.gid_map
        as_is = all(userns.is_mapped(u, um) and userns.is_mapped(g, gm) for u, g in owners)
        return not as_is and all(userns.to_inside(u, um) is not None and
                                 userns.to_inside(g, gm) is not None for u, g in owners)


HOST_IDS_SUFFIX = "-hostids"  # of the cache set of lower dirs with owners read as host ids


def record_mode(sdir: Path, flavour: Flavour, **extra: object) -> None:
    """Write the snapshot's overlay.json: the mode (and cache set) it was made in."""
    data = {"mode": flavour.mode, "cache": flavour.cache, **extra}
    (sdir / "overlay.json").write_text(json.dumps(data, sort_keys=True) + "\n")


def read_mode(sdir: Path) -> dict:
    try:
        return json.loads((sdir / "overlay.json").read_text())
    except FileNotFoundError:
        return {"mode": ROOT, "cache": ""}  # made before modes were recorded
    except (OSError, ValueError) as err:
        raise PylayersError(f"cannot read {sdir / 'overlay.json'}: {err}") from None


def check_mode(sdir: Path, flavour: Flavour) -> dict:
    """A snapshot's upper directory holds its mode's markers and owners as its user
    namespace maps them: mount, read and commit it only in that mode. Returns the
    snapshot's overlay.json."""
    data = read_mode(sdir)
    if data.get("mode") == flavour.mode and \
            data.get("cache") in (flavour.cache, flavour.cache + HOST_IDS_SUFFIX):
        return data
    if data.get("mode") == ROOT:
        where = "as root outside any user namespace"
    else:
        where = "inside a user namespace with the uid/gid mapping it was made with " \
            "(e.g. `unshare -Urm` as the same user)"
    raise FailedPrecondition(f"this overlay snapshot was made in {data.get('mode')} "
                             f"mode: use it {where}")
