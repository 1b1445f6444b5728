"""Chunking throughput: pylayers.cut_points against pyfastcdc and single-thread BLAKE3.

One in-memory buffer of random bytes (512 MiB by default), in one process:

- pylayers: `cut_points(buf)` with the store defaults, min 16 KiB / avg 64 KiB /
  max 256 KiB (normalized chunking level 2, cut-point skipping; C core, GIL released);
- pyfastcdc: its Cython `FastCDC` with the same sizes and normalized chunking 2,
  iterating `cut_buf(buf)` to the end (it yields one Chunk object per chunk);
- blake3: `blake3(buf, max_threads=1).digest()`, the hash a store computes over the
  same bytes, as the yardstick a chunker should not fall far behind.

The three run interleaved, `--repeat` times, in a rotating order; the report gives
each one's median throughput in GB/s (10^9 bytes/s) and the ratios of pylayers' to the
others' (above 1: pylayers is faster). JSON goes to `--out`.

Run from the repository root: python -m bench.bench_chunker [--size-mib 512]
    [--repeat 5] [--out bench/out/chunker.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import blake3
from pyfastcdc import FastCDC

from pylayers import cut_points

from .bench_snapshot import machine

MIN, AVG, MAX = 16 * 1024, 64 * 1024, 256 * 1024


def runners(buf: bytes) -> dict[str, Callable[[], int]]:
    """Each returns a count (chunks, or digest bytes) so that nothing is optimized away
    and the chunk counts can be compared."""
    cdc = FastCDC(AVG, min_size=MIN, max_size=MAX, normalized_chunking=2)

    def pylayers() -> int:
        return len(cut_points(buf, min_size=MIN, avg_size=AVG, max_size=MAX))

    def pyfastcdc() -> int:
        n = 0
        for _ in cdc.cut_buf(buf):
            n += 1
        return n

    def blake3_1t() -> int:
        return len(blake3.blake3(buf, max_threads=1).digest())

    return {"pylayers": pylayers, "pyfastcdc": pyfastcdc, "blake3_1thread": blake3_1t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=512, help="buffer size (MiB)")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved repetitions")
    ap.add_argument("--out", default="bench/out/chunker.json", help="JSON output")
    ap.add_argument("--seed", type=int, default=1, help="seed of the random buffer")
    args = ap.parse_args()

    rng = random.Random(args.seed)  # randbytes takes at most 256 MiB a call
    buf = b"".join(rng.randbytes(1 << 20) for _ in range(args.size_mib))
    fns = runners(buf)
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    counts: dict[str, int] = {}
    for rep in range(args.repeat):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            t = time.perf_counter()
            counts[name] = fns[name]()
            times[name].append(time.perf_counter() - t)

    gbps = {k: len(buf) / statistics.median(v) / 1e9 for k, v in times.items()}
    result = {
        "machine": machine(),
        "bytes": len(buf),
        "repeat": args.repeat,
        "sizes": {"min": MIN, "avg": AVG, "max": MAX, "pyfastcdc_normalized_chunking": 2},
        "chunks": {"pylayers": counts["pylayers"], "pyfastcdc": counts["pyfastcdc"]},
        "median_gb_per_s": gbps,
        "seconds": times,
        "ratio_pylayers_vs_pyfastcdc": gbps["pylayers"] / gbps["pyfastcdc"],
        "ratio_pylayers_vs_blake3": gbps["pylayers"] / gbps["blake3_1thread"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{len(buf) >> 20} MiB of random bytes, median of {args.repeat} interleaved runs")
    print(f"{'':<16} {'GB/s':>7} {'min s':>8} {'max s':>8} {'chunks':>8}")
    for k in names:
        print(f"{k:<16} {gbps[k]:7.2f} {min(times[k]):8.3f} {max(times[k]):8.3f} "
              f"{counts[k] if k in result['chunks'] else '':>8}")
    print(f"pylayers / pyfastcdc: {result['ratio_pylayers_vs_pyfastcdc']:.2f}x")
    print(f"pylayers / blake3 (1 thread): {result['ratio_pylayers_vs_blake3']:.2f}x")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
