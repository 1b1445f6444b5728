"""CPU cost of a first snapshot of all-new data, against `tar | zstd` side by side.

    python -m bench.bench_ingest --tree DIR [--repeat 3] [--work DIR] [--json FILE]
                                 [--pylayers NAME=PYTHON ...] [--profile FILE]

On the same tree, in one run, alternating, each its own process (all pay start-up):

- `pylayers snapshot -q TREE` into a fresh store (one per `--pylayers` interpreter:
  `NAME=PYTHON` runs `PYTHON -m pylayers`, so two installs, before and after a change,
  can be compared in one run; default: this interpreter);
- `tar -cf - TREE | zstd -1 -T1`, `| zstd -3 -T1` and `| zstd -3 -T2` (the peers), and
  `zstd -1 -T1` / `zstd -3 -T1` of a tar file made once (zstd's own CPU, without tar's).

Each command's CPU seconds (user + sys, by the kernel: the rusage of the process and
the children it waited for), wall seconds and output bytes (a store: its whole
directory, index included; a peer: its compressed stream, written to a file beside
the stores; for a store, a digest of its packs, equal when two stores hold the same
frames). Reported as medians of `--repeat`, with the tree's bytes per CPU second
and per wall second as ratios to `zstd -1 -T1` (tar's CPU included, and not), and the
output size as a ratio to `tar | zstd -3`. The page cache is warmed first (one tar
read), so no command pays for the disk. `--profile FILE` also writes the last
`--pylayers` snapshot's `perf record` summary (per thread) to FILE, when perf is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from .proc import machine, tree_bytes

MB = 1e6


def timed(argv: list[str] | str, cwd: str = "/") -> tuple[float, float, float, float]:
    """(wall, user, sys, user+sys) seconds of one command and everything it waited
    for. A string is a shell pipeline (`sh -c`). From "/": from the repository root,
    `python -m pylayers` would import the source tree, which has no compiled core."""
    argv = ["sh", "-c", argv] if isinstance(argv, str) else argv
    t = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, cwd=cwd)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    p.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)[:200]} failed: {err.strip()[-2000:]}")
    return wall, ru.ru_utime, ru.ru_stime, ru.ru_utime + ru.ru_stime


def dir_bytes(root: Path) -> int:
    """Bytes of a store directory's files, index included (LMDB's lock file left out:
    its size is the reader table's, not the data's)."""
    return sum(f.stat().st_size for f in root.rglob("*")
               if f.is_file() and f.name != "lock.mdb")


def packs_digest(store: Path) -> str:
    """SHA-256 over the store's packs' SHA-256s, sorted (pack names are random): equal
    for two stores holding the same frames."""
    import hashlib

    sums = sorted(hashlib.sha256(p.read_bytes()).hexdigest()
                  for p in store.glob("packs/*/*.pack"))
    return hashlib.sha256("".join(sums).encode()).hexdigest()[:16]


def q(path: Path | str) -> str:
    return "'" + os.fspath(path).replace("'", "'\\''") + "'"


def commands(tree: Path, work: Path, tarfile: Path,
             pythons: dict[str, str]) -> dict[str, tuple[list[str] | str, Path]]:
    """name -> (command, what it writes: a store directory or a file)."""
    out: dict[str, tuple[list[str] | str, Path]] = {}
    for name, py in pythons.items():
        store = work / f"store-{name}"
        out[name] = ([py, "-m", "pylayers", "--store", os.fspath(store), "snapshot", "-q",
                      os.fspath(tree)], store)
    tar = f"tar -C {q(tree)} -cf - ."
    for label, z in (("tar|zstd -1 -T1", "zstd -1 -T1"), ("tar|zstd -3 -T1", "zstd -3 -T1"),
                     ("tar|zstd -3 -T2", "zstd -3 -T2")):
        dest = work / (label.replace("|", "-").replace(" ", "") + ".zst")
        out[label] = (f"{tar} | {z} -q -c > {q(dest)}", dest)
    for level in (1, 3):
        dest = work / f"zstd{level}-only.zst"
        out[f"zstd -{level} -T1 (tar file)"] = (
            ["zstd", f"-{level}", "-T1", "-q", "-f", os.fspath(tarfile), "-o", os.fspath(dest)],
            dest)
    return out


def measure(tree: Path, work: Path, repeat: int, pythons: dict[str, str]) -> dict:
    raw, _ = tree_bytes(tree)
    tarfile = work / "tree.tar"
    subprocess.run(["tar", "-C", os.fspath(tree), "-cf", os.fspath(tarfile), "."], check=True)
    cmds = commands(tree, work, tarfile, pythons)
    runs: dict[str, list[tuple[float, float, float, float]]] = {k: [] for k in cmds}
    sizes: dict[str, int] = {}
    digests: dict[str, str] = {}
    for _ in range(repeat):
        for name, (argv, dest) in cmds.items():
            if dest.is_dir():
                shutil.rmtree(dest)
            elif dest.exists():
                dest.unlink()
            runs[name].append(timed(argv))
            sizes[name] = dir_bytes(dest) if dest.is_dir() else dest.stat().st_size
            if dest.is_dir():
                digests[name] = packs_digest(dest)
    res: dict = {"tree": os.fspath(tree), "tree_bytes": raw, "tar_bytes": tarfile.stat().st_size,
                 "repeat": repeat, "commands": {}}
    for name, (argv, _) in cmds.items():
        rs = runs[name]
        res["commands"][name] = {
            "argv": argv if isinstance(argv, str) else " ".join(argv),
            "wall_s": statistics.median(r[0] for r in rs),
            "user_s": statistics.median(r[1] for r in rs),
            "sys_s": statistics.median(r[2] for r in rs),
            "cpu_s": statistics.median(r[3] for r in rs),
            "cpu_s_all": [round(r[3], 3) for r in rs],
            "wall_s_all": [round(r[0], 3) for r in rs],
            "bytes": sizes[name],
        }
        if name in digests:
            res["commands"][name]["packs_sha256"] = digests[name]
    return res


def table(res: dict) -> str:
    raw = res["tree_bytes"]
    c = res["commands"]
    z1 = c["tar|zstd -1 -T1"]
    z1only = c["zstd -1 -T1 (tar file)"]
    z3 = c["tar|zstd -3 -T1"]["bytes"]
    lines = [f"tree {res['tree']}: {raw / MB:.1f} MB, medians of {res['repeat']}",
             "", "| command | CPU s (user+sys) | wall s | MB/s per CPU s | vs tar\\|zstd -1 "
             "per CPU s | vs zstd -1 alone per CPU s | wall MB/s | vs tar\\|zstd -1 wall | "
             "output MB | vs tar\\|zstd -3 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, x in c.items():
        lines.append(
            f"| {name} | {x['cpu_s']:.2f} ({x['user_s']:.2f}+{x['sys_s']:.2f}) | "
            f"{x['wall_s']:.2f} | {raw / x['cpu_s'] / MB:.0f} | {z1['cpu_s'] / x['cpu_s']:.2f} | "
            f"{z1only['cpu_s'] / x['cpu_s']:.2f} | {raw / x['wall_s'] / MB:.0f} | "
            f"{z1['wall_s'] / x['wall_s']:.2f} | {x['bytes'] / MB:.2f} | {x['bytes'] / z3:.3f} |")
    lines += [f"\n{name}: packs {x['packs_sha256']}" for name, x in c.items()
              if "packs_sha256" in x]
    return "\n".join(lines)


def perf_summary(argv: list[str], out: Path, work: Path) -> None:
    """`perf record` of one command; the share of samples per thread and its top
    symbols, written to `out`."""
    import collections
    import re

    data = work / "perf.data"
    subprocess.run(["perf", "record", "-q", "-F", "1999", "-o", os.fspath(data), "--", *argv],
                   check=True, cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    script = subprocess.run(["perf", "script", "-i", os.fspath(data), "-F", "tid,ip,sym,dso"],
                            capture_output=True, text=True, check=True).stdout
    data.unlink()
    by_dso: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    by_sym: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    total: collections.Counter = collections.Counter()
    for line in script.splitlines():
        m = re.match(r"\s*(\d+)\s+\S+\s+(.*?)\s+\((.*)\)$", line)
        if not m:
            continue
        tid, sym, dso = m.groups()
        by_dso[tid][dso.rsplit("/", 1)[-1].split(".")[0]] += 1
        by_sym[tid][sym] += 1
        total[tid] += 1
    n_all = sum(total.values()) or 1
    lines = [f"perf record -F 1999 of: {' '.join(argv)}", f"{n_all} samples"]
    for tid, n in total.most_common(8):
        lines.append(f"\nthread {tid}: {n / n_all:.1%} of samples")
        lines.append("  by object: " + ", ".join(f"{k} {v / n:.0%}"
                                               for k, v in by_dso[tid].most_common(6)))
        for sym, v in by_sym[tid].most_common(15):
            lines.append(f"  {v / n:6.1%} {sym}")
    out.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path,
                    help="the data (default: this interpreter's site-packages)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", type=Path, help="where stores and outputs go (default: a "
                    "new directory in /dev/shm, removed after)")
    ap.add_argument("--pylayers", action="append", default=[], metavar="NAME=PYTHON",
                    help="an interpreter whose pylayers to run (repeatable)")
    ap.add_argument("--profile", type=Path, help="write a perf summary of one snapshot here")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tree = (args.tree or Path(sysconfig.get_paths()["purelib"])).resolve()
    pythons = dict(p.split("=", 1) for p in args.pylayers) or {"pylayers": sys.executable}
    base = args.work or Path("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=base))
    load = os.getloadavg()
    try:
        subprocess.run(f"tar -C {q(tree)} -cf - . > /dev/null", shell=True, check=True)
        res = measure(tree, work, args.repeat, pythons)
        if args.profile and shutil.which("perf"):
            name = list(pythons)[-1]
            store = work / "store-profile"
            perf_summary([pythons[name], "-m", "pylayers", "--store", os.fspath(store),
                          "snapshot", "-q", os.fspath(tree)], args.profile, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["machine"] = machine(base)
    res["load_before"] = load
    print(table(res))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
