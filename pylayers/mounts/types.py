"""The snapshotter's value types, as containerd's `snapshots` and `mount` packages have
them: a snapshot's `Kind` and `Info`, its `Usage`, and a `Mount` as plain data that
whoever holds it can perform (`Mount.mount(target)`).

This module imports nothing else of `pylayers.mounts`: drivers, the registry and the
snapshotter all build on it.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict, dataclass, field
from enum import StrEnum

from ..errors import PylayersError


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
        mount: root, or root in a user namespace owning its mount namespace)."""
        target = os.fspath(target)
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
