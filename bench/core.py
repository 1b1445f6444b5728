"""The core's primitives against the libraries and tools that do the same job, on one
buffer, each as a separate process, alternated and repeated:

- chunking (16/64/256 KiB): pylayers.cut_points, pyfastcdc (Cython), fastcdc (Cython
  build of the pure-Python package): in-process time of chunking a buffer in memory;
- hashing: the blake3 module (what the store uses) in process, and `b3sum
  --num-threads 1` as a whole process reading the (cached) file;
- compression: zstandard level 2 in 1 MiB frames (the store's setting) in process, and
  the zstd CLI at -2 and -3, one thread, as whole processes.
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

from .proc import PY, Cmd, CommandFailed, run

LOAD = "import sys, time\ndata = open(sys.argv[1], 'rb').read()\n"
CHUNKERS = {
    "pylayers.cut_points": (
        "from pylayers import cut_points\nt = time.perf_counter()\n"
        "n = len(cut_points(data, min_size=16384, avg_size=65536, max_size=262144))\n"),
    "pyfastcdc": (
        "from pyfastcdc import FastCDC\nt = time.perf_counter()\n"
        "n = sum(1 for _ in FastCDC(65536, min_size=16384, max_size=262144).cut_buf(data))\n"),
    "fastcdc": (
        "from fastcdc import fastcdc\nt = time.perf_counter()\n"
        "n = sum(1 for _ in fastcdc(data, 16384, 65536, 262144))\n"),
}
HASH_PY = ("import blake3\nt = time.perf_counter()\nblake3.blake3(data).digest()\nn = 1\n")
ZSTD_PY = ("import zstandard\nt = time.perf_counter()\n"
           "c = zstandard.ZstdCompressor(level=2)\n"
           "n = sum(len(c.compress(data[i:i + (1 << 20)]))\n"
           "        for i in range(0, len(data), 1 << 20))\n")
REPORT = "print(time.perf_counter() - t, n)\n"


def _py(body: str, path: Path) -> Cmd:
    return Cmd([PY, "-c", LOAD + body + REPORT, str(path)])


def _in_process(cmd: Cmd) -> tuple[float, int]:
    secs, n = run(cmd).stdout.split()
    return float(secs), int(n)


def bench_core(path: Path, repeat: int) -> dict:
    size = path.stat().st_size
    cases: dict[str, tuple[str, Cmd]] = {}
    for name, body in CHUNKERS.items():
        cases[f"chunk:{name}"] = ("in-process", _py(body, path))
    cases["hash:blake3 module"] = ("in-process", _py(HASH_PY, path))
    if shutil.which("b3sum"):
        cases["hash:b3sum --num-threads 1"] = (
            "process", Cmd(["b3sum", "--num-threads", "1", str(path)]))
    cases["compress:zstandard level 2, 1 MiB frames"] = ("in-process", _py(ZSTD_PY, path))
    if shutil.which("zstd"):
        for lvl in (2, 3):
            cases[f"compress:zstd -{lvl} -T1"] = (
                "process", Cmd(f"zstd -{lvl} -T1 -q -c '{path}' | wc -c"))
    samples: dict[str, list[float]] = {k: [] for k in cases}
    counts: dict[str, int] = {}
    errors: dict[str, str] = {}
    keys = list(cases)
    for r in range(repeat):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            if k in errors:
                continue
            how, cmd = cases[k]
            try:
                if how == "in-process":
                    secs, n = _in_process(cmd)
                else:
                    res = run(cmd)
                    # `wc -c` prints the compressed size; b3sum a digest (no count).
                    first = res.stdout.split()[0] if res.stdout.strip() else ""
                    secs, n = res.seconds, int(first) if first.isdigit() else 1
            except (CommandFailed, ValueError) as e:
                errors[k] = str(e).splitlines()[-1][:200] if str(e) else "failed"
                continue
            samples[k].append(secs)
            counts[k] = n
    out = {"bytes": size, "cases": {}}
    for k, (how, _cmd) in cases.items():
        kind, name = k.split(":", 1)
        rec: dict = {"kind": kind, "timing": how}
        if k in errors:
            rec["error"] = errors[k]
        if samples[k]:
            med = statistics.median(samples[k])
            rec.update(seconds=med, samples=samples[k], mb_per_s=size / med / 1e6)
            if kind == "chunk":
                rec["chunks"] = counts[k]
                rec["mean_chunk"] = size / counts[k] if counts[k] else None
            if kind == "compress":
                rec["ratio"] = size / counts[k] if counts[k] else None
        out["cases"][name] = rec
    return out


if __name__ == "__main__":
    import sys
    print(json.dumps(bench_core(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 3),
                     indent=2))
