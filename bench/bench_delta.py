"""Store growth on rebuilds and upgrades of a real pip-built environment, against tar
diff layers, side by side in one run (issue 10: deltas, first version, 6-version chain).

    python -m bench.pyenv_wheels fetch                     # once
    python -m bench.bench_delta --envs DIR [--python NAME=PYTHON ...]

`--envs DIR` holds the environment's versions as directories `v0` .. `v5` (each a whole
tree: `lib/python3.11/site-packages/...`) and `v0-rebuild` (version 0 installed again
by pip, so every .pyc has a new header); `--build` makes them from the wheel cache.
Each `--python` is an interpreter with a pylayers installed (default: this one), run
from `/` so the installed package is used; each gets its own stores. Figures:

- first version alone: the whole store (index included) against `tar | zstd -3` and
  `tar | gzip` of the same tree;
- cache-bust rebuild: `v0-rebuild` snapshotted on a new base layer (its parent lacks
  these files): the store's growth against the rebuilt layer as a tar.gz / tar.zst
  (a tar layer store keeps the whole re-created layer);
- chain: v0 .. v5 each on the previous one: the store against tar diff layers (each
  version's changed and added files, as an overlay upper directory holds them);
- imported chain: the same diff layers (with whiteouts for removed files) imported as
  layer tarballs, each onto the previous (`pylayers import --parent`), as a registry
  pull stores an image's layers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1e6


def build(envs: Path) -> None:
    from .pyenv_wheels import DEFAULT_CACHE, VERSIONS, install_version
    work = envs / "work"
    site = work / "lib/python3.11/site-packages"
    site.mkdir(parents=True, exist_ok=True)
    for v in range(len(VERSIONS)):
        install_version(DEFAULT_CACHE, site, v)
        shutil.copytree(work, envs / f"v{v}", symlinks=True)
    install_version(DEFAULT_CACHE, envs / "v0-rebuild/lib/python3.11/site-packages", 0)
    shutil.rmtree(work)


def store_bytes(store: Path) -> int:
    return sum(f.stat().st_size for f in store.rglob("*")
               if f.is_file() and f.name not in ("lock.mdb", "lock"))


def snapshot(python: str, store: Path, src: Path, parent: str | None) -> tuple[str, float]:
    cmd = [python, "-m", "pylayers", "--store", os.fspath(store), "snapshot", "-q",
           os.fspath(src)]
    if parent:
        cmd += ["--parent", parent]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd="/", check=True, capture_output=True, text=True)
    return p.stdout.strip().splitlines()[-1], time.perf_counter() - t0


def compressed_tar(root: Path, files: list[str] | None, comp: list[str]) -> int:
    """Bytes of a tar of `files` under `root` (all when None), through `comp`."""
    with tempfile.NamedTemporaryFile() as listing:
        if files is None:
            args = ["-C", os.fspath(root), "."]
        else:
            listing.write(b"\0".join(os.fsencode(f) for f in files))
            listing.flush()
            args = ["-C", os.fspath(root), "--null", "--no-recursion", "-T", listing.name]
        tar = subprocess.Popen(["tar", "-cf", "-", *args], stdout=subprocess.PIPE)
        out = subprocess.run(comp, stdin=tar.stdout, stdout=subprocess.PIPE, check=True)
        tar.wait()
    return len(out.stdout)


def diff_layer(old: Path, new: Path) -> tuple[list[str], int]:
    """Paths an overlay upper directory would hold for `new` over `old` (changed or
    added entries, with their directories), and the count of whiteouts."""
    out: list[str] = []
    for dirpath, _dirs, files in os.walk(new):
        rel_dir = os.path.relpath(dirpath, new)
        if not (old / rel_dir).is_dir():
            out.append(rel_dir)
        for n in files:
            rel = os.path.normpath(os.path.join(rel_dir, n))
            a, b = old / rel, new / rel
            if not a.is_file() or a.is_symlink() != b.is_symlink() or \
                    a.read_bytes() != b.read_bytes():
                out.append(rel)
    gone = 0
    for dirpath, _dirs, files in os.walk(old):
        rel_dir = os.path.relpath(dirpath, old)
        for n in files:
            if not (new / rel_dir / n).exists():
                gone += 1
    return out, gone


def write_diff_tar(old: Path | None, new: Path, out: Path) -> None:
    """The diff layer of `new` over `old` (the whole tree when None) as a layer tarball:
    changed and added entries, and a whiteout per removed file or directory."""
    import tarfile

    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        if old is None:
            for rel in sorted(os.listdir(new)):
                tf.add(new / rel, arcname=rel)
            return
        files, _gone = diff_layer(old, new)
        for rel in sorted(files):
            tf.add(new / rel, arcname=rel, recursive=False)
        for dirpath, dirs, names in os.walk(old):
            rel_dir = os.path.relpath(dirpath, old)
            for n in [*names, *dirs]:
                if not os.path.lexists(new / rel_dir / n):
                    info = tarfile.TarInfo(os.path.normpath(os.path.join(rel_dir, ".wh." + n)))
                    tf.addfile(info)
            dirs[:] = [d for d in dirs if (new / rel_dir / d).is_dir()]


def import_layer(python: str, store: Path, tar: Path, parent: str | None) -> tuple[str, float]:
    cmd = [python, "-m", "pylayers", "--store", os.fspath(store), "import", os.fspath(tar)]
    if parent:
        cmd += ["--parent", parent]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd="/", check=True, capture_output=True, text=True)
    return p.stdout.strip().splitlines()[-1], time.perf_counter() - t0


def measure(name: str, python: str, envs: Path, work: Path, tars: list[Path]) -> dict:
    res: dict = {"pylayers": name, "python": python}
    # first version, alone
    s1 = work / f"{name}-first"
    _, t = snapshot(python, s1, envs / "v0", None)
    res["first"] = {"store": store_bytes(s1), "seconds": t}
    # cache-bust rebuild on a new base layer
    s2 = work / f"{name}-rebuild"
    base1, base2 = work / "base1", work / "base2"
    for b, text in ((base1, "1"), (base2, "2")):
        (b / "etc").mkdir(parents=True, exist_ok=True)
        (b / "etc/os-release").write_text(f"VERSION={text}\n")
    l1, _ = snapshot(python, s2, base1, None)
    l2, _ = snapshot(python, s2, base2, None)
    snapshot(python, s2, envs / "v0", l1)
    before = store_bytes(s2)
    _, t = snapshot(python, s2, envs / "v0-rebuild", l2)
    res["rebuild"] = {"growth": store_bytes(s2) - before, "seconds": t}
    # the chain
    s3 = work / f"{name}-chain"
    parent = None
    sizes, times = [], []
    v = 0
    while (envs / f"v{v}").is_dir():
        parent, t = snapshot(python, s3, envs / f"v{v}", parent)
        sizes.append(store_bytes(s3))
        times.append(t)
        v += 1
    res["chain"] = {"store": sizes, "seconds": times}
    # the chain imported as layer tarballs
    s4 = work / f"{name}-imports"
    parent = None
    sizes, times = [], []
    for tar in tars:
        parent, t = import_layer(python, s4, tar, parent)
        sizes.append(store_bytes(s4))
        times.append(t)
    res["imports"] = {"store": sizes, "seconds": times}
    for s in (s1, s2, s3, s4):
        shutil.rmtree(s)
    return res


def peers(envs: Path) -> dict:
    gz, zst = ["gzip", "-c"], ["zstd", "-3", "-T1", "-q", "-c"]
    out: dict = {"first": {"tar.zst": compressed_tar(envs / "v0", None, zst),
                           "tar.gz": compressed_tar(envs / "v0", None, gz)},
                 "rebuild": {"tar.zst": compressed_tar(envs / "v0-rebuild", None, zst),
                             "tar.gz": compressed_tar(envs / "v0-rebuild", None, gz)}}
    chain_zst, chain_gz = [out["first"]["tar.zst"]], [out["first"]["tar.gz"]]
    v = 1
    while (envs / f"v{v}").is_dir():
        files, _gone = diff_layer(envs / f"v{v - 1}", envs / f"v{v}")
        chain_zst.append(chain_zst[-1] + compressed_tar(envs / f"v{v}", files, zst))
        chain_gz.append(chain_gz[-1] + compressed_tar(envs / f"v{v}", files, gz))
        v += 1
    out["chain"] = {"tar.zst": chain_zst, "tar.gz": chain_gz}
    return out


def table(runs: list[dict], peer: dict) -> str:
    lines = ["| figure | " + " | ".join(r["pylayers"] for r in runs)
             + " | tar + zstd -3 | tar + gzip |", "|---" * (len(runs) + 3) + "|"]
    first = peer["first"]["tar.zst"]
    row = [f"{r['first']['store'] / MB:.1f} MB ({r['first']['store'] / first:.3f}x"
           f" zstd, {r['first']['seconds']:.1f} s)" for r in runs]
    lines.append("| first version alone (index included) | " + " | ".join(row)
                 + f" | {peer['first']['tar.zst'] / MB:.1f} MB | "
                 f"{peer['first']['tar.gz'] / MB:.1f} MB |")
    row = [f"{r['rebuild']['growth'] / MB:.2f} MB (tar.gz / this: "
           f"{peer['rebuild']['tar.gz'] / max(1, r['rebuild']['growth']):.1f}x)" for r in runs]
    lines.append("| cache-bust rebuild: growth | " + " | ".join(row)
                 + f" | {peer['rebuild']['tar.zst'] / MB:.1f} MB | "
                 f"{peer['rebuild']['tar.gz'] / MB:.1f} MB |")
    n = len(peer["chain"]["tar.zst"])
    row = [f"{r['chain']['store'][-1] / MB:.1f} MB "
           f"({r['chain']['store'][-1] / peer['chain']['tar.zst'][-1]:.3f}x zstd layers)"
           for r in runs]
    lines.append(f"| store after {n} versions | " + " | ".join(row)
                 + f" | {peer['chain']['tar.zst'][-1] / MB:.1f} MB | "
                 f"{peer['chain']['tar.gz'][-1] / MB:.1f} MB |")
    row = [f"{r['imports']['store'][-1] / MB:.1f} MB "
           f"({r['imports']['store'][-1] / peer['chain']['tar.zst'][-1]:.3f}x zstd layers)"
           for r in runs]
    lines.append(f"| store after importing the {n} diff layers | " + " | ".join(row)
                 + f" | {peer['chain']['tar.zst'][-1] / MB:.1f} MB | "
                 f"{peer['chain']['tar.gz'][-1] / MB:.1f} MB |")
    for v in range(1, n):
        row = [f"{(r['chain']['store'][v] - r['chain']['store'][v - 1]) / MB:.2f} MB"
               f" / {(r['imports']['store'][v] - r['imports']['store'][v - 1]) / MB:.2f} MB"
               for r in runs]
        z = peer["chain"]["tar.zst"]
        g = peer["chain"]["tar.gz"]
        lines.append(f"| v{v}: growth (snapshot / import) | " + " | ".join(row)
                     + f" | {(z[v] - z[v - 1]) / MB:.2f} MB | {(g[v] - g[v - 1]) / MB:.2f} MB |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--envs", type=Path, required=True)
    ap.add_argument("--build", action="store_true", help="make the versions first")
    ap.add_argument("--python", action="append", default=[],
                    help="NAME=PYTHON with pylayers installed (repeatable)")
    ap.add_argument("--work", type=Path, help="where the stores go (default: a temp dir)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.build:
        build(args.envs)
    pythons = dict(p.split("=", 1) for p in args.python) or {"pylayers": sys.executable}
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-delta-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        tars = []
        v = 0
        while (args.envs / f"v{v}").is_dir():
            tars.append(work / f"layer{v}.tar")
            write_diff_tar(args.envs / f"v{v - 1}" if v else None, args.envs / f"v{v}",
                           tars[-1])
            v += 1
        runs = [measure(name, py, args.envs, work, tars) for name, py in pythons.items()]
        peer = peers(args.envs)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(table(runs, peer))
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "peers": peer}, indent=1))


if __name__ == "__main__":
    main()
