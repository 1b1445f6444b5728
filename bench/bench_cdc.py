"""The chunker's speed against pyfastcdc and single-thread BLAKE3, side by side.

On one in-memory buffer of random bytes: pylayers.cut_points (min 16 KiB / avg 64 KiB /
max 256 KiB), pyfastcdc's FastCDC (Cython; the same sizes, normalized chunking 2 as
ours) consuming its iterator, and blake3 hashing the buffer on one thread. Runs are
interleaved, `--repeat` times; reports medians in GB/s and ratios.

Run: python -m bench.bench_cdc [--size-mib 512] [--repeat 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import blake3

from pylayers import cut_points

from .bench_snapshot import machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="bench/results/chunker.json")
    args = ap.parse_args()
    buf = os.urandom(args.size_mib << 20)
    runners = {
        "pylayers": lambda: cut_points(buf),
        "blake3_1thread": lambda: blake3.blake3(buf).digest(),
    }
    try:
        from pyfastcdc import FastCDC
        cdc = FastCDC(65536, min_size=16384, max_size=262144, normalized_chunking=2)
        runners["pyfastcdc"] = lambda: sum(1 for _ in cdc.cut_buf(buf))
    except ImportError:
        print("pyfastcdc is not installed (pip install pyfastcdc); skipping it")
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.repeat):
        for name, fn in runners.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    gbps = {k: len(buf) / statistics.median(v) / 1e9 for k, v in times.items()}
    result = {"machine": machine(), "bytes": len(buf), "repeat": args.repeat,
              "median_gb_per_s": gbps,
              "ratio_vs_blake3": gbps["pylayers"] / gbps["blake3_1thread"]}
    if "pyfastcdc" in gbps:
        result["ratio_vs_pyfastcdc"] = gbps["pylayers"] / gbps["pyfastcdc"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for k, v in gbps.items():
        print(f"{k:<16} {v:6.2f} GB/s")
    print(json.dumps({k: v for k, v in result.items() if k.startswith("ratio")}, indent=2))


if __name__ == "__main__":
    main()
