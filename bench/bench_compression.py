"""How the store's frames should be compressed, measured on several kinds of data.

    python -m bench.bench_compression [--data NAME=DIR ...] [--mib 150] [--repeat 3]
                                      [--store] [--json FILE]

Each data set is a directory read in walk order (sorted names, as a snapshot reads it),
identical files stored once, files cut into 64 KiB pieces (the chunker's average) and
the pieces grouped into frames the way the pack writer groups chunks: a frame closes
once it holds the target. Every variant compresses the same frames in this one process,
alternating variants per repeat; sizes are exact, times are medians of `--repeat`.

Variants: zstd levels, frame targets (1 and 4 MiB), long-distance matching, a level
chosen per frame from a fast trial, a larger hash table, the x86 call filter (on the
frames that look like machine code, as the writer does, or on every frame), and 2
threads compressing frames (zstandard releases the GIL) against 1. References, on a tar
of the same files, side by side: `zstd -1` and `zstd -3` (one thread each, CPU seconds
measured by the kernel).
`--store` also snapshots each data set into a real store with the installed pylayers
(from `/`, so the installed package is used) and compares the whole store directory,
index included, with `tar | zstd -3`.

Default data sets: a pip-built environment (the bench wheels chain's first version when
built, else this interpreter's site-packages), C headers (/usr/include), shared
libraries (/usr/lib/x86_64-linux-gnu) and already-compressed files (the wheel cache's
.whl zips, or /usr/share/doc's .gz files).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import zstandard

MiB = 1 << 20
PIECE = 64 << 10


def default_sets() -> dict[str, Path]:
    from .pyenv_wheels import DEFAULT_CACHE
    env = Path("/tmp/cmp/envs/v0")
    sets = {"pyenv": env if env.is_dir() else Path(sysconfig.get_paths()["purelib"]),
            "headers": Path("/usr/include"),
            "binaries": Path("/usr/lib/x86_64-linux-gnu")}
    sets["compressed"] = DEFAULT_CACHE if DEFAULT_CACHE.is_dir() else Path("/usr/share/doc")
    return sets


def walk_files(root: Path, limit: int, only: Callable[[str], bool] | None = None) -> list[Path]:
    """Regular files under `root` in walk order (sorted), up to `limit` bytes in all."""
    out: list[Path] = []
    total = 0
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            p = Path(dirpath, name)
            if p.is_symlink() or not p.is_file() or (only and not only(name)):
                continue
            size = p.stat().st_size
            if total + size > limit:
                continue
            out.append(p)
            total += size
    return out


def frames_of(files: list[Path], target: int) -> tuple[list[bytes], int]:
    """The frames a pack writer would make of these files; (frames, unique bytes)."""
    seen: set[bytes] = set()
    frames: list[bytes] = []
    cur: list[bytes] = []
    cur_len = 0
    for p in files:
        data = p.read_bytes()
        h = blake3.blake3(data).digest()
        if h in seen or not data:
            continue
        seen.add(h)
        for i in range(0, len(data), PIECE):
            piece = data[i:i + PIECE]
            cur.append(piece)
            cur_len += len(piece)
            if cur_len >= target:
                frames.append(b"".join(cur))
                cur, cur_len = [], 0
    if cur:
        frames.append(b"".join(cur))
    return frames, sum(len(f) for f in frames)


def make_cctx(level: int, ldm: bool = False, hash_log: int = 0) -> zstandard.ZstdCompressor:
    if not ldm and not hash_log:
        return zstandard.ZstdCompressor(level=level)
    extra: dict = {"enable_ldm": True, "window_log": 27} if ldm else {}
    if hash_log:
        extra["hash_log"] = hash_log
    params = zstandard.ZstdCompressionParameters.from_level(level, **extra)
    return zstandard.ZstdCompressor(compression_params=params)


def x86_filtered(frame: bytes, every: bool) -> bytes:
    """The frame through pylayers' x86 call filter (csrc/x86.h) when it looks like
    machine code (as the pack writer decides), or always with `every`."""
    from pylayers import _native
    from pylayers.store.packs import looks_like_x86

    if not every and not looks_like_x86(frame):
        return frame
    out = bytearray(frame)
    _native.x86_filter(out, True)
    return bytes(out)


def stored(raw: bytes, packed: bytes) -> int:
    """What the pack writer keeps: the compressed frame unless it saves < 3%."""
    return len(packed) if len(packed) < len(raw) * 0.97 else len(raw)


def trial_ratio(fast: zstandard.ZstdCompressor, frame: bytes, n: int = 16,
                size: int = 4096) -> float:
    """The smallest compression ratio of `n` samples of `size` bytes spread over the
    frame, at level 1: above 0.97 means no part of the frame compresses."""
    if len(frame) < n * size * 4:
        return 0.0
    step = len(frame) // n
    return min(len(fast.compress(frame[i * step:i * step + size])) / size for i in range(n))


class Variant:
    def __init__(self, name: str, level: int, target: int, ldm: bool = False,
                 trial: bool = False, threads: int = 1, high: int = 0, hash_log: int = 0,
                 x86: str = "") -> None:
        self.name, self.level, self.target, self.ldm = name, level, target, ldm
        self.trial, self.threads, self.high = trial, threads, high
        self.hash_log, self.x86 = hash_log, x86  # x86: "" (off), "auto" or "every"

    def compress_one(self, frame: bytes) -> int:
        """Stored size of one frame (per-thread contexts: a context is not thread-safe)."""
        import threading
        local = _LOCAL.setdefault(threading.get_ident(), {})
        key = (self.level, self.ldm, self.hash_log)
        cctx = local.get(key) or local.setdefault(
            key, make_cctx(self.level, self.ldm, self.hash_log))
        if self.x86:
            raw = len(frame)
            return min(raw, stored(frame, cctx.compress(
                x86_filtered(frame, self.x86 == "every"))))
        if self.trial:
            # a fast trial on 16 samples spread over the frame: a frame stored raw only
            # when every sample is incompressible; very compressible ones get `high`
            fast = local.get(("fast",)) or local.setdefault(("fast",), make_cctx(1))
            ratio = trial_ratio(fast, frame)
            if ratio > 0.97:
                return len(frame)
            if self.high and ratio < 0.35:
                hk = (self.high, False)
                cctx = local.get(hk) or local.setdefault(hk, make_cctx(self.high))
        return stored(frame, cctx.compress(frame))

    def run(self, frames: list[bytes]) -> tuple[int, float, float]:
        """(stored bytes, wall seconds, CPU seconds of this process)."""
        c0 = time.process_time()
        t0 = time.perf_counter()
        if self.threads == 1:
            size = sum(self.compress_one(f) for f in frames)
        else:
            with ThreadPoolExecutor(self.threads) as pool:
                size = sum(pool.map(self.compress_one, frames))
        return size, time.perf_counter() - t0, time.process_time() - c0


_LOCAL: dict[int, dict] = {}


VARIANTS = [
    Variant("level 1, 1 MiB", 1, MiB),
    Variant("level 2, 1 MiB (before)", 2, MiB),
    Variant("level 3, 1 MiB", 3, MiB),
    Variant("level 2, 4 MiB", 2, 4 * MiB),
    Variant("level 3, 4 MiB", 3, 4 * MiB),
    Variant("level 4, 4 MiB", 4, 4 * MiB),
    Variant("level 5, 4 MiB", 5, 4 * MiB),
    Variant("level 3, 4 MiB, ldm", 3, 4 * MiB, ldm=True),
    Variant("level 3, 16 MiB, ldm", 3, 16 * MiB, ldm=True),
    Variant("level 3, 4 MiB, trial", 3, 4 * MiB, trial=True),
    Variant("level 3/6, 4 MiB, trial", 3, 4 * MiB, trial=True, high=6),
    Variant("level 3, 4 MiB, trial, 2 threads", 3, 4 * MiB, trial=True, threads=2),
    Variant("level 3, 4 MiB, hash 2^18", 3, 4 * MiB, hash_log=18),
    Variant("level 3, 4 MiB, x86 filter", 3, 4 * MiB, x86="auto"),
    Variant("level 3, 4 MiB, x86 filter on every frame", 3, 4 * MiB, x86="every"),
    Variant("level 3, 4 MiB, x86 filter, hash 2^18 (format 8's writer)", 3, 4 * MiB,
            hash_log=18, x86="auto"),
    Variant("level 9, 4 MiB (gc repack)", 9, 4 * MiB),
    Variant("level 6, 4 MiB (gc repack)", 6, 4 * MiB),
]


def zstd_cli(tarfile: Path, level: int) -> tuple[int, float, float]:
    """(bytes, wall s, CPU s) of `zstd -LEVEL -T1` on the tar."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(["zstd", f"-{level}", "-T1", "-q", "-c", os.fspath(tarfile)],
                       stdout=subprocess.PIPE, check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return len(p.stdout), wall, cpu


