"""Copy-on-write mounts against tar layers, side by side (needs root and overlayfs).

- commit of a large file copied up in an overlay snapshot and changed in one byte:
  time and bytes newly stored, against building the Docker-style diff layer of the
  same change (the whole file, tar | zstd -3);
- prepare + mount of a 20-layer image of 50,000 files with a warm file cache, against
  `tar -x` of the same image's full tarball.

Run: python -m bench.bench_mounts [--big-mib 1024] [--files 50000] [--layers 20]
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

from pylayers import Layers, Store
from pylayers.mounts import Snapshotter

from .bench_snapshot import machine, make_big_file


def sh(cmd: str) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, shell=True, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def mount_all(mounts, target: Path) -> None:
    for m in mounts:
        subprocess.run(m.command(str(target)), check=True)


def bench_copy_up(work: Path, big_mib: int, repeat: int) -> dict:
    src = work / "big"
    src.mkdir()
    make_big_file(src / "disk.img", big_mib)
    store_path = work / "store-big"
    mnt = work / "mnt"
    mnt.mkdir()
    times, new_bytes, tar_times, tar_sizes = [], [], [], []
    with Store.open(store_path) as store:
        layers = Layers(store)
        base = layers.snapshot(src).layer_id
        snaps = Snapshotter(layers, "overlay")
        for i in range(repeat):
            key = f"edit-{i}"
            mount_all(snaps.prepare(key, base.hex()), mnt)
            with open(mnt / "disk.img", "r+b") as f:  # copy-up of the whole file
                f.seek((big_mib << 20) // 2 + i)
                f.write(b"\xff")
            subprocess.run(["umount", str(mnt)], check=True)
            t = time.perf_counter()
            layer = snaps.commit(f"edited-{i}", key)
            times.append(time.perf_counter() - t)
            new_bytes.append(layers.record(layer).new_bytes)
            # Docker: the diff layer holds the changed file whole
            upper = work / f"upper-{i}"
            upper.mkdir()
            shutil.copy2(src / "disk.img", upper / "disk.img")
            out = work / f"layer-{i}.tar.zst"
            tar_times.append(sh(f"tar -C '{upper}' -cf - . | zstd -3 -T1 -q -o '{out}'"))
            tar_sizes.append(out.stat().st_size)
            out.unlink()
            shutil.rmtree(upper)
    return {
        "file_bytes": big_mib << 20,
        "pylayers_commit_s": statistics.median(times),
        "pylayers_new_bytes": statistics.median(new_bytes),
        "tar_zstd3_layer_s": statistics.median(tar_times),
        "tar_zstd3_layer_bytes": statistics.median(tar_sizes),
        "bytes_ratio_tar_over_pylayers": statistics.median(tar_sizes)
        / max(1, statistics.median(new_bytes)),
        "time_ratio_tar_over_pylayers": statistics.median(tar_times) / statistics.median(times),
    }


def bench_mount_image(work: Path, files: int, nlayers: int, repeat: int) -> dict:
    rnd = random.Random(5)
    src = work / "image"
    store_path = work / "store-img"
    mnt = work / "mnt2"
    mnt.mkdir()
    per_layer = files // nlayers
    with Store.open(store_path) as store:
        layers = Layers(store)
        parent = None
        for n in range(nlayers):
            d = src / f"layer{n:02}"
            for i in range(per_layer):
                sub = d / f"d{i // 500:03}"
                if i % 500 == 0:
                    sub.mkdir(parents=True, exist_ok=True)
                (sub / f"f{i:05}").write_bytes(rnd.randbytes(rnd.randint(256, 4096)))
            parent = layers.snapshot(src, parent).layer_id
        tarball = work / "image.tar"
        sh(f"tar -C '{src}' -cf '{tarball}' .")
        snaps = Snapshotter(layers, "overlay")
        mount_all(snaps.view("warmup", parent.hex()), mnt)  # materialise the lowers once
        subprocess.run(["umount", str(mnt)], check=True)
        snaps.remove("warmup")
        t_mount, t_tar = [], []
        for i in range(repeat):
            t = time.perf_counter()
            mount_all(snaps.prepare(f"run-{i}", parent.hex()), mnt)
            t_mount.append(time.perf_counter() - t)
            subprocess.run(["umount", str(mnt)], check=True)
            snaps.remove(f"run-{i}")
            dest = work / f"untar-{i}"
            dest.mkdir()
            t_tar.append(sh(f"tar -C '{dest}' -xf '{tarball}'"))
            shutil.rmtree(dest)
    return {
        "files": per_layer * nlayers, "layers": nlayers,
        "pylayers_prepare_mount_s": statistics.median(t_mount),
        "tar_x_s": statistics.median(t_tar),
        "speedup": statistics.median(t_tar) / statistics.median(t_mount),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=50_000)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="bench/out/mounts.json")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_mounts needs root (overlayfs mounts)")
    work = Path(tempfile.mkdtemp(prefix="pylayers-bench-mounts-"))
    try:
        results = {"machine": machine(),
                   "copy_up_one_byte": bench_copy_up(work, args.big_mib, args.repeat),
                   "mount_image": bench_mount_image(work, args.files, args.layers, args.repeat)}
    finally:
        for m in ("mnt", "mnt2"):
            subprocess.run(["umount", "-l", str(work / m)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
