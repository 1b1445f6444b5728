"""pylayers as containerd's snapshotter, end to end with Debian's containerd, ctr and
runc: a containerd of the test's own (config, root, state and socket in a temporary
directory) whose proxy plugin (the README's config.toml lines) points at a `pylayers
containerd-snapshotter` on a temporary store. Images are made with umoci from
busybox-static. Needs root; each test skips with the reason when a part is missing."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("grpc", reason="grpcio is not installed (pip install '.[test]')")

sys.path.insert(0, os.path.dirname(__file__))

from test_containerd_service import Server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUSYBOX = Path("/bin/busybox")
IMAGE = "example.com/busybox:latest"
IMAGE2 = "example.com/busybox-motd:latest"


def missing() -> str | None:
    if os.geteuid() != 0:
        return "containerd, its mounts and runc need root"
    for tool, pkg in [("containerd", "containerd"), ("ctr", "containerd"),
                      ("umoci", "umoci")]:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: {pkg})"
    if not BUSYBOX.exists() or b"ld-linux" in BUSYBOX.read_bytes()[:4096]:  # dynamic
        return "no static busybox at /bin/busybox (Debian: busybox-static)"
    with open("/proc/filesystems") as f:
        if "overlay" not in f.read():
            return "the kernel has no overlayfs"
    return None


def readme_blocks(marker: str) -> list[tuple[str, str]]:
    """(language, text) of the README blocks after `<!-- marker -->`."""
    text = (REPO / "README.md").read_text()
    return re.findall(rf"<!-- {marker} -->\n```(\w*)\n(.*?)\n```", text, re.S)


def readme_config(address: Path) -> str:
    """The README's config.toml lines, with our socket."""
    (toml,) = [t for lang, t in readme_blocks("containerd") if lang == "toml"]
    data = tomllib.loads(toml)
    assert data["proxy_plugins"]["pylayers"]["type"] == "snapshot"
    return toml.replace(data["proxy_plugins"]["pylayers"]["address"], str(address))


def readme_ctr_commands() -> list[tuple[list[str], str]]:
    """The README's `ctr` commands, as arguments, with the output its comment shows."""
    out = []
    for lang, text in readme_blocks("containerd"):
        if lang != "sh":
            continue
        for line in text.splitlines():
            code, _, shown = line.partition("  # ")
            if code.startswith("ctr "):
                out.append((code.split()[1:], shown.strip()))
    return out


def umoci_image(workdir: Path, name: str, extra: dict[str, bytes]) -> Path:
    """An OCI image tarball: busybox (sh, echo, cat, ls as links) and `extra` files,
    made with umoci; returns the tarball."""
    layout, bundle = workdir / f"{name}-oci", workdir / f"{name}-bundle"

    def umoci(*args):
        res = subprocess.run(["umoci", *args], capture_output=True, text=True)
        assert res.returncode == 0, f"umoci {' '.join(args)}: {res.stderr}"

    umoci("init", "--layout", str(layout))
    umoci("new", "--image", f"{layout}:latest")
    umoci("unpack", "--image", f"{layout}:latest", str(bundle))
    rootfs = bundle / "rootfs"
    (rootfs / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for cmd in ("sh", "echo", "cat", "ls"):
        os.symlink("busybox", rootfs / "bin" / cmd)
    for path, data in extra.items():
        (rootfs / path).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / path).write_bytes(data)
    umoci("repack", "--image", f"{layout}:latest", str(bundle))
    umoci("config", "--image", f"{layout}:latest", "--config.cmd", "/bin/sh",
          "--config.env", "PATH=/bin")
    tarball = workdir / f"{name}.tar"
    subprocess.run(["tar", "-C", str(layout), "-cf", str(tarball), "."], check=True)
    return tarball


