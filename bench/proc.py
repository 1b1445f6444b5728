"""Running one measured command, sizing a directory, describing the machine."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PY = sys.executable
# GNU time reports the peak RSS of the command alone. wait4's ru_maxrss cannot: a child
# forked from this (large) Python process starts out with our RSS as its high-water mark.
GNU_TIME = shutil.which("time", path="/usr/bin:/bin")


@dataclass
class Cmd:
    """A command to time: an argv list, or a shell string run by `sh -c` (pipelines)."""

    argv: list[str] | str
    cwd: str | Path = "/"
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Run:
    seconds: float
    rss_kib: int | None
    stdout: str


class CommandFailed(RuntimeError):
    pass


def run(cmd: Cmd) -> Run:
    """Wall time and peak RSS of one command (of the largest process in it, by GNU
    time; None without it). The default cwd is "/": from the repository root,
    `python -m pylayers` would import the source tree, which has no compiled core."""
    argv = ["sh", "-c", cmd.argv] if isinstance(cmd.argv, str) else cmd.argv
    env = {**os.environ, **cmd.env} if cmd.env else None
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r") as rss:
        if GNU_TIME:
            argv = [GNU_TIME, "-q", "-f", "%M", "-o", rss.name, *argv]
        t = time.perf_counter()
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                           cwd=cmd.cwd, check=False)
        elapsed = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        if p.returncode != 0:
            msg = err.read().decode(errors="replace").strip()[-2000:]
            raise CommandFailed(f"{' '.join(argv)[:300]} failed ({p.returncode}): {msg}")
        rss_kib = None
        if GNU_TIME:
            try:
                rss_kib = int(rss.read().split()[-1])
            except (ValueError, IndexError):
                pass
        return Run(elapsed, rss_kib, out.read().decode(errors="replace"))


def check(argv: list[str], cwd: str | Path = "/", env: dict | None = None) -> str:
    """Run an untimed set-up command; its stdout."""
    return run(Cmd(argv, cwd, env or {})).stdout


def tree_bytes(root: Path) -> tuple[int, int]:
    """(apparent, allocated) bytes of the files under `root`, each inode once:
    apparent is the sum of file sizes (`du -b` without directories), allocated is
    what the file system gave them (`du`)."""
    seen: set[tuple[int, int]] = set()
    apparent = allocated = 0
    stack = [os.fspath(root)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                    allocated += st.st_blocks * 512
                    continue
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
                if e.is_file(follow_symlinks=False):
                    apparent += st.st_size
                allocated += st.st_blocks * 512
    return apparent, allocated


def machine(work: Path) -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem,
            "kernel": platform.release(), "python": sys.version.split()[0],
            "work_dir": os.fspath(work), "filesystem": _fs_type(os.fspath(work))}


def _fs_type(path: str) -> str:
    if not shutil.which("stat"):
        return "unknown"
    try:
        return subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def git_rev() -> str:
    """The short commit of the checkout bench/ runs from, or "unknown"."""
    try:
        return subprocess.run(["git", "-C", os.fspath(Path(__file__).resolve().parent.parent),
                               "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
