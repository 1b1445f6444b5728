"""The everyday paths against a baseline run side by side in the same script:

- unchanged: re-snapshot of a tree nothing touched (the bench's own way: `--parent`
  the last layer, a new tag), against `git status --porcelain --untracked-files=all`
  with a fresh index; and `pylayers --version`, the start-up floor;
- smallfiles: a tree of many small files (32 B - 4 KiB), 1% of them appended to
  before each run, re-snapshotted onto the previous layer, against `git add -A` of
  the same change (each tool sees its own fresh 1%: the same count, other files);
  with the peak RSS of each;
- links (not by default): `smallfiles` in a tree whose every file is a hardlink to a
  file of a content store outside it (a pnpm node_modules), edited through the store;
- checkout: a tree restored onto tmpfs, against `zstd -dc image.tar.zst | tar -x`
  of a full image of the same tree (zstd -3), and `pylayers checkout --link`;
- chain (not by default): the same for the last of the six versions of the wheels
  chain (bench/pyenv_wheels.py), from a store holding all six (deltas included); or,
  with --chain-trees, of the last of the given version trees, each snapshotted with
  the one before as its parent.

Each measured command is its own process, the tools alternate, medians are reported
with their ratio to the baseline (peak RSS by GNU time when installed).

    python -m bench.bench_paths [--files 100000] [--tree DIR] [--repeat 5] [--out FILE]
        [--only unchanged,smallfiles,links,checkout,chain] [--work DIR] [--wheel-cache DIR]
        [--chain-trees DIR,DIR,...]

--tree: a real directory to use for `unchanged` and `checkout` (default: a generated
tree of --files files of 1-8 KiB). The work directory defaults to /dev/shm.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .proc import PY, Cmd, Run, run

RACY_S = 1.1  # the stat cache and the tree fingerprint trust ctimes older than 1 s


def pylayers(store: Path, *args: str) -> Cmd:
    return Cmd([PY, "-m", "pylayers", "--store", os.fspath(store), *args])


def make_tree(root: Path, files: int, lo: int, hi: int, seed: int = 3,
              per_dir: int = 100) -> None:
    """`files` files of lo..hi random-ish bytes, `per_dir` a directory, 10 directories
    a parent: a node_modules-like shape."""
    rnd = random.Random(seed)
    words = [bytes(rnd.choices(b"abcdefghijklmnopqrstuvwxyz_./(){};=", k=rnd.randint(2, 10)))
             for _ in range(2000)]
    for i in range(files):
        d = root / f"d{i // (per_dir * 10):04}" / f"s{(i // per_dir) % 10}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        n = rnd.randint(lo, hi)
        data = b" ".join(rnd.choices(words, k=n // 5 + 1))[:n]
        (d / f"f{i % per_dir:03}.js").write_bytes(data)


def list_files(root: Path) -> list[str]:
    out = []
    for dirpath, _dirs, names in os.walk(root):
        out += [os.path.join(dirpath, n) for n in names]
    out.sort()
    return out


def touch_some(files: list[str], fraction: float, rnd: random.Random) -> None:
    for f in rnd.sample(files, max(1, int(len(files) * fraction))):
        with open(f, "ab") as fh:
            fh.write(b"// changed\n")


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _git(gitdir: Path, tree: Path, *args: str) -> list[str]:
    return ["git", f"--git-dir={gitdir}", f"--work-tree={tree}",
            "-c", "core.looseCompression=0", *args]


def _checked(cmd: Cmd) -> Run:
    """Run `cmd`; its wall time, peak RSS and (in .cpu) user + system CPU seconds of it
    and its children: on a shared machine the CPU time is the steadier comparison (a
    Python process's threads hand the GIL over through the scheduler, which a loaded
    machine makes slow; a pipeline of two processes does not)."""
    before = os.times()
    r = run(cmd)
    after = os.times()
    r.cpu = (after.children_user - before.children_user  # type: ignore[attr-defined]
             + after.children_system - before.children_system)
    return r


def unchanged(work: Path, tree: Path, repeat: int) -> dict:
    store = work / "store-unchanged"
    _checked(pylayers(store, "snapshot", os.fspath(tree), "--tag", "v1"))
    time.sleep(RACY_S)
    _checked(pylayers(store, "snapshot", os.fspath(tree), "--tag", "v2", "--parent", "v1"))
    gitdir = work / "git-unchanged"
    _checked(Cmd(["git", "init", "-q", "--bare", os.fspath(gitdir)]))
    _checked(Cmd(_git(gitdir, tree, "add", "-A")))
    _checked(Cmd(_git(gitdir, tree, "update-index", "--refresh")))
    pl, git, start = [], [], []
    cpu: dict[str, list[float]] = {"pl": [], "git": [], "start": []}
    for r in range(repeat):
        cmds = [("pl", pylayers(store, "snapshot", os.fspath(tree), "--parent", "v2",
                                "--tag", f"again{r}")),
                ("git", Cmd(_git(gitdir, tree, "status", "--porcelain",
                                 "--untracked-files=all"))),
                ("start", Cmd([PY, "-m", "pylayers", "--version"]))]
        for key, cmd in (cmds if r % 2 == 0 else cmds[::-1]):
            res = _checked(cmd)
            {"pl": pl, "git": git, "start": start}[key].append(res.seconds)
            cpu[key].append(res.cpu)  # type: ignore[attr-defined]
    return {"entries": sum(1 for _ in tree.rglob("*")) + 1,
            "pylayers_s": med(pl), "git_status_s": med(git), "startup_s": med(start),
            "ratio_vs_git_status": med(pl) / med(git),
            "cpu_s": {k: med(v) for k, v in cpu.items()},
            "cpu_ratio_vs_git_status": med(cpu["pl"]) / med(cpu["git"]),
            "runs": {"pylayers": pl, "git": git}}


def smallfiles(work: Path, files: int, repeat: int) -> dict:
    tree = work / "small"
    make_tree(tree, files, 32, 4096)
    names = list_files(tree)
    store = work / "store-small"
    time.sleep(RACY_S)
    first = _checked(pylayers(store, "snapshot", os.fspath(tree), "--tag", "s0"))
    gitdir = work / "git-small"
    _checked(Cmd(["git", "init", "-q", "--bare", os.fspath(gitdir)]))
    _checked(Cmd(_git(gitdir, tree, "add", "-A")))
    rnd = random.Random(7)
    pl, git, rss = [], [], []
    cpu: dict[str, list[float]] = {"pl": [], "git": []}
    parent = "s0"
    for r in range(repeat):
        order = ["pl", "git"] if r % 2 == 0 else ["git", "pl"]
        for key in order:
            touch_some(names, 0.01, rnd)
            time.sleep(RACY_S)
            if key == "pl":
                res = _checked(pylayers(store, "snapshot", os.fspath(tree), "--parent",
                                        parent, "--tag", f"s{r + 1}"))
                parent = f"s{r + 1}"
                pl.append(res.seconds)
                rss.append(res.rss_kib or 0)
            else:
                res = _checked(Cmd(_git(gitdir, tree, "add", "-A")))
                git.append(res.seconds)
            cpu[key].append(res.cpu)  # type: ignore[attr-defined]
    return {"files": files, "first_s": first.seconds, "first_rss_mib": (first.rss_kib or 0) / 1024,
            "pylayers_s": med(pl), "git_add_s": med(git),
            "ratio_vs_git_add": med(pl) / med(git),
            "per_100k_files_s": med(pl) * 100_000 / files,
            "cpu_s": {k: med(v) for k, v in cpu.items()},
            "cpu_ratio_vs_git_add": med(cpu["pl"]) / med(cpu["git"]),
            "peak_rss_mib": max(rss) / 1024, "runs": {"pylayers": pl, "git": git}}


def links(work: Path, files: int, repeat: int) -> dict:
    """A pnpm-like tree: every file a hardlink to a file of a content store outside the
    tree; 1% of the store's files appended to before each run, re-snapshotted onto the
    previous layer, against `git add -A` of the same change (each tool its own fresh
    1%, as in `smallfiles`)."""
    cas, tree = work / "links-cas", work / "links-tree"
    make_tree(cas, files, 32, 4096, seed=5)
    names = list_files(cas)
    for f in names:
        dest = tree / os.path.relpath(f, cas)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.link(f, dest)
    store = work / "store-links"
    time.sleep(RACY_S)
    _checked(pylayers(store, "snapshot", os.fspath(tree), "--tag", "l0"))
    gitdir = work / "git-links"
    _checked(Cmd(["git", "init", "-q", "--bare", os.fspath(gitdir)]))
    _checked(Cmd(_git(gitdir, tree, "add", "-A")))
    rnd = random.Random(9)
    pl, git = [], []
    cpu: dict[str, list[float]] = {"pl": [], "git": []}
    for r in range(repeat):
        for key in (["pl", "git"] if r % 2 == 0 else ["git", "pl"]):
            touch_some(names, 0.01, rnd)
            time.sleep(RACY_S)
            if key == "pl":
                res = _checked(pylayers(store, "snapshot", os.fspath(tree), "--parent",
                                        f"l{r}", "--tag", f"l{r + 1}"))
                pl.append(res.seconds)
            else:
                res = _checked(Cmd(_git(gitdir, tree, "add", "-A")))
                git.append(res.seconds)
            cpu[key].append(res.cpu)  # type: ignore[attr-defined]
    return {"files": files, "pylayers_s": med(pl), "git_add_s": med(git),
            "ratio_vs_git_add": med(pl) / med(git),
            "cpu_s": {k: med(v) for k, v in cpu.items()},
            "cpu_ratio_vs_git_add": med(cpu["pl"]) / med(cpu["git"]),
            "runs": {"pylayers": pl, "git": git}}


def wheels_chain(work: Path, cache: Path) -> tuple[Path, Path, str]:
    """The realistic chain (bench/pyenv_wheels.py: six versions of a pip-built env, each
    upgrading a few packages) snapshotted version after version into one store, as a
    user's store would hold it: (store, the last version's tree, its tag)."""
    from .pyenv_wheels import VERSIONS, have_all, install_version
    if not have_all(cache):
        raise SystemExit(f"--chain: the wheels are not all in {cache}: run "
                         "`python -m bench.pyenv_wheels fetch` first")
    site = work / "chain-site"
    store = work / "store-chain"
    for v in range(len(VERSIONS)):
        install_version(cache, site, v)
        args = ["snapshot", os.fspath(site), "--tag", f"v{v}"]
        _checked(pylayers(store, *(args + (["--parent", f"v{v - 1}"] if v else []))))
    return store, site, f"v{len(VERSIONS) - 1}"


def trees_chain(work: Path, trees: list[Path]) -> tuple[Path, Path, str]:
    """`wheels_chain` of version trees already made (such as pip-built envs kept
    version by version): each snapshotted onto the one before."""
    store = work / "store-chain-trees"
    for v, tree in enumerate(trees):
        args = ["snapshot", os.fspath(tree), "--tag", f"v{v}"]
        _checked(pylayers(store, *(args + (["--parent", f"v{v - 1}"] if v else []))))
    return store, trees[-1], f"v{len(trees) - 1}"


def checkout(work: Path, tree: Path, repeat: int, store: Path | None = None,
             tag: str = "img") -> dict:
    """`pylayers checkout` of `tree` (snapshotted into a new store, or already stored in
    `store` as `tag`: the chain's last version) against `zstd -dc | tar -x` of a full
    image of the same tree, and `checkout --link`: alternating in one run. The ratios
    are of medians, and the median of each repeat's ratio (neighbours in time, so
    steadier on a shared machine)."""
    if store is None:
        store = work / "store-checkout"
        _checked(pylayers(store, "snapshot", os.fspath(tree), "--tag", tag))
    image = work / f"image-{tag}.tar.zst"
    _checked(Cmd(f"tar --xattrs -cf - -C '{tree}' . | zstd -3 -q -c > '{image}'"))
    dest_root = Path(tempfile.mkdtemp(prefix="co-", dir="/dev/shm"))
    pl, tar, link = [], [], []
    cpu: dict[str, list[float]] = {"pl": [], "tar": [], "link": []}
    has_link = "--link" in _checked(pylayers(store, "checkout", "--help")).stdout
    try:
        for r in range(repeat):
            cmds = [
                ("pl", pylayers(store, "checkout", tag, os.fspath(dest_root / f"pl{r}"))),
                ("tar", Cmd(f"mkdir -p '{dest_root}/tar{r}' && zstd -dcq '{image}' | tar "
                            f"--xattrs --xattrs-include='*' --numeric-owner -xf - -C "
                            f"'{dest_root}/tar{r}'")),
                ("link", pylayers(store, "checkout", "--link", tag,
                                  os.fspath(dest_root / f"link{r}"))),
            ][: 3 if has_link else 2]
            for key, cmd in (cmds if r % 2 == 0 else cmds[::-1]):
                res = _checked(cmd)
                {"pl": pl, "tar": tar, "link": link}[key].append(res.seconds)
                cpu[key].append(res.cpu)  # type: ignore[attr-defined]
            for d in dest_root.iterdir():
                shutil.rmtree(d)
    finally:
        shutil.rmtree(dest_root, ignore_errors=True)
    paired = [a / b for a, b in zip(pl, tar, strict=True)]
    paired_cpu = [a / b for a, b in zip(cpu["pl"], cpu["tar"], strict=True) if b]
    return {"tag": tag, "pylayers_s": med(pl), "tar_zstd_s": med(tar), "link_s": med(link),
            "ratio_vs_tar": med(pl) / med(tar), "link_ratio_vs_tar": med(link) / med(tar),
            "paired_ratio_vs_tar": med(paired), "image_bytes": image.stat().st_size,
            "cpu_s": {k: med(v) for k, v in cpu.items()},
            "cpu_ratio_vs_tar": med(cpu["pl"]) / med(cpu["tar"]),
            "paired_cpu_ratio_vs_tar": med(paired_cpu),
            "runs": {"pylayers": pl, "tar": tar, "link": link, "cpu": cpu}}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_paths",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--tree", type=Path, help="a real tree for unchanged and checkout")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", default="unchanged,smallfiles,checkout",
                    help="also: chain (checkout of the wheels chain's last version, from a "
                         "store holding all six; needs the wheel cache); links (smallfiles "
                         "as hardlinks into a store outside the tree, as pnpm makes them)")
    ap.add_argument("--wheel-cache", type=Path, help="wheels for --only chain "
                    "(default: bench/pyenv_wheels.py's)")
    ap.add_argument("--chain-trees", help="for --only chain: version trees, comma-"
                    "separated, oldest first, instead of the wheels chain")
    ap.add_argument("--work", type=Path)
    ap.add_argument("--out", type=Path, default=Path("bench/out/paths.json"))
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pylayers-paths-", dir="/dev/shm"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"command": " ".join(["python -m bench.bench_paths", *sys.argv[1:]])}
    only = set(args.only.split(","))
    try:
        tree = args.tree
        if tree is None and only & {"unchanged", "checkout"}:
            tree = work / "tree"
            make_tree(tree, args.files, 1024, 8192, seed=11)
            time.sleep(RACY_S)
        if "unchanged" in only:
            results["unchanged"] = unchanged(work, tree, args.repeat)
            print(json.dumps(results["unchanged"]), file=sys.stderr)
        if "smallfiles" in only:
            results["smallfiles"] = smallfiles(work, args.files, args.repeat)
            print(json.dumps(results["smallfiles"]), file=sys.stderr)
        if "links" in only:
            results["links"] = links(work, args.files, args.repeat)
            print(json.dumps(results["links"]), file=sys.stderr)
        if "checkout" in only:
            results["checkout"] = checkout(work, tree, args.repeat)
            print(json.dumps(results["checkout"]), file=sys.stderr)
        if "chain" in only:
            if args.chain_trees:
                store, site, tag = trees_chain(
                    work, [Path(t) for t in args.chain_trees.split(",")])
            else:
                from .pyenv_wheels import DEFAULT_CACHE
                store, site, tag = wheels_chain(work, args.wheel_cache or DEFAULT_CACHE)
            results["chain_checkout"] = checkout(work, site, args.repeat, store, tag)
            print(json.dumps(results["chain_checkout"]), file=sys.stderr)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "runs"}
                      if isinstance(v, dict) else v for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