class Containerd:
    def __init__(self, root: Path, snap_sock: Path) -> None:
        self.root = root
        # runc's state and the shims' sockets are under /run/containerd whatever the
        # config says, per namespace: a namespace of our own keeps runs apart
        self.namespace = f"pylayers-test-{os.urandom(4).hex()}"
        self.sock = root / "containerd.sock"
        self.config = root / "config.toml"
        self.config.write_text(
            "version = 2\n"
            f'root = "{root / "root"}"\n'
            f'state = "{root / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.sock}"\n'
            f'[ttrpc]\n  address = "{self.sock}.ttrpc"\n'
            f'[debug]\n  address = ""\n'
            "[metrics]\n  address = \"\"\n"
            # containerd removes a deleted container's snapshot from the snapshotter by
            # its garbage collector, which by default runs only after 100 mutations:
            # here after every deletion, so the tests need not wait on chance
            '[plugins."io.containerd.gc.v1.scheduler"]\n  deletion_threshold = 1\n'
            "[proxy_plugins]\n" + readme_config(snap_sock))
        self.log_path = root / "containerd.log"
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(["containerd", "--config", str(self.config)],
                                     stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 60
        while self.ctr("version", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("containerd did not start: " +
                                     self.log_path.read_text()[-3000:])
            time.sleep(0.2)

    def ctr(self, *args: str, check: bool = True, cwd: Path | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        res = subprocess.run(["ctr", "-a", str(self.sock), *args], capture_output=True,
                             text=True, cwd=cwd or self.root, timeout=timeout,
                             env={**os.environ, "CONTAINERD_NAMESPACE": self.namespace})
        if check:
            assert res.returncode == 0, f"ctr {' '.join(args)}: {res.stderr[-2000:]}"
        return res

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Env:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.store = root / "store"
        self.snap_sock = root / "pylayers.sock"
        self.server = Server(self.store, self.snap_sock)
        self.containerd = Containerd(root, self.snap_sock)
        self.servers_logs: list[str] = []

    def ctr(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.containerd.ctr(*args, **kw)

    def restart_snapshotter(self) -> None:
        assert self.server.stop() == 0
        self.servers_logs.append(self.server.log)
        self.server = Server(self.store, self.snap_sock)

    def ctr_snapshots(self) -> dict[str, tuple[str, str]]:
        """`ctr snapshots ls`: {key: (parent, kind)}."""
        out = self.ctr("snapshots", "--snapshotter", "pylayers", "ls").stdout
        rows = {}
        for line in out.splitlines()[1:]:
            cols = line.split()
            key, kind = cols[0], cols[-1]
            rows[key] = (cols[1] if len(cols) == 3 else "", kind.lower())
        return rows

    def own_view(self) -> dict[str, tuple[str, str]]:
        """The same, as pylayers' own Snapshotter sees its store (containerd's keys are
        `NS/ID/KEY` inside our default namespace: `default/NS/ID/KEY`)."""
        from pylayers.layers.repo import Layers
        from pylayers.mounts import Snapshotter
        from pylayers.store import Store

        def plain(key: str | None) -> str:
            return key.split("/", 3)[3] if key else ""

        with Store.open(self.store, create=False) as store:
            return {plain(i.key): (plain(i.parent), i.kind.value)
                    for i in Snapshotter(Layers(store)).walk()}

    def agree(self) -> dict[str, tuple[str, str]]:
        """`ctr snapshots ls` and our own view, once they agree: containerd removes a
        deleted container's snapshot from the snapshotter by its garbage collector
        (Walk, then Remove of what its metadata no longer names), soon after."""
        deadline = time.monotonic() + 60
        while (theirs := self.ctr_snapshots()) != (ours := self.own_view()):
            assert time.monotonic() < deadline, (theirs, ours)
            time.sleep(0.3)
        return theirs

    def own_usage(self, key: str) -> int:
        from pylayers.layers.repo import Layers
        from pylayers.mounts import Snapshotter
        from pylayers.store import Store

        with Store.open(self.store, create=False) as store:
            snaps = Snapshotter(Layers(store))
            (info,) = [i for i in snaps.walk() if i.key.split("/", 3)[3] == key]
            return snaps.usage(info.key).size

    def packs_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.store / "packs").rglob("*") if p.is_file())

    def close(self) -> None:
        try:
            for c in self.ctr("containers", "ls", "-q", check=False).stdout.split():
                self.ctr("tasks", "kill", "-s", "SIGKILL", c, check=False)
                self.ctr("tasks", "rm", "-f", c, check=False)
                self.ctr("containers", "rm", c, check=False)
        finally:
            self.containerd.stop()
            self.server.stop()
            shutil.rmtree(f"/run/containerd/runc/{self.containerd.namespace}",
                          ignore_errors=True)
            subprocess.run(["sh", "-c", f"grep -o ' {self.root}[^ ]*' /proc/mounts | "
                            "sort -r | xargs -r -n1 umount -l"], check=False)


@pytest.fixture(scope="module")
def env():
    if (why := missing()) is not None:
        pytest.skip(why)
    # a short path: unix socket paths must stay under 108 bytes
    root = Path(tempfile.mkdtemp(prefix="pylayers-ctrd-", dir="/tmp"))
    e = Env(root)
    try:
        e.image = umoci_image(root, "busybox", {})  # busybox.tar, as the README has it
        e.image2 = umoci_image(root, "busybox-motd", {"etc/motd": b"hello from image 2\n"})
        yield e
    finally:
        e.close()
        logs = "".join(e.servers_logs) + e.server.log
        shutil.rmtree(root, ignore_errors=True)
        assert "Traceback" not in logs, logs


def need_runc() -> None:
    if shutil.which("runc") is None:
        pytest.skip("runc is not installed (Debian: runc)")


def test_readme_commands_import_and_run(env):
    """The README's ctr commands as written (with -a naming this containerd): import
    unpacks onto pylayers, run prints."""
    need_runc()
    cmds = readme_ctr_commands()
    assert [c[0] for c, _ in cmds] == ["image", "run", "snapshots", "snapshots"]
    for args, shown in cmds:
        res = env.ctr(*args, cwd=env.root)
        if shown:
            assert res.stdout.strip() == shown, (args, res.stdout, res.stderr)
    theirs = env.agree()
    assert [kind for _p, kind in theirs.values()] == ["committed"]  # one layer
    assert "Traceback" not in env.server.log


def test_container_writes_land_in_its_active_snapshot(env):
    need_runc()
    if IMAGE not in env.ctr("images", "ls", "-q").stdout.split():
        env.ctr("image", "import", "--snapshotter", "pylayers", "--base-name",
                "example.com/busybox", str(env.image))
    env.ctr("containers", "create", "--snapshotter", "pylayers", IMAGE, "writer", "--",
            "sh", "-c", "echo written > /data; cat /data")
    res = env.ctr("tasks", "start", "writer")
    assert res.stdout.strip() == "written"
    mounts = env.ctr("snapshots", "--snapshotter", "pylayers", "mounts", "/mnt",
                     "writer").stdout
    upper = re.search(r"upperdir=([^,\s]+)", mounts)[1]
    assert Path(upper, "data").read_text() == "written\n"
    assert upper.startswith(str(env.store))
    assert env.agree()["writer"][1] == "active"
    usage = env.ctr("snapshots", "--snapshotter", "pylayers", "usage", "writer").stdout
    assert env.own_usage("writer") >= len("written\n")
    assert usage.splitlines()[1].split()[0] == "writer"
    env.ctr("containers", "rm", "writer")  # its snapshot goes, through us
    assert "writer" not in env.agree()


def test_snapshots_prepare_rm_agree(env):
    if IMAGE not in env.ctr("images", "ls", "-q").stdout.split():
        env.ctr("image", "import", "--snapshotter", "pylayers", "--base-name",
                "example.com/busybox", str(env.image))
    (layer,) = [k for k, (_p, kind) in env.ctr_snapshots().items() if kind == "committed"]
    env.ctr("snapshots", "--snapshotter", "pylayers", "prepare", "mine", layer)
    assert env.own_view()["mine"] == (layer, "active")
    res = env.ctr("snapshots", "--snapshotter", "pylayers", "rm", layer, check=False)
    assert res.returncode != 0  # the parent of "mine"
    assert layer in env.own_view()
    env.ctr("snapshots", "--snapshotter", "pylayers", "rm", "mine")
    assert "mine" not in env.agree()


def test_second_image_sharing_busybox_adds_almost_nothing(env):
    if IMAGE not in env.ctr("images", "ls", "-q").stdout.split():
        env.ctr("image", "import", "--snapshotter", "pylayers", "--base-name",
                "example.com/busybox", str(env.image))
    before = env.packs_bytes()
    env.ctr("image", "import", "--snapshotter", "pylayers", "--base-name",
            "example.com/busybox-motd", str(env.image2))
    grown = env.packs_bytes() - before
    size = BUSYBOX.stat().st_size
    assert grown < size // 10, (grown, size)
    committed = [k for k, (_p, kind) in env.own_view().items() if kind == "committed"]
    assert len(committed) == 2  # two layers (different tars), their busybox shared
    # `pylayers du` shows the sharing: busybox counted in both layers' logical bytes,
    # its chunks stored once
    du = subprocess.run([sys.executable, "-m", "pylayers", "--store", str(env.store), "du",
                         "--json"], capture_output=True, text=True, cwd=env.root)
    assert du.returncode == 0, du.stderr
    usage = json.loads(du.stdout)
    assert usage["logical_bytes"] >= 2 * size, usage
    assert usage["data_bytes"] < size * 1.1, usage
    assert usage["dedup_ratio"] >= 1.8, usage


def test_snapshotter_restart_loses_nothing(env):
    need_runc()
    if IMAGE not in env.ctr("images", "ls", "-q").stdout.split():
        env.ctr("image", "import", "--snapshotter", "pylayers", "--base-name",
                "example.com/busybox", str(env.image))
    env.ctr("containers", "create", "--snapshotter", "pylayers", IMAGE, "keeper", "--",
            "sh", "-c", "echo kept > /kept")
    assert env.ctr("tasks", "start", "keeper").returncode == 0
    before = env.agree()
    env.restart_snapshotter()
    # containerd's connection to the proxy broke with the restart: a call before its
    # gRPC channel reconnects fails with Unavailable (nothing is lost; ctr says so)
    deadline = time.monotonic() + 30
    while (res := env.ctr("snapshots", "--snapshotter", "pylayers", "ls",
                          check=False)).returncode != 0:
        assert "unavailable" in res.stderr, res.stderr
        assert time.monotonic() < deadline, res.stderr
        time.sleep(0.5)
    assert env.ctr_snapshots() == before == env.own_view()
    res = env.ctr("run", "--snapshotter", "pylayers", "--rm", IMAGE, "after", "echo", "again")
    assert res.stdout.strip() == "again"
    mounts = env.ctr("snapshots", "--snapshotter", "pylayers", "mounts", "/mnt",
                     "keeper").stdout
    upper = re.search(r"upperdir=([^,\s]+)", mounts)[1]
    assert Path(upper, "kept").read_text() == "kept\n"
    env.ctr("containers", "rm", "keeper")
    assert "keeper" not in env.agree()