def real_store(files: list[Path], root: Path, work: Path) -> dict:
    """Snapshot a copy of the files with the installed pylayers; the store's bytes."""
    tree = work / "tree"
    for p in files:
        dest = tree / p.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dest)
    store = work / "store"
    env = {**os.environ, "PYLAYERS_STORE": os.fspath(store)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pylayers", "snapshot", "-q", os.fspath(tree)],
                   env=env, cwd="/", check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()
               and f.name != "lock.mdb")
    shutil.rmtree(tree)
    shutil.rmtree(store)
    return {"store_bytes": size, "snapshot_s": wall}


def measure(name: str, root: Path, limit: int, repeat: int, with_store: bool) -> dict:
    only = (lambda n: n.endswith((".whl", ".gz", ".zip", ".xz"))) \
        if name == "compressed" else None
    files = walk_files(root, limit, only)
    by_target = {t: frames_of(files, t) for t in {v.target for v in VARIANTS}}
    raw = next(iter(by_target.values()))[1]
    res: dict = {"data": name, "root": os.fspath(root), "files": len(files), "raw": raw,
                 "variants": {}}
    sizes: dict[str, int] = {}
    walls: dict[str, list[float]] = {v.name: [] for v in VARIANTS}
    cpus: dict[str, list[float]] = {v.name: [] for v in VARIANTS}
    for _ in range(repeat):
        for v in VARIANTS:
            size, wall, cpu = v.run(by_target[v.target][0])
            sizes[v.name] = size
            walls[v.name].append(wall)
            cpus[v.name].append(cpu)
    for v in VARIANTS:
        res["variants"][v.name] = {"bytes": sizes[v.name],
                                   "wall_s": statistics.median(walls[v.name]),
                                   "cpu_s": statistics.median(cpus[v.name])}
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        tar = Path(tmp, "all.tar")
        listing = Path(tmp, "list")
        listing.write_bytes(b"\0".join(os.fsencode(p.relative_to(root)) for p in files))
        subprocess.run(["tar", "-cf", os.fspath(tar), "-C", os.fspath(root), "--null",
                        "-T", os.fspath(listing)], check=True)
        for level in (1, 3):
            runs = [zstd_cli(tar, level) for _ in range(repeat)]
            res[f"zstd-{level}"] = {"bytes": runs[0][0],
                                    "wall_s": statistics.median(r[1] for r in runs),
                                    "cpu_s": statistics.median(r[2] for r in runs)}
        res["tar_bytes"] = tar.stat().st_size
        if with_store:
            res["store"] = real_store(files, root, Path(tmp))
    return res


