"""Running a build step's command inside a mounted root file system.

The command runs chrooted into `root`, in a new mount and PID namespace (util-linux
`unshare`; and a user namespace mapping the caller to root when the caller is not root),
with `/proc` (of its own PID namespace) and a minimal `/dev` (a tmpfs holding `null`,
`zero`, `full`, `random`, `urandom` and `tty` bind-mounted from the host, and the
`fd`, `stdin`, `stdout`, `stderr` links) mounted over the root's `/proc` and `/dev`.
Those mounts live in the step's mount namespace only: they vanish with it and never
reach the layer. The root must hold `/proc` and `/dev` directories (`Sandbox` callers
make them, and remove them after if they made them).

A small Python program (`_CHILD`, standard library only) does the mounts, the chroot,
the working directory, the user and group, and execs the command with exactly the
environment given; it runs as PID 1 of the new PID namespace, so the command is PID 1,
as in `docker run` without `--init`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import PylayersError

_CHILD = r"""
import base64, ctypes, json, os, sys
with open(sys.argv[1], "rb") as f:
    spec = json.loads(f.read())
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                       ctypes.c_char_p]
def fail(msg, code=126):
    sys.stderr.write("pylayers build: " + msg + "\n")
    sys.stderr.flush()
    os._exit(code)
def mount(src, tgt, fstype, flags, data=None):
    if libc.mount(src.encode(), tgt.encode(), fstype.encode() if fstype else None, flags,
                  data.encode() if data else None) != 0:
        e = ctypes.get_errno()
        fail(f"cannot mount {fstype or src} on {tgt}: {os.strerror(e)}")
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT = 1, 2, 4, 8, 32
BIND, REC, PRIVATE = 4096, 16384, 1 << 18
root = spec["root"]
mount("none", "/", None, REC | PRIVATE)
mount("proc", root + "/proc", "proc", NOSUID | NODEV | NOEXEC)
mount("tmpfs", root + "/dev", "tmpfs", NOSUID | NOEXEC, "mode=755,size=65536k")
for d in ("null", "zero", "full", "random", "urandom", "tty"):
    p = root + "/dev/" + d
    if os.path.exists("/dev/" + d):
        open(p, "w").close()
        mount("/dev/" + d, p, None, BIND)
for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                     ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
    os.symlink(target, root + "/dev/" + name)
os.mkdir(root + "/dev/shm", 0o1777)
if spec.get("files"):  # heredoc scripts: executable, unlike the rest of /dev
    os.mkdir(root + "/dev/pipes", 0o755)
    mount("tmpfs", root + "/dev/pipes", "tmpfs", NOSUID | NODEV, "mode=755")
for item in spec.get("files", ()):
    p = root + item["path"]
    os.makedirs(os.path.dirname(p), 0o755, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    os.write(fd, base64.b64decode(item["data"]))
    os.close(fd)
    os.chmod(p, item["mode"])
for m in spec.get("mounts", ()):
    if m["type"] == "tmpfs":
        mount("tmpfs", m["target"], "tmpfs", NOSUID | NODEV,
              "mode=1777" + (f",size={m['size']}" if m.get("size") else ""))
        continue
    mount(m["source"], m["target"], None, BIND | REC)
    if m["readonly"]:
        kept = os.statvfs(m["target"]).f_flag & (NOSUID | NODEV | NOEXEC)
        mount("none", m["target"], None, REMOUNT | BIND | RDONLY | kept)
if spec.get("network") == "none":  # a new network namespace: bring its lo up
    import fcntl, socket, struct
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH14s", b"lo", 0,
                                                                     b""))[:18])[1]
    fcntl.ioctl(s, 0x8914, struct.pack("16sH14s", b"lo", flags | 1, b""))
    s.close()
os.chroot(root)
try:
    os.chdir(spec["cwd"])
except OSError as e:
    fail(f"cannot enter the working directory {spec['cwd']}: {e.strerror}")
try:
    os.setgroups(spec["groups"])
    os.setgid(spec["gid"])
    os.setuid(spec["uid"])
except OSError as e:
    fail(f"cannot become {spec['uid']}:{spec['gid']}: {e.strerror}")
argv, env = spec["argv"], spec["env"]
# the PATH search by hand: os.execvpe imports modules, and the image has no Python
if "/" in argv[0]:
    paths = [argv[0]]
