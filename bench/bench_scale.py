"""Scaling with the number of entries: trees of 10k, 100k and 1M small files (32-256
bytes, 100 a directory, 10 directories a parent: node_modules-like), each measured
through the everyday paths, with git and tar side by side in the same run:

- first: `pylayers snapshot` of the new tree; `git add -A` into a fresh bare repository
  (and its commit); `tar -c | zstd -3` of the tree;
- 1% changed: 1% of the files appended to, then `pylayers snapshot --parent` and `git
  add -A` (each sees the same change);
- unchanged: `pylayers snapshot --parent` again (a new, empty layer), `git status`;
- diff: `pylayers diff` of the two layers, `git diff --name-status` of the two commits;
- checkout: `pylayers checkout` of the second layer, `zstd -dc | tar -x` of the image.

Wall time, CPU time (user + system, the command's children included) and peak RSS
(GNU time) of each command, the store's size and the index's bytes per file.

    python -m bench.bench_scale [--sizes 10000,100000,1000000] [--work DIR]
        [--out bench/results/scale]

Writes OUT.json, OUT.md (the table) and OUT.png (time and peak RSS against entries).
The work directory defaults to a new one under /tmp (a disk: a million files on tmpfs
would take 4 GB of memory each copy).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .bench_paths import RACY_S, _checked, _git, list_files, make_tree, pylayers, touch_some
from .proc import Cmd, git_rev

STEPS = ["first", "changed", "unchanged", "diff", "checkout"]
PEERS = {"first": ["git add+commit", "tar|zstd -3"], "changed": ["git add+commit"],
         "unchanged": ["git status"], "diff": ["git diff"], "checkout": ["zstd|tar -x"]}


def _one(cmd: Cmd) -> dict:
    r = _checked(cmd)
    return {"wall_s": r.seconds, "cpu_s": r.cpu,  # type: ignore[attr-defined]
            "rss_mib": (r.rss_kib or 0) / 1024}


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(work: Path, files: int) -> dict:
    tree = work / f"tree-{files}"
    make_tree(tree, files, 32, 256)
    names = list_files(tree)
    time.sleep(RACY_S)
    store, gitdir = work / f"store-{files}", work / f"git-{files}"
    image = work / f"image-{files}.tar.zst"
    git = lambda *a: Cmd(_git(gitdir, tree, *a))  # noqa: E731
    commit = ("-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q", "-m", "v")
    out: dict = {"files": files, "entries": len(names) + sum(1 for _ in tree.rglob("*/")) + 1}
    pl: dict = {}
    peers: dict = {}
    pl["first"] = _one(pylayers(store, "snapshot", os.fspath(tree), "--tag", "v0"))
    _checked(Cmd(["git", "init", "-q", "--bare", os.fspath(gitdir)]))
    peers["first"] = {"git add+commit": _one(Cmd(f"{' '.join(_git(gitdir, tree, 'add', '-A'))}"
                                                 f" && {' '.join(_git(gitdir, tree, *commit))}")),
                      "tar|zstd -3": _one(Cmd(f"tar -cf - -C '{tree}' . | zstd -3 -q -c "
                                              f"> '{image}'"))}
    touch_some(names, 0.01, random.Random(7))
    time.sleep(RACY_S)
    pl["changed"] = _one(pylayers(store, "snapshot", os.fspath(tree), "--parent", "v0",
                                  "--tag", "v1"))
    peers["changed"] = {"git add+commit": _one(Cmd(
        f"{' '.join(_git(gitdir, tree, 'add', '-A'))} && "
        f"{' '.join(_git(gitdir, tree, *commit))}"))}
    pl["unchanged"] = _one(pylayers(store, "snapshot", os.fspath(tree), "--parent", "v1",
                                    "--tag", "v2"))
    peers["unchanged"] = {"git status": _one(git("status", "--porcelain",
                                                 "--untracked-files=all"))}
    pl["diff"] = _one(pylayers(store, "diff", "v0", "v1"))
    peers["diff"] = {"git diff": _one(git("diff", "--name-status", "HEAD~1", "HEAD"))}
    dest = work / f"co-{files}"
    pl["checkout"] = _one(pylayers(store, "checkout", "v1", os.fspath(dest)))
    shutil.rmtree(dest)
    (work / f"tar-{files}").mkdir()
    peers["checkout"] = {"zstd|tar -x": _one(Cmd(
        f"zstd -dcq '{image}' | tar -xf - -C '{work}/tar-{files}'"))}
    shutil.rmtree(work / f"tar-{files}")
    index = store / "index" / "data.mdb"
    out.update(pylayers=pl, peers=peers, store_bytes=_du(store), index_bytes=index.stat().st_size,
               index_bytes_per_file=index.stat().st_size / files,
               image_bytes=image.stat().st_size, git_bytes=_du(gitdir))
    for d in (tree, store, gitdir):
        shutil.rmtree(d, ignore_errors=True)
    image.unlink()
    return out


def table(results: dict) -> str:
    lines = [f"# Scaling with entries\n\n`{results['command']}` at {results['git_rev']}; "
             "wall s / CPU s / peak RSS MiB.\n",
             "| files | step | pylayers | peer | peer's |", "|---|---|---|---|---|"]
    for r in results["runs"]:
        for step in STEPS:
            p = r["pylayers"][step]
            for name in PEERS[step]:
                q = r["peers"][step][name]
                peer = name.replace("|", "\\|")  # not a column break in markdown
                lines.append(f"| {r['files']:,} | {step} | {p['wall_s']:.2f} / {p['cpu_s']:.2f}"
                             f" / {p['rss_mib']:.0f} | {peer} | {q['wall_s']:.2f} / "
                             f"{q['cpu_s']:.2f} / {q['rss_mib']:.0f} |")
    lines += ["", "| files | store MB | index bytes a file | tar\\|zstd -3 MB | git MB |",
              "|---|---|---|---|---|"]
    for r in results["runs"]:
        lines.append(f"| {r['files']:,} | {r['store_bytes'] / 1e6:.1f} | "
                     f"{r['index_bytes_per_file']:.0f} | {r['image_bytes'] / 1e6:.1f} | "
                     f"{r['git_bytes'] / 1e6:.1f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    xs = [r["files"] for r in runs]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for step, color in zip(STEPS, ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"],
                           strict=True):
        ax_t.plot(xs, [r["pylayers"][step]["cpu_s"] for r in runs], "o-", color=color,
                  label=f"pylayers {step}")
        ax_m.plot(xs, [r["pylayers"][step]["rss_mib"] for r in runs], "o-", color=color,
                  label=f"pylayers {step}")
        peer = PEERS[step][0]
        ax_t.plot(xs, [r["peers"][step][peer]["cpu_s"] for r in runs], "x--", color=color,
                  alpha=0.6, label=peer)
    ax_m.axhline(1024, color="grey", lw=0.8, ls=":")
    for ax, what in ((ax_t, "CPU seconds"), (ax_m, "peak RSS, MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("files")
        ax.set_ylabel(what)
        ax.grid(True, which="both", lw=0.3)
    ax_t.legend(fontsize=7, ncol=2)
    ax_m.legend(fontsize=7)
    fig.suptitle("pylayers against entries (small files); dashed: git / tar, same run",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_scale",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--work", type=Path)
    ap.add_argument("--out", type=Path, default=Path("bench/results/scale"))
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pylayers-scale-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"command": " ".join(["python -m bench.bench_scale", *sys.argv[1:]]),
                     "git_rev": git_rev(), "runs": []}
    try:
        for n in (int(x) for x in args.sizes.split(",")):
            results["runs"].append(measure(work, n))
            print(json.dumps(results["runs"][-1]), file=sys.stderr)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table(results))
    plot(results, args.out.with_suffix(".png"))
    print(table(results))


if __name__ == "__main__":
    main()
