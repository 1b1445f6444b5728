"""Snapshot throughput against baselines run side by side in one script.

Each comparison runs pylayers and its baseline alternately, `--repeat` times, as
separate processes (so both pay process start-up), and reports medians and the ratio:

- resnapshot: a large file already stored, mtime touched, snapshotted again, against
  single-thread BLAKE3 (`b3sum --num-threads 1`) hashing the same file;
- new data: a first snapshot of that file into an empty store, against `zstd -1 -T1`
  compressing it (to /dev/null, and to a file with fsync, as a store must);
- no-change: re-snapshot of 100,000 files of 1-8 KiB onto their own layer, against a
  bare `os.scandir` + `lstat` walk of the tree in a Python process;
- peak RSS of snapshotting the largest file.

Run: python -m bench.bench_snapshot [--big-mib 2048] [--files 100000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable
WALK = """
import os, sys
def walk(p):
    with os.scandir(p) as it:
        for d in it:
            d.stat(follow_symlinks=False)
            if d.is_dir(follow_symlinks=False):
                walk(d.path)
walk(os.fsencode(sys.argv[1]))
"""


def run(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """Wall time and peak RSS (KiB) of one command."""
    t = time.perf_counter()
    # cwd="/": from the repository root, `python -m pylayers` would import the source
    # tree, which has no compiled core, instead of the installed package.
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                         cwd="/")
    _, status, usage = os.wait4(p.pid, 0)
    elapsed = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode() if p.stderr else ""
    if p.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({p.returncode}): {err.strip()}")
    return elapsed, usage.ru_maxrss


def make_big_file(path: Path, mib: int, seed: int = 1) -> None:
    """Half text-like, half random, in 1 MiB blocks: compressible like real layers are,
    with no repeated chunks."""
    rnd = random.Random(seed)
    words = [bytes(rnd.choices(b"abcdefghijklmnopqrstuvwxyz_./", k=rnd.randint(2, 12)))
             for _ in range(20000)]
    pool = b" ".join(rnd.choices(words, k=(8 << 20) // 6))
    with open(path, "wb") as f:
        for _ in range(mib):
            off = rnd.randrange(0, len(pool) - (512 << 10))
            f.write(pool[off : off + (512 << 10)])
            f.write(os.urandom(512 << 10))


def make_small_tree(root: Path, files: int, seed: int = 3) -> None:
    rnd = random.Random(seed)
    per_dir = 100
    for i in range(files):
        d = root / f"d{i // (per_dir * 10):03}" / f"s{(i // per_dir) % 10}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i % per_dir:03}").write_bytes(rnd.randbytes(rnd.randint(1024, 8192)))


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def pylayers(store: Path, *args: str) -> list[str]:
    return [PY, "-m", "pylayers", "--store", str(store), *args]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big-mib", type=int, default=2048)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", help="work directory (default: a temp dir, removed after)")
    ap.add_argument("--out", default="bench/out/snapshot.json")
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="pylayers-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine()}
    try:
        big_dir = work / "big"
        big_dir.mkdir(exist_ok=True)
        big = big_dir / "data.bin"
        if not big.exists() or big.stat().st_size != args.big_mib << 20:
            print(f"generating {args.big_mib} MiB file...", file=sys.stderr)
            make_big_file(big, args.big_mib)
        size = big.stat().st_size

        # new data: fresh store each time, against zstd -1
        t_new, t_z, t_zf, rss = [], [], [], []
        for i in range(args.repeat):
            store = work / f"store-new-{i}"
            shutil.rmtree(store, ignore_errors=True)
            t, m = run(pylayers(store, "snapshot", str(big_dir)))
            t_new.append(t)
            rss.append(m)
            t_z.append(run(["zstd", "-1", "-T1", "-q", "-c", str(big), "-o", "/dev/null"])[0])
            zf = work / "out.zst"
            t_zf.append(run(["sh", "-c", f"zstd -1 -T1 -q -f '{big}' -o '{zf}' && sync '{zf}'"])[0])
            zf.unlink()
            if i:
                shutil.rmtree(store)
        store = work / "store-new-0"
        stored = sum(f.stat().st_size for f in store.rglob("*.pack"))
        results["new_data"] = {
            "bytes": size, "pylayers_s": median(t_new), "zstd1_devnull_s": median(t_z),
            "zstd1_file_fsync_s": median(t_zf),
            "ratio_vs_zstd1_devnull": median(t_z) / median(t_new),
            "ratio_vs_zstd1_file": median(t_zf) / median(t_new),
            "packed_bytes": stored, "peak_rss_mib": max(rss) / 1024,
        }

        # re-snapshot of stored data with mtime touched, against b3sum
        t_re, t_b3 = [], []
        for _ in range(args.repeat):
            os.utime(big)
            t_re.append(run(pylayers(store, "snapshot", str(big_dir)))[0])
            t_b3.append(run(["b3sum", "--num-threads", "1", str(big)])[0])
        results["resnapshot_touched"] = {
            "bytes": size, "pylayers_s": median(t_re), "b3sum_1thread_s": median(t_b3),
            "pylayers_gb_per_s": size / median(t_re) / 1e9,
            "time_vs_blake3": median(t_re) / median(t_b3),
        }

        # no-change re-snapshot of many small files, against a scandir+lstat walk
        small = work / "small"
        if not small.exists():
            print(f"generating {args.files} small files...", file=sys.stderr)
            make_small_tree(small, args.files)
            time.sleep(1.2)  # let ctimes leave the stat cache's racy window
        sstore = work / "store-small"
        shutil.rmtree(sstore, ignore_errors=True)
        run(pylayers(sstore, "snapshot", str(small), "--tag", "base"))
        t_nc, t_walk = [], []
        for _ in range(args.repeat):
            t_nc.append(run(pylayers(sstore, "snapshot", str(small), "--parent", "base"))[0])
            t_walk.append(run([PY, "-c", WALK, str(small)])[0])
        results["nochange_small_files"] = {
            "files": args.files, "pylayers_s": median(t_nc), "walk_s": median(t_walk),
            "time_vs_walk": median(t_nc) / median(t_walk),
        }
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": sys.version.split()[0]}


if __name__ == "__main__":
    main()
