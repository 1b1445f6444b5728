"""The snapshotter's value types, as containerd's `snapshots` and `mount` packages have
them: a snapshot's `Kind` and `Info`, its `Usage`, and a `Mount` as plain data that
whoever holds it can perform (`Mount.mount(target)`).

This module imports nothing else of `pylayers.mounts`: drivers, the registry and the
snapshotter all build on it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
from dataclasses import asdict, dataclass, field
from enum import StrEnum

from ..errors import FailedPrecondition, PylayersError

OVERLAY_MAX_LOWERS = 500  # overlayfs stacks at most this many lower directories


class Kind(StrEnum):
    ACTIVE = "active"
    VIEW = "view"
    COMMITTED = "committed"


@dataclass
class Info:
    key: str
    kind: Kind
    parent: str | None  # the parent's name as given (a committed key or a layer ref)
    parent_layer: str | None  # hex layer id of the parent
    layer: str | None = None  # committed: its layer id
    driver: str = ""
    dir_id: str = ""  # active/view: its directory under STORE/snapshots/
    labels: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0

    def encode(self) -> bytes:
        d = asdict(self)
        d["kind"] = self.kind.value
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> Info:
        d = json.loads(data)
        d["kind"] = Kind(d["kind"])
        return cls(**d)


@dataclass
class Usage:
    size: int  # bytes of regular files the snapshot itself holds (not its parents)
    inodes: int
    new_bytes: int = 0  # of those, chunk bytes the store does not hold yet (after dedup)


def run_tool(cmd: list[str], what: str) -> None:
    """Run mount(8) or umount(8); a failure is a PylayersError carrying the tool's own
    reason (`must be superuser to use mount`, `wrong fs type, bad option ...`), not
    its boilerplate pointer to dmesg(1)."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise PylayersError(f"{what} failed: {cmd[0]} is not installed") from None
    if res.returncode == 0:
        return
    lines = [line.strip() for line in (res.stderr or res.stdout).splitlines()]
    lines = [line for line in lines if line and "dmesg(1)" not in line]
    reason = "; ".join(lines) or f"exit status {res.returncode}"
    raise PylayersError(f"{what} failed: {reason}")


@dataclass
class Mount:
    """A mount as plain data, as containerd returns it: `mount -t type source target -o
    options`. A `bind` mount of the copy driver is a directory that can also be used
    as it is, without mounting (see `mounting.attach`)."""

    type: str
    source: str
    options: list[str] = field(default_factory=list)

    def command(self, target: str) -> list[str]:
        """The mount(8) command that mounts this at `target`. mount(2) takes at most a
        page of options: an overlay whose lowerdir list is longer (a few dozen layers
        in a deep directory) is mounted from the lower directories' common parent,
        with relative lowerdirs, as containerd does (`sh -c 'cd DIR && exec mount
        ...'`)."""
        cmd = ["mount", "-t", self.type if self.type != "bind" else "none"]
        opts = list(self.options)
        if self.type == "bind" and "bind" not in opts and "rbind" not in opts:
            opts.insert(0, "bind")
        cwd = None
        if self.type == "overlay" and len(",".join(opts)) >= os.sysconf("SC_PAGE_SIZE"):
            cwd, opts = _compact_lowerdir(opts)
        if opts:
            cmd += ["-o", ",".join(opts)]
        if cwd is None:
            return cmd + [self.source, target]
        return ["sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", cwd,
                *cmd, self.source, os.path.abspath(target)]

    def mount(self, target: str | os.PathLike[str]) -> None:
        """Mount this at the existing directory `target` (needs the privilege to
        mount: root, or root in a user namespace owning its mount namespace). An
        overlay whose options do not fit a page is mounted through the new mount API,
        one lower directory at a time (`_fsmount_overlay`), where the kernel has it."""
        target = os.fspath(target)
        if self.type == "overlay" and len(",".join(self.options)) >= \
                os.sysconf("SC_PAGE_SIZE") and _fsmount_overlay(self.options, target):
            return
        run_tool(self.command(target), f"mount -t {self.type} on {target}")


def _compact_lowerdir(opts: list[str]) -> tuple[str | None, list[str]]:
    """(the lowerdirs' common parent, options with lowerdirs relative to it and every
    other path absolute), or (None, opts) when that does not make them shorter."""
    lowers = next((o[len("lowerdir="):].split(":") for o in opts
                   if o.startswith("lowerdir=")), [])
    if len(lowers) < 2:
        return None, opts
    lowers = [os.path.abspath(d) for d in lowers]
    common = os.path.commonpath(lowers)
    if common == "/":
        return None, opts
    out = []
    for o in opts:
        name, eq, value = o.partition("=")
        if name == "lowerdir":
            o = "lowerdir=" + ":".join(os.path.relpath(d, common) for d in lowers)
        elif eq and name in ("upperdir", "workdir"):
            o = f"{name}={os.path.abspath(value)}"
        out.append(o)
    return common, out


