"""Where this process stands with respect to user namespaces, read from /proc.

The initial user namespace maps every id to itself (`/proc/self/uid_map` is `0 0
4294967295`). Any other mapping means this process runs in a user namespace (after
`unshare -Urm`, rootless podman, a rootless container), where only the mapped ids can
own files: chown(2) to any other id fails with EINVAL.
"""

from __future__ import annotations

import errno
import fcntl
import os

INITIAL_MAP = ((0, 0, 4294967295),)
CAP_SYS_ADMIN = 21
NS_GET_USERNS = 0xB701  # _IO(0xb7, 0x1), linux/nsfs.h

IdMap = tuple[tuple[int, int, int], ...]


def parse_idmap(text: str) -> IdMap:
    """`/proc/PID/uid_map` (or gid_map) text as (inside, outside, count) triples."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 3:
            out.append((int(fields[0]), int(fields[1]), int(fields[2])))
    return tuple(out)


def read_idmap(kind: str = "uid") -> IdMap:
    """This process's uid or gid map; the initial one where /proc cannot say."""
    try:
        with open(f"/proc/self/{kind}_map") as f:
            return parse_idmap(f.read())
    except OSError:
        return INITIAL_MAP


def in_initial_userns() -> bool:
    return read_idmap("uid") == INITIAL_MAP


def is_mapped(value: int, idmap: IdMap) -> bool:
    return any(inside <= value < inside + count for inside, _outside, count in idmap)


def to_inside(value: int, idmap: IdMap) -> int | None:
    """The id inside this namespace of the id `value` outside it (its parent's), or
    None where the map does not cover it."""
    for inside, outside, count in idmap:
        if outside <= value < outside + count:
            return inside + value - outside
    return None


def to_outside(value: int, idmap: IdMap) -> int | None:
    """The id outside this namespace of the id `value` inside it, or None."""
    for inside, outside, count in idmap:
        if inside <= value < inside + count:
            return outside + value - inside
    return None


def unmapped_owner(uid: int, gid: int, maps: tuple[IdMap, IdMap] | None = None) -> str | None:
    """None if this process's user namespace can hold files owned by uid:gid, else
    the message saying which id it cannot (rootless podman's rule). `maps`: the uid
    and gid maps, if already read."""
    uid_map, gid_map = maps or (read_idmap("uid"), read_idmap("gid"))
    if not is_mapped(uid, uid_map):
        return f"uid {uid} is not mapped in this user namespace"
    if not is_mapped(gid, gid_map):
        return f"gid {gid} is not mapped in this user namespace"
    return None


def mapping_id() -> str:
    """A short name for this namespace's uid and gid maps: files made under one
    mapping show other owners under another, so caches of them are kept apart."""
    import hashlib  # rarely needed: only inside a user namespace

    h = hashlib.sha256()
    for kind in ("uid", "gid"):
        h.update(repr(read_idmap(kind)).encode() + b"\n")
    return h.hexdigest()[:16]


def has_cap(cap: int) -> bool:
    """Whether `cap` is in this process's effective set (in its own user namespace)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except OSError:
        pass
    return False


def owns_mount_namespace() -> bool:
    """Whether this process's user namespace owns its mount namespace (true after
    `unshare -Urm`; false after `unshare -Ur`, where mounting is refused). True where
    the kernel cannot tell (no NS_GET_USERNS): the mount will say."""
    try:
        fd = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        owner = fcntl.ioctl(fd, NS_GET_USERNS)
    except OSError as err:
        # EPERM: the owner is outside this user namespace, so it is not this one
        return err.errno != errno.EPERM
    finally:
        os.close(fd)
    try:
        return os.fstat(owner).st_ino == os.stat("/proc/self/ns/user").st_ino
    except OSError:
        return True
    finally:
        os.close(owner)