else:
    paths = [os.path.join(d or ".", argv[0]) for d in env.get("PATH", "").split(":")]
err = None
for path in paths:
    try:
        os.execve(path, argv, env)
    except OSError as e:
        if err is None or e.errno != 2:
            err = e
fail(f"cannot run {argv[0]!r}: {err.strerror if err else 'no PATH'}",
     127 if err is None or err.errno == 2 else 126)
"""

TAIL_BYTES = 8192  # of a failed step's output, kept for its error


class SandboxUnavailable(PylayersError):
    """The machine cannot run build steps (no unshare, no namespaces)."""


@dataclass
class RunSpec:
    root: str
    argv: list[str]
    environ: dict[str, str]
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = ()
    # files written on the step's private /dev/pipes (a tmpfs) before the command runs,
    # never in the layer: (image path under /dev/pipes/, content, mode); heredoc scripts
    files: tuple[tuple[str, bytes, int], ...] = ()
    # RUN --mount, mounted in the step's mount namespace before the chroot, in order:
    # {"type": "bind", "source": host path, "target": host path in root, "readonly":
    # bool} or {"type": "tmpfs", "target": ..., "size": bytes or None}
    mounts: tuple[dict, ...] = ()
    network: str = "default"  # "none": a new network namespace holding only lo


@dataclass
class RunResult:
    exit_code: int  # negative: killed by that signal
    tail: str  # the output's last TAIL_BYTES, decoded


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the forked child, before exec: SIGKILL when the builder dies, so a killed
    build leaves no step running (unshare --kill-child passes it on to the step)."""
    import ctypes

    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def unavailable() -> str | None:
    """None if steps can run here, else why not."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    return None


def payload(spec: RunSpec) -> bytes:
    """What the child program reads: the spec as JSON."""
    for path, _data, _mode in spec.files:
        if not path.startswith("/dev/pipes/") or ".." in path.split("/"):
            raise PylayersError(f"a step's file must be under /dev/pipes/: {path!r}")
    return json.dumps({"root": spec.root, "argv": spec.argv, "env": spec.environ,
                       "cwd": spec.cwd, "uid": spec.uid, "gid": spec.gid,
                       "groups": list(spec.groups),
                       "files": [{"path": p, "data": base64.b64encode(d).decode(),
                                  "mode": m} for p, d, m in spec.files],
                       "mounts": list(spec.mounts), "network": spec.network}).encode()


def command(spec: RunSpec, payload_path: str) -> list[str]:
    """The command line that runs `spec` (unshare, then the child program reading its
    spec from `payload_path`: a command line holds no more than 128 KiB per word)."""
    cmd = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--propagation",
           "private"]
    if os.geteuid() != 0:
        cmd += ["--user", "--map-root-user"]
    if spec.network == "none":
        cmd.append("--net")
    return cmd + ["--", sys.executable, "-I", "-S", "-c", _CHILD, payload_path]


def run(spec: RunSpec, output: Callable[[bytes], None] | None = None) -> RunResult:
    """Run `spec`; every chunk of its output (stdout and stderr, merged) goes to
    `output` as it comes. Interrupting this kills the step's processes."""
    why = unavailable()
    if why is not None:
        raise SandboxUnavailable(f"cannot run a build step: {why}")
    if not spec.argv:
        raise PylayersError("cannot run an empty command")
    tail = bytearray()
    # in memory where there is /dev/shm: it may hold secrets given as variables
    fd, payload_path = tempfile.mkstemp(prefix="pylayers-step-", suffix=".json",
                                        dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload(spec))
        return _run(spec, payload_path, output, tail)
    finally:
        os.unlink(payload_path)


def _run(spec: RunSpec, payload_path: str, output: Callable[[bytes], None] | None,
         tail: bytearray) -> RunResult:
    proc = subprocess.Popen(command(spec, payload_path), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, env={}, preexec_fn=_die_with_parent)
    try:
        assert proc.stdout is not None
        while True:
            data = proc.stdout.read1(65536)
            if not data:
                break
            tail += data
            del tail[:-TAIL_BYTES]
            if output is not None:
                output(data)
        code = proc.wait()
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        raise
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
    return RunResult(code, tail.decode("utf-8", "replace"))
