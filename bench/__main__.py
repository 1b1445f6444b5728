"""pylayers against tar-based layer stores and peer tools, side by side.

    pip install '.[bench]'                  # what the benchmark imports
    python -m bench --quick [--out DIR]     # small data, every scenario, < 3 min
    python -m bench --full  [--out DIR]     # the issue's sizes (long; downloads wheels once)
    python -m bench --full --scale 0.1      # the full profile with a tenth of the data

Writes bench-{quick,full}.json, .md and .png plots into --out (default bench/out, which
git ignores; the committed runs are in bench/results: `--out bench/results`). Peer tools
that are not installed are left out of the comparison and named in the report;
`--install` installs them first (Debian packages as root, and the bench extra's Python
packages), nothing is installed without it.
Every comparison runs all stores on the same data in the same run, alternating, as
separate processes; see bench/runner.py for what is timed and bench/report.py for the
targets checked.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import install
from .proc import git_rev

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "out"


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench",
                                 description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small data (default)")
    mode.add_argument("--full", action="store_true", help="the issue's sizes")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="where results go (default: bench/out, untracked)")
    ap.add_argument("--name", help="output file prefix (default: bench-quick / bench-full)")
    ap.add_argument("--work", type=Path,
                    help="work directory (default: a new directory in /dev/shm for --quick "
                         "when it has room, else in $TMPDIR)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply data sizes")
    ap.add_argument("--repeat", type=int, help="alternated runs of checkouts, re-snapshots")
    ap.add_argument("--chain-repeat", type=int, help="runs of each whole scenario")
    ap.add_argument("--scenarios", help="comma-separated scenario keys (default: all)")
    ap.add_argument("--tools", help="comma-separated store keys (default: all installed)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the work directory: stores, last trees (needs --work)")
    ap.add_argument("--install", action="store_true",
                    help="install missing peer tools (apt-get, as root) and Python packages "
                         "(pip) first; without it nothing is installed")
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--no-core", action="store_true")
    ap.add_argument("--wheel-cache", type=Path, help="wheels for the realistic chain (full)")
    return ap.parse_args()


def main() -> None:
    args = parse()
    if not args.install and (missing := install.missing_modules()):
        sys.exit(f"python -m bench: {', '.join(missing)} not installed: run "
                 "`pip install '.[bench]'` (or pass --install)")
    not_installed = install.ensure(install=args.install)
    # imported here, once the bench extra is known to be there (numpy, matplotlib)
    from . import competitors
    from .proc import machine
    from .profiles import PROFILES
    from .runner import Options, log, run_scenario
    from .scenarios import main_scenarios

    profile = PROFILES["full" if args.full else "quick"].scaled(args.scale)
    overrides = {}
    if args.repeat:
        overrides["repeat"] = overrides["middle_repeat"] = args.repeat
    if args.chain_repeat:
        overrides["chain_repeat"] = args.chain_repeat
    if overrides:
        from dataclasses import replace
        profile = replace(profile, **overrides)
    t0 = time.perf_counter()
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")

    tools_info: dict[str, dict] = {}
    classes = []
    wanted = set(args.tools.split(",")) if args.tools else None
    for cls in competitors.ALL:
        if wanted and cls.key not in wanted:
            continue
        miss = cls.missing()
        info = {"label": cls.label, "settings": cls.settings}
        if miss:
            info["status"] = f"not installed ({', '.join(miss)})"
            log(f"{cls.key}: not installed ({', '.join(miss)}), skipped")
        else:
            info["version"] = cls.version()
            classes.append(cls)
        tools_info[cls.key] = info

    left_out: list[str] = []
    wheel_cache = None
    if profile.wheels:
        wheel_cache = _wheels(args.wheel_cache, left_out)
    scns = main_scenarios(profile, wheel_cache)
    if "smallfiles" not in profile.scenarios:
        left_out.append("many small files (full mode only)")
    if args.scenarios:
        keep = set(args.scenarios.split(","))
        scns = [s for s in scns if s.key in keep]

    work = args.work or Path(tempfile.mkdtemp(prefix="pylayers-bench-",
                                              dir=_default_parent(profile.name)))
    work.mkdir(parents=True, exist_ok=True)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    prefix = args.name or f"bench-{profile.name}"
    results: dict = {
        "profile": profile.as_dict(), "machine": machine(work), "started": started,
        "pylayers_version": competitors.Pylayers.version(), "git_rev": git_rev(),
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "tools": tools_info, "not_installed": not_installed, "scenarios": [],
        "scaling": {}, "core": None, "left_out": left_out, "duration_s": 0,
    }
    if args.scale != 1:
        results["reduced"] = f"data sizes × {args.scale} of the {profile.name} profile"
    opts = Options(repeat=profile.repeat, middle_repeat=profile.middle_repeat,
                   chain_repeat=profile.chain_repeat, keep=args.keep and args.work is not None)
    try:
        for scn in scns:
            log(f"scenario {scn.key}: {scn.describe()}")
            results["scenarios"].append(run_scenario(scn, classes, work / scn.key, opts))
            _save(results, out, prefix, t0)
        if not args.no_scaling:
            _scaling(results, profile, classes, work)
            _save(results, out, prefix, t0)
        if not args.no_core:
            results["core"] = _core(profile, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    _save(results, out, prefix, t0, final=True)
    print((out / f"{prefix}.md").read_text())


def _scaling(results: dict, profile, classes, work: Path) -> None:
    from .runner import Options, log, run_scenario
    from .scenarios import LayerChain, Scaling

    light = Options(repeat=1, middle_repeat=1, chain_repeat=1, unchanged=False,
                    reference=False, verify=False)
    runs = [Scaling(profile)] + ([LayerChain(profile)] if profile.layer_counts else [])
    for scn in runs:
        log(f"scaling: {scn.key}: {scn.describe()}")
        results["scaling"][scn.key] = run_scenario(scn, classes, work / scn.key, light)


def _core(profile, work: Path) -> dict:
    from .bench_snapshot import make_big_file
    from .core import bench_core
    from .runner import log
    path = work / "core.bin"
    make_big_file(path, max(1, profile.core_bytes >> 20))
    log("core primitives")
    try:
        return bench_core(path, profile.repeat)
    finally:
        path.unlink()


def _wheels(cache: Path | None, left_out: list[str]) -> Path | None:
    from .pyenv_wheels import DEFAULT_CACHE, fetch, have_all
    from .runner import log
    cache = cache or DEFAULT_CACHE
    if not have_all(cache):
        log(f"fetching the realistic chain's wheels into {cache} (once)")
        try:
            fetch(cache)
        except (subprocess.CalledProcessError, OSError) as e:
            left_out.append(f"the real-wheels chain (fetching wheels failed: {e})")
            return None
    return cache


def _default_parent(profile: str) -> str | None:
    """Quick runs work in memory (tmpfs) when there is room: on a shared machine a
    disk's latency swamps the small trees; full runs need the disk's space."""
    shm = Path("/dev/shm")
    if profile == "quick" and shm.is_dir() and shutil.disk_usage(shm).free > 4 << 30:
        return os.fspath(shm)
    return None


def _save(results: dict, out: Path, prefix: str, t0: float, final: bool = False) -> None:
    from . import plots, report
    results["duration_s"] = round(time.perf_counter() - t0, 1)
    results["targets"] = report.targets(results)
    tmp = out / f"{prefix}.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    tmp.replace(out / f"{prefix}.json")
    (out / f"{prefix}.md").write_text(report.markdown(results))
    if final and results["scenarios"]:
        plots.all_plots(results, out, prefix)


if __name__ == "__main__":
    main()