def table(results: list[dict]) -> str:
    lines = []
    for r in results:
        z3 = r["zstd-3"]["bytes"]
        lines.append(f"\n### {r['data']}: {r['files']} files, {r['raw'] / MiB:.1f} MiB unique "
                     f"({r['root']})\n")
        lines.append("| variant | stored MiB | vs tar\\|zstd -3 | MiB/s per CPU s | "
                     "vs zstd -1 per core | wall MiB/s |")
        lines.append("|---|---|---|---|---|---|")
        z1cpu = r["tar_bytes"] / r["zstd-1"]["cpu_s"] / MiB
        for ref in ("zstd-1", "zstd-3"):
            x = r[ref]
            cpu = r["tar_bytes"] / x["cpu_s"] / MiB
            lines.append(f"| `tar \\| {ref.replace('-', ' -')} -T1` | {x['bytes'] / MiB:.2f} | "
                         f"{x['bytes'] / z3:.3f} | {cpu:.0f} | {cpu / z1cpu:.2f} | "
                         f"{r['tar_bytes'] / x['wall_s'] / MiB:.0f} |")
        for name, x in r["variants"].items():
            per_cpu = r["raw"] / x["cpu_s"] / MiB
            lines.append(f"| {name} | {x['bytes'] / MiB:.2f} | {x['bytes'] / z3:.3f} | "
                         f"{per_cpu:.0f} | {per_cpu / z1cpu:.2f} | "
                         f"{r['raw'] / x['wall_s'] / MiB:.0f} |")
        if "store" in r:
            s = r["store"]
            lines.append(f"\nreal store (installed pylayers, index included): "
                         f"{s['store_bytes'] / MiB:.2f} MiB = {s['store_bytes'] / z3:.3f}x "
                         f"tar|zstd -3; snapshot {s['snapshot_s']:.2f} s "
                         f"({r['raw'] / s['snapshot_s'] / MiB:.0f} MiB/s wall; zstd -1 -T1: "
                         f"{r['tar_bytes'] / r['zstd-1']['wall_s'] / MiB:.0f} MiB/s wall)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", action="append", default=[],
                    help="NAME=DIR (repeatable; default: the four sets named above)")
    ap.add_argument("--mib", type=float, default=150, help="bytes per data set, at most")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", help="variant names to run, separated by ;")
    ap.add_argument("--store", action="store_true", help="also snapshot into a real store")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sets = dict(d.split("=", 1) for d in args.data) if args.data else default_sets()
    if args.only:
        keep = set(args.only.split(";"))
        VARIANTS[:] = [v for v in VARIANTS if v.name in keep]
    results = []
    for name, root in sets.items():
        results.append(measure(name, Path(root), int(args.mib * MiB), args.repeat, args.store))
        print(table(results[-1:]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
