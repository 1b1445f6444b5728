"""Images imported through containerd onto pylayers (its proxy snapshotter,
`pylayers containerd-snapshotter`) against containerd's own overlayfs snapshotter,
side by side in one run with the same containerd (issue 13, "Figures").

    python -m bench.bench_containerd                  # synthetic env, 3 versions (~1 min)
    python -m bench.bench_containerd --wheels         # the real Python env series
                                                      # (bench.pyenv_wheels; fetches wheels once)

Needs root, Debian's containerd, ctr and runc, overlayfs and a static busybox; without
them it says what is missing and exits 0 having measured nothing.

The image series, `--layout rebuilt` (the default): version V is two layers, a base
(a static busybox, the same layer in every version) and the Python env at version V,
whole, as a Dockerfile's `RUN pip install -r requirements.txt` layer is rebuilt
whenever a pin changes. `--layout chain`: version V is version V-1's layers and one
more holding only what changed (containerd's own best case: the layers the versions
share are the same blobs, unpacked once). The layers are made by `pylayers snapshot`
in a builder store of their own (not the one the snapshotter serves) and exported as
gzip OCI archives by `pylayers export`.

For each version, alternating which snapshotter goes first:
- its blobs are ingested once, untimed (`ctr image import --no-unpack`), so that
  neither snapshotter's import pays for writing the content store and the other's not;
- import time: `ctr image import --snapshotter S --base-name example.com/env-S V.tar`
  (containerd reads the blobs, gunzips and applies each layer onto snapshotter S);
- `ctr run` time: `ctr run --rm --snapshotter S IMAGE ID /bin/echo ready`, from the
  start of `ctr` to its first line of output (the first run of each image: pylayers
  builds the layer's lower directory then), and to its exit;
- disk, each directory's allocated bytes, hard links counted once (`du -s`): the
  pylayers store (packs, index, layer cache, snapshot directories: everything the
  snapshotter keeps) against containerd's overlayfs snapshotter directory
  (ROOT/io.containerd.snapshotter.v1.overlayfs); containerd's content store
  (ROOT/io.containerd.content.v1.content, the compressed blobs, kept by containerd
  whichever snapshotter unpacks them) is shown alone and added to both for the totals.
After the last version, `--runs` more `ctr run`s of the last image on each snapshotter,
alternating (warm: medians).

Writes containerd[-wheels].json and .md into --out (default bench/out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .proc import git_rev, machine, tree_bytes

REPO = Path(__file__).resolve().parent.parent
BUSYBOX = Path("/bin/busybox")
SNAPSHOTTERS = ("pylayers", "overlayfs")
LAYOUTS = {
    "rebuilt": "Each version: a static busybox base layer and the whole env as one layer",
    "chain": "Each version: the previous version's layers and one layer of what changed "
             "(the first: busybox, then the whole env)",
}
PY = sys.executable


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def missing() -> str | None:
    """Why this cannot run here, or None."""
    if os.geteuid() != 0:
        return "containerd, its mounts and runc need root"
    for tool, pkg in [("containerd", "containerd"), ("ctr", "containerd"), ("runc", "runc")]:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: {pkg})"
    if not BUSYBOX.exists() or b"ld-linux" in BUSYBOX.read_bytes()[:4096]:
        return "no static busybox at /bin/busybox (Debian: busybox-static)"
    with open("/proc/filesystems") as f:
        if "overlay" not in f.read():
            return "the kernel has no overlayfs"
    return None


def pylayers(store: Path, *args: str) -> str:
    """A pylayers command (cwd "/": from the repository root `-m pylayers` would import
    the source tree, which has no compiled core); its stdout."""
    res = subprocess.run([PY, "-m", "pylayers", "--store", os.fspath(store), *args],
                         capture_output=True, text=True, cwd="/")
    if res.returncode != 0:
        raise RuntimeError(f"pylayers {' '.join(args)}: {res.stderr.strip()[-2000:]}")
    return res.stdout


# -- the image series ------------------------------------------------------------------


class Series:
    """Versions of a Python env, each built in place under `root`."""

    def count(self) -> int:
        raise NotImplementedError

    def build(self, site: Path, v: int) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class WheelsSeries(Series):
    """bench.pyenv_wheels: numpy, scipy, pandas, matplotlib, ... installed by pip from
    real wheels, each version upgrading a few pins."""

    def __init__(self, cache: Path, versions: int | None) -> None:
        from .pyenv_wheels import VERSIONS
        self.cache = cache
        self.n = min(versions or len(VERSIONS), len(VERSIONS))

    def count(self) -> int:
        return self.n

    def build(self, site: Path, v: int) -> None:
        from .pyenv_wheels import install_version
        install_version(self.cache, site, v)

    def describe(self) -> str:
        return (f"{self.n} versions of a Python env built by pip from real wheels "
                "(bench.pyenv_wheels: numpy, scipy, pandas, matplotlib, scikit-learn, ...)")


class SyntheticSeries(Series):
    """bench.datasets' synthetic packages (the quick chain's), a few upgraded per
    version."""

    def __init__(self, versions: int, env_mib: int, packages: int) -> None:
        self.n, self.env_mib, self.packages = versions, env_mib, packages
        self.pkgs: list = []

    def count(self) -> int:
        return self.n

    def build(self, site: Path, v: int) -> None:
        from . import datasets as ds
        if v == 0:
            self.pkgs = ds.py_packages(self.env_mib << 20, self.packages, seed=21)
            for pkg in self.pkgs:
                pkg.install(site, stamp=0)
            return
        n = max(1, self.n - 1)
        for i in range(v - 1, len(self.pkgs), n):
            new = self.pkgs[i].upgraded(seed=1000 * v + i)
            new.install(site, stamp=v, old=self.pkgs[i])
            self.pkgs[i] = new

    def describe(self) -> str:
        return (f"{self.n} versions of a synthetic Python env ({self.env_mib} MiB, "
                f"{self.packages} packages, bench.datasets), a few packages upgraded each")


class TinySeries(Series):
    """A few MiB of files in a few packages, one package rewritten per version (no
    numpy: the test suite's smoke run, tests/test_containerd_bench.py)."""

    def __init__(self, versions: int, packages: int = 4, files: int = 16) -> None:
        self.n, self.packages, self.files = versions, packages, files

    def count(self) -> int:
        return self.n

    def build(self, site: Path, v: int) -> None:
        import random
        for p in range(self.packages) if v == 0 else [v % self.packages]:
            pkg = site / f"pkg{p}"
            shutil.rmtree(pkg, ignore_errors=True)
            pkg.mkdir()
            rng = random.Random(1000 * v + p)
            for i in range(self.files):
                (pkg / f"m{i}.so").write_bytes(rng.randbytes(64 << 10))

    def describe(self) -> str:
        return (f"{self.n} versions of a tiny env ({self.packages} packages of "
                f"{self.files} random 64 KiB files, one rewritten per version)")


def image_layers(oci_dir: Path) -> int:
    """How many layers the (one) image of an OCI layout has."""
    def blob(digest: str) -> dict:
        algo, _, hexd = digest.partition(":")
        return json.loads((oci_dir / "blobs" / algo / hexd).read_text())
    (desc,) = json.loads((oci_dir / "index.json").read_text())["manifests"]
    return len(blob(desc["digest"])["layers"])


def build_images(series: Series, work: Path, layout: str = "rebuilt",
                 counts: list[int] | None = None) -> list[Path]:
    """One OCI archive per version: the busybox base layer, then the env's layer
    (`rebuilt`), or the previous version's layers and a layer of the changes (`chain`).
    `counts` gets each image's number of layers."""
    counts = counts if counts is not None else []
    builder = work / "builder-store"
    tree = work / "tree"
    (tree / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, tree / "bin" / "busybox")
    for cmd in ("sh", "echo", "ls", "cat"):
        os.symlink("busybox", tree / "bin" / cmd)
    pylayers(builder, "snapshot", "-q", "-t", "base", os.fspath(tree))
    site = tree / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    archives = []
    for v in range(series.count()):
        log(f"  building version {v}")
        series.build(site, v)
        parent = f"v{v - 1}" if layout == "chain" and v else "base"
        pylayers(builder, "snapshot", "-q", "-p", parent, "-t", f"v{v}", os.fspath(tree))
        oci_dir = work / f"oci-v{v}"
        pylayers(builder, "export", "--compression", "gzip", f"v{v}", f"oci:{oci_dir}:v{v}")
        archive = work / f"v{v}.tar"
        subprocess.run(["tar", "-C", os.fspath(oci_dir), "-cf", os.fspath(archive), "."],
                       check=True)
        counts.append(image_layers(oci_dir))
        shutil.rmtree(oci_dir)
        archives.append(archive)
    shutil.rmtree(builder)
    shutil.rmtree(tree)
    return archives


# -- containerd and the snapshotter ------------------------------------------------------


class Services:
    """A `pylayers containerd-snapshotter` and a containerd of our own (config, root,
    state and socket in our directories; its proxy plugin points at the snapshotter),
    in a containerd namespace of our own."""

    def __init__(self, work: Path, sockets: Path) -> None:
        self.store = work / "pylayers-store"
        self.root = work / "containerd-root"
        self.snap_sock = sockets / "pylayers.sock"
        self.sock = sockets / "containerd.sock"
        self.namespace = f"pylayers-bench-{os.urandom(4).hex()}"
        self.snap_log = work / "snapshotter.log"
        self.lost_output = 0
        self.ctrd_log = work / "containerd.log"
        self.snap = subprocess.Popen(
            [PY, "-m", "pylayers", "--store", os.fspath(self.store), "containerd-snapshotter",
             "--address", os.fspath(self.snap_sock)],
            stdout=open(self.snap_log, "ab"), stderr=subprocess.STDOUT, cwd="/")
        self.ctrd: subprocess.Popen | None = None
        self._wait(lambda: _answers(self.snap_sock), self.snap, self.snap_log)
        config = sockets / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.root}"\n'
            f'state = "{sockets / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.sock}"\n'
            f'[ttrpc]\n  address = "{self.sock}.ttrpc"\n'
            '[debug]\n  address = ""\n'
            '[metrics]\n  address = ""\n'
            # a removed container's snapshot leaves at once, not after 100 mutations
            '[plugins."io.containerd.gc.v1.scheduler"]\n  deletion_threshold = 1\n'
            "[proxy_plugins]\n  [proxy_plugins.pylayers]\n"
            f'    type = "snapshot"\n    address = "{self.snap_sock}"\n')
        self.ctrd = subprocess.Popen(["containerd", "--config", os.fspath(config)],
                                     stdout=open(self.ctrd_log, "ab"),
                                     stderr=subprocess.STDOUT)
        self._wait(lambda: self.ctr("version", check=False).returncode == 0, self.ctrd,
                   self.ctrd_log)

    @staticmethod
    def _wait(ready, proc: subprocess.Popen, logfile: Path) -> None:
        deadline = time.monotonic() + 60
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{proc.args[0]} did not start: "
                                   f"{logfile.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)

    def argv(self, *args: str) -> list[str]:
        return ["ctr", "-a", os.fspath(self.sock), "-n", self.namespace, *args]

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run(self.argv(*args), capture_output=True, text=True, cwd="/")
        if check and res.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)}: {res.stderr.strip()[-2000:]}")
        return res

    def timed(self, *args: str) -> float:
        t = time.perf_counter()
        self.ctr(*args)
        return time.perf_counter() - t

    def run_first_output(self, snapshotter: str, image: str, cid: str) -> tuple[float, float]:
        """`ctr run --rm`: seconds to its first line of output, and to its exit. A run
        that exits 0 having printed nothing (ctr 1.6 now and then loses a fast
        process's output under load) is run again, and counted in `lost_output`."""
        for attempt in range(3):
            t = time.perf_counter()
            proc = subprocess.Popen(self.argv("run", "--rm", "--snapshotter", snapshotter,
                                              image, f"{cid}-{attempt}", "/bin/echo", "ready"),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
            first = proc.stdout.readline()
            t_first = time.perf_counter() - t
            _out, err = proc.communicate()
            t_exit = time.perf_counter() - t
            if proc.returncode == 0 and first.strip() == b"ready":
                return t_first, t_exit
            if proc.returncode != 0 or first:
                break
            self.lost_output += 1
        raise RuntimeError(f"ctr run on {snapshotter} (exit {proc.returncode}): {first!r} "
                           f"{err.decode(errors='replace')[-2000:]}")

    def disk(self) -> dict[str, int]:
        """Allocated bytes (hard links once) of what each snapshotter keeps."""
        def allocated(p: Path) -> int:
            return tree_bytes(p)[1] if p.exists() else 0
        return {"pylayers_store": allocated(self.store),
                "overlayfs_dir": allocated(self.root / "io.containerd.snapshotter.v1.overlayfs"),
                "content_store": allocated(self.root / "io.containerd.content.v1.content")}

    def settle(self, timeout: float = 60) -> None:
        """Wait until containerd's garbage collector has removed the snapshots of the
        containers `ctr run --rm` deleted (no active snapshot left in either)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            active = [line for s in SNAPSHOTTERS
                      for line in self.ctr("snapshots", "--snapshotter", s, "ls").stdout
                      .splitlines()[1:] if line.split()[-1].lower() == "active"]
            if not active:
                return
            time.sleep(0.3)

    def close(self) -> str:
        """Stop both; the snapshotter's log."""
        try:
            for c in self.ctr("containers", "ls", "-q", check=False).stdout.split():
                self.ctr("tasks", "kill", "-s", "SIGKILL", c, check=False)
                self.ctr("tasks", "rm", "-f", c, check=False)
                self.ctr("containers", "rm", c, check=False)
        finally:
            for proc in (self.ctrd, self.snap):
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            shutil.rmtree(f"/run/containerd/runc/{self.namespace}", ignore_errors=True)
        return self.snap_log.read_text(errors="replace")


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(os.fspath(path))
        except OSError:
            return False
    return True


def _umount_under(root: Path) -> None:
    with open("/proc/mounts") as f:
        points = [line.split()[1] for line in f if line.split()[1].startswith(f"{root}/")]
    for p in sorted(points, reverse=True):
        subprocess.run(["umount", "-l", p], check=False)


# -- the run -----------------------------------------------------------------------------


def run_bench(series: Series, work: Path, runs: int, layout: str = "rebuilt") -> dict:
    log(f"building {series.count()} image versions ({layout})")
    t = time.perf_counter()
    layer_counts: list[int] = []
    archives = build_images(series, work, layout, layer_counts)
    build_s = time.perf_counter() - t
    sockets = Path(tempfile.mkdtemp(prefix="plb-ctrd-", dir="/tmp"))  # paths < 108 bytes
    svc = Services(work, sockets)
    versions: list[dict] = []
    warm: dict[str, list[tuple[float, float]]] = {s: [] for s in SNAPSHOTTERS}
    try:
        for v, archive in enumerate(archives):
            row: dict = {"version": v, "archive_bytes": archive.stat().st_size,
                         "image_layers": layer_counts[v],
                         "import_s": {}, "run_first_output_s": {}, "run_exit_s": {}}
            row["ingest_s"] = svc.timed("image", "import", "--no-unpack", "--base-name",
                                        "example.com/ingest", os.fspath(archive))
            order = SNAPSHOTTERS if v % 2 == 0 else SNAPSHOTTERS[::-1]
            for s in order:
                row["import_s"][s] = svc.timed(
                    "image", "import", "--snapshotter", s, "--base-name",
                    f"example.com/env-{s}", os.fspath(archive))
            for s in order:
                first, done = svc.run_first_output(s, f"example.com/env-{s}:v{v}",
                                                   f"first-{s}-{v}")
                row["run_first_output_s"][s], row["run_exit_s"][s] = first, done
            svc.settle()
            row["disk"] = svc.disk()
            d = row["disk"]
            log(f"  v{v}: import pylayers {row['import_s']['pylayers']:.2f} s, overlayfs "
                f"{row['import_s']['overlayfs']:.2f} s; pylayers store "
                f"{d['pylayers_store'] / 1e6:.1f} MB, overlayfs {d['overlayfs_dir'] / 1e6:.1f} "
                f"MB, content {d['content_store'] / 1e6:.1f} MB")
            versions.append(row)
        last = len(archives) - 1
        for i in range(runs):
            for s in (SNAPSHOTTERS if i % 2 == 0 else SNAPSHOTTERS[::-1]):
                warm[s].append(svc.run_first_output(s, f"example.com/env-{s}:v{last}",
                                                    f"warm-{s}-{i}"))
        svc.settle()
        du = json.loads(pylayers(svc.store, "du", "--json"))
    finally:
        snap_log = svc.close()
        _umount_under(work)
        _umount_under(sockets)
        shutil.rmtree(sockets, ignore_errors=True)
    tracebacks = snap_log.count("Traceback")
    return {"layout": layout, "versions": versions, "warm_runs": warm, "pylayers_du": du,
            "build_images_s": build_s, "snapshotter_tracebacks": tracebacks,
            "runs_without_output": svc.lost_output}


def summarize(res: dict) -> dict:
    vs = res["versions"]
    last = vs[-1]["disk"]
    out: dict = {}
    for s in SNAPSHOTTERS:
        imports = [r["import_s"][s] for r in vs]
        out[s] = {
            "import_median_s": statistics.median(imports),
            "import_median_later_s": statistics.median(imports[1:]) if len(vs) > 1 else None,
            "first_run_first_output_median_s":
                statistics.median(r["run_first_output_s"][s] for r in vs),
            "warm_run_first_output_median_s":
                statistics.median(f for f, _ in res["warm_runs"][s]) if res["warm_runs"][s]
                else None,
            "warm_run_exit_median_s":
                statistics.median(e for _, e in res["warm_runs"][s]) if res["warm_runs"][s]
                else None,
        }
    out["disk_last"] = {
        "pylayers_store": last["pylayers_store"], "overlayfs_dir": last["overlayfs_dir"],
        "content_store": last["content_store"],
        "ratio_snapshotter": last["overlayfs_dir"] / last["pylayers_store"],
        "ratio_with_content": (last["overlayfs_dir"] + last["content_store"])
        / (last["pylayers_store"] + last["content_store"]),
    }
    return out


def mb(b: float) -> str:
    return f"{b / 1e6:,.1f}"


def markdown(doc: dict) -> str:
    res, summ = doc["result"], doc["summary"]
    lines = [f"# containerd: pylayers against overlayfs ({doc['started']})", "",
             f"`{doc['command']}` at {doc['git_rev']}; {doc['series']}.", "",
             f"Machine: {doc['machine']['cpu']}, {doc['machine']['cores']} cores, work dir on "
             f"{doc['machine']['filesystem']}; {doc['containerd']}.", "",
             LAYOUTS[res["layout"]] + " (gzip OCI archives by `pylayers export`). Disk: "
             "allocated bytes, hard links once, after the version was imported into both "
             "snapshotters and run once; "
             "containerd's content store (the compressed blobs) is the same for both.", "",
             "| version | layers | archive MB | pylayers store MB | overlayfs dir MB | overlayfs / "
             "pylayers | content store MB | totals (+ content) ratio | import s pylayers "
             "| import s overlayfs | first run, to output s pylayers | overlayfs |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["versions"]:
        d = r["disk"]
        lines.append(
            f"| v{r['version']} | {r['image_layers']} | {mb(r['archive_bytes'])} | "
            f"{mb(d['pylayers_store'])} | "
            f"{mb(d['overlayfs_dir'])} | {d['overlayfs_dir'] / d['pylayers_store']:.2f}× | "
            f"{mb(d['content_store'])} | "
            f"{(d['overlayfs_dir'] + d['content_store']) / (d['pylayers_store'] + d['content_store']):.2f}× | "  # noqa: E501
            f"{r['import_s']['pylayers']:.2f} | {r['import_s']['overlayfs']:.2f} | "
            f"{r['run_first_output_s']['pylayers']:.3f} | "
            f"{r['run_first_output_s']['overlayfs']:.3f} |")
    p, o = summ["pylayers"], summ["overlayfs"]

    def ratio(a, b):
        return f"{a / b:.2f}×" if a and b else "–"
    lines += ["", "Medians (pylayers / overlayfs as the ratio):", "",
              "| | pylayers | overlayfs | ratio |", "|---|---:|---:|---:|",
              f"| import, every version (s) | {p['import_median_s']:.2f} | "
              f"{o['import_median_s']:.2f} | {ratio(p['import_median_s'], o['import_median_s'])} |"]
    if p["import_median_later_s"] is not None:
        lines.append(f"| import, versions after the first (s) | {p['import_median_later_s']:.2f} "
                     f"| {o['import_median_later_s']:.2f} | "
                     f"{ratio(p['import_median_later_s'], o['import_median_later_s'])} |")
    lines.append(f"| first `ctr run` of each version, to first output (s) | "
                 f"{p['first_run_first_output_median_s']:.3f} | "
                 f"{o['first_run_first_output_median_s']:.3f} | "
                 f"{ratio(p['first_run_first_output_median_s'], o['first_run_first_output_median_s'])} |")  # noqa: E501
    if p["warm_run_first_output_median_s"] is not None:
        n = len(res["warm_runs"]["pylayers"])
        lines += [f"| later `ctr run` of the last version ×{n}, to first output (s) | "
                  f"{p['warm_run_first_output_median_s']:.3f} | "
                  f"{o['warm_run_first_output_median_s']:.3f} | "
                  f"{ratio(p['warm_run_first_output_median_s'], o['warm_run_first_output_median_s'])} |",  # noqa: E501
                  f"| same, to exit (s) | {p['warm_run_exit_median_s']:.3f} | "
                  f"{o['warm_run_exit_median_s']:.3f} | "
                  f"{ratio(p['warm_run_exit_median_s'], o['warm_run_exit_median_s'])} |"]
    d = summ["disk_last"]
    du = res["pylayers_du"]
    lines += ["", f"After v{res['versions'][-1]['version']}: overlayfs keeps "
              f"{mb(d['overlayfs_dir'])} MB, pylayers {mb(d['pylayers_store'])} MB "
              f"(overlayfs / pylayers: {d['ratio_snapshotter']:.2f}×); with the content store "
              f"({mb(d['content_store'])} MB) added to both, {d['ratio_with_content']:.2f}×. "
              f"`pylayers du`: {du.get('layers')} layers, {mb(du.get('logical_bytes', 0))} MB "
              f"logical, dedup {du.get('dedup_ratio')}×, packs {mb(du.get('pack_bytes', 0))} MB, "
              f"layer cache {mb(du.get('cache_bytes', 0))} MB, index "
              f"{mb(du.get('index_bytes', 0))} MB.",
              "", f"Building the images took {res['build_images_s']:.0f} s (untimed above); "
              f"tracebacks in the snapshotter's log: {res['snapshotter_tracebacks']}; "
              f"`ctr run`s that printed nothing and were run again: "
              f"{res.get('runs_without_output', 0)}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_containerd",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--wheels", action="store_true",
                    help="the real Python env series (bench.pyenv_wheels) instead of the "
                         "synthetic one")
    ap.add_argument("--cache", type=Path, help="the wheels' cache (default: pyenv_wheels')")
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="rebuilt",
                    help="rebuilt: the env whole in one layer per version; chain: one "
                         "layer of changes per version")
    ap.add_argument("--versions", type=int, help="versions (default: 3 synthetic, every "
                    "wheels version)")
    ap.add_argument("--tiny", action="store_true", help="a tiny env (a smoke test)")
    ap.add_argument("--env-mib", type=int, default=24, help="synthetic env size")
    ap.add_argument("--packages", type=int, default=12, help="synthetic env packages")
    ap.add_argument("--runs", type=int, default=5, help="warm `ctr run`s per snapshotter")
    ap.add_argument("--work", type=Path, help="work directory (default: a new one in "
                    "$TMPDIR, removed after)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    ap.add_argument("--name", help="output file prefix (default: containerd[-wheels])")
    args = ap.parse_args(argv)
    if (why := missing()) is not None:
        log(f"bench_containerd: skipped: {why}")
        return 0
    if args.wheels:
        from .pyenv_wheels import DEFAULT_CACHE, fetch, have_all
        cache = args.cache or DEFAULT_CACHE
        if not have_all(cache):
            log(f"fetching the env series' wheels into {cache} (once)")
            fetch(cache)
        series: Series = WheelsSeries(cache, args.versions)
    elif args.tiny:
        series = TinySeries(args.versions or 2)
    else:
        series = SyntheticSeries(args.versions or 3, args.env_mib, args.packages)
    work = args.work or Path(tempfile.mkdtemp(prefix="pylayers-bench-ctrd-"))
    work.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    try:
        res = run_bench(series, work, args.runs, args.layout)
        mach = machine(work)
    finally:
        _umount_under(work)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    version = subprocess.run(["containerd", "--version"], capture_output=True,
                             text=True).stdout.split()
    doc = {"started": started, "series": series.describe(), "machine": mach,
           "containerd": " ".join(["containerd", *version[2:3]]),
           "command": " ".join(["python -m bench.bench_containerd",
                                *(argv if argv is not None else sys.argv[1:])]),
           "git_rev": git_rev(), "result": res, "summary": summarize(res)}
    name = args.name or "-".join(["containerd", *(["wheels"] if args.wheels else []),
                                  *([args.layout] if args.layout != "rebuilt" else [])])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    text = markdown(doc)
    (args.out / f"{name}.md").write_text(text)
    print(text)
    return 1 if res["snapshotter_tracebacks"] else 0


if __name__ == "__main__":
    sys.exit(main())