# -- the new mount API (fsopen, fsconfig, fsmount, move_mount: Linux 5.2; overlayfs's
# `lowerdir+`, one lower directory per call: Linux 6.8). The syscall numbers are the
# same on every architecture but alpha.
_SYS_MOVE_MOUNT, _SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT = 429, 430, 431, 432
_FSCONFIG_SET_FLAG, _FSCONFIG_SET_STRING, _FSCONFIG_CMD_CREATE = 0, 1, 6
_FSOPEN_CLOEXEC = _FSMOUNT_CLOEXEC = 1
_MOUNT_ATTR_RDONLY = 1
_MOVE_MOUNT_F_EMPTY_PATH = 4
_AT_FDCWD = -100
_libc: ctypes.CDLL | None = None


def _syscall(*args: int | bytes | None) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    res = _libc.syscall(*(ctypes.c_long(a) if isinstance(a, int) else a for a in args))
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return res


def _fs_log(fd: int) -> str:
    """The messages the kernel left on a file system context (`e overlay: too many
    lower directories, limit is 500`), without their severity letters."""
    out = []
    for _ in range(16):
        try:
            msg = os.read(fd, 4096).decode(errors="replace").strip()
        except OSError:
            break
        out.append(msg[2:] if msg[:2] in ("e ", "w ", "i ") else msg)
    return "; ".join(m for m in out if m)


def _fsmount_overlay(options: list[str], target: str) -> bool:
    """Mount overlayfs with `options` at `target` through the new mount API, each lower
    directory passed alone (`lowerdir+`), so no page of options limits the depth.
    False, having done nothing, where the kernel lacks the API or `lowerdir+` (the
    caller uses mount(8)); any other refusal is a PylayersError with the kernel's
    reason."""
    try:
        fd = _syscall(_SYS_FSOPEN, b"overlay", _FSOPEN_CLOEXEC)
    except OSError:
        return False  # no new mount API (or not allowed: mount(8) says why)
    what = f"mount -t overlay on {target}"
    try:
        lowers: list[str] = []
        rest = []
        for o in options:
            name, eq, value = o.partition("=")
            if name == "lowerdir" and eq:
                lowers = value.split(":")
            else:
                rest.append((name, value if eq else None))
        try:
            for i, d in enumerate(lowers):
                try:
                    _syscall(_SYS_FSCONFIG, fd, _FSCONFIG_SET_STRING, b"lowerdir+",
                             os.fsencode(os.path.abspath(d)), 0)
                except OSError as e:
                    if i == 0 and e.errno == errno.EINVAL and "lowerdir+" in _fs_log(fd):
                        return False  # before Linux 6.8
                    raise
            _syscall(_SYS_FSCONFIG, fd, _FSCONFIG_SET_STRING, b"source", b"overlay", 0)
            for name, value in rest:
                if value is None:
                    _syscall(_SYS_FSCONFIG, fd, _FSCONFIG_SET_FLAG, name.encode(), None, 0)
                else:
                    _syscall(_SYS_FSCONFIG, fd, _FSCONFIG_SET_STRING, name.encode(),
                             os.fsencode(value), 0)
            _syscall(_SYS_FSCONFIG, fd, _FSCONFIG_CMD_CREATE, None, None, 0)
            attrs = _MOUNT_ATTR_RDONLY if ("ro", None) in rest else 0
            mfd = _syscall(_SYS_FSMOUNT, fd, _FSMOUNT_CLOEXEC, attrs)
        except OSError as e:
            reason = _fs_log(fd) or e.strerror
            if len(lowers) > OVERLAY_MAX_LOWERS:
                raise FailedPrecondition(f"{what} failed: {len(lowers)} lower directories; "
                                         f"overlayfs stacks at most {OVERLAY_MAX_LOWERS} "
                                         f"({reason})") from None
            raise PylayersError(f"{what} failed: {reason}") from None
        try:
            _syscall(_SYS_MOVE_MOUNT, mfd, b"", _AT_FDCWD, os.fsencode(target),
                     _MOVE_MOUNT_F_EMPTY_PATH)
        except OSError as e:
            raise PylayersError(f"{what} failed: {e.strerror}") from None
        finally:
            os.close(mfd)
    finally:
        os.close(fd)
    return True
