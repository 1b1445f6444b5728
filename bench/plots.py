"""PNG plots of a results JSON (matplotlib, no display needed).

- {prefix}-sizes.png (the main plot): store size per scenario, one panel each, with
  each peer's size as a multiple of pylayers';
- {prefix}-times.png: incremental snapshot, unchanged re-snapshot and last-version
  checkout time per scenario and store (log scale);
- {prefix}-growth.png: store size after each version;
- {prefix}-scaling.png: time and size against data size, against the number of layers.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from .report import MB, checkout_s, label, layers_source, ok_tools, scaling_points  # noqa: E402

PL_COLOR = "#d62728"
COLORS = {"pylayers": PL_COLOR, "tar-diff-gzip": "#1f77b4", "tar-diff-pigz": "#6baed6",
          "tar-diff-zstd": "#08519c", "tar-full-zstd": "#9ecae1", "ostree-bare": "#2ca02c",
          "ostree-archive": "#98df8a", "casync": "#9467bd", "borg": "#ff7f0e",
          "restic": "#8c564b"}


def color(key: str) -> str:
    return COLORS.get(key, "#7f7f7f")


def _plain(ax, which: str = "y") -> None:
    """Plain numbers (0.05, 2, 30) on log axes, not powers of ten."""
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    for axis in ([ax.xaxis] if "x" in which else []) + ([ax.yaxis] if "y" in which else []):
        axis.set_major_formatter(fmt)
        axis.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))


def _legend_on_top(fig, ax, ncol: int = 6) -> None:
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=ncol, fontsize=8, frameon=False)


def _grid(n: int) -> tuple[int, int]:
    cols = min(3, n)
    return math.ceil(n / cols), cols


def sizes(results: dict, path: Path) -> None:
    scns = results["scenarios"]
    rows, cols = _grid(len(scns))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    for ax, scn in zip(axes.flat, scns, strict=False):
        tools = ok_tools(scn)
        keys = list(tools)[::-1]
        vals = [tools[k]["store_bytes"] / MB for k in keys]
        ax.barh([label(k) for k in keys], vals, color=[color(k) for k in keys])
        pl = tools.get("pylayers", {}).get("store_bytes")
        for y, k in enumerate(keys):
            txt = (f"{tools[k]['store_bytes'] / MB:.1f} MB" if k == "pylayers" or not pl
                   else f"{tools[k]['store_bytes'] / pl:.2f}×")
            ax.text(tools[k]["store_bytes"] / MB, y, " " + txt, va="center", fontsize=7)
        ax.set_xlim(0, max(vals) * 1.25 if vals else 1)
        ax.set_title(f"{scn['key']} (raw {scn['raw_total_bytes'] / MB:.0f} MB)", fontsize=10)
        ax.set_xlabel("store size, MB (× = size / pylayers)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(scns):]:
        ax.axis("off")
    m = results["machine"]
    fig.suptitle(f"Store size after all versions — {results['profile']['name']} run, "
                 f"{m['cpu']}, {m['cores']} cores", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def times(results: dict, path: Path) -> None:
    scns = results["scenarios"]
    metrics = [("incremental snapshot", lambda r, s: r.get("incremental_s")),
               ("unchanged re-snapshot (dotted: git status of the same tree)",
                lambda r, s: r.get("unchanged_s")),
               ("checkout of the last version",
                lambda r, s: checkout_s(r, s["checkout_targets"][-1]))]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(12, 3.3 * len(metrics)), squeeze=False)
    keys: list[str] = []
    for s in scns:
        keys += [k for k in ok_tools(s) if k not in keys]
    width = 0.8 / max(1, len(keys))
    for ax, (title, get) in zip(axes[:, 0], metrics, strict=True):
        for j, k in enumerate(keys):
            xs, ys = [], []
            for i, s in enumerate(scns):
                rec = ok_tools(s).get(k)
                v = get(rec, s) if rec else None
                if v:
                    xs.append(i + (j - len(keys) / 2) * width + width / 2)
                    ys.append(v)
            ax.bar(xs, ys, width, color=color(k), label=label(k))
        if title.startswith("unchanged"):
            for i, s in enumerate(scns):
                if s.get("git_status_s"):
                    ax.hlines(s["git_status_s"], i - 0.4, i + 0.4, colors="k", linestyles=":",
                              label="git status" if i == 0 else None)
        ax.set_yscale("log")
        _plain(ax)
        ax.set_ylabel("seconds (log)")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(scns)), [s["key"] for s in scns], fontsize=8)
    _legend_on_top(fig, axes[-1, 0])
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def growth(results: dict, path: Path) -> None:
    scns = results["scenarios"]
    rows, cols = _grid(len(scns))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax, scn in zip(axes.flat, scns, strict=False):
        for k, rec in ok_tools(scn).items():
            ys = [c.get("store_bytes", 0) / MB for c in rec["commits"]]
            ax.plot(range(1, len(ys) + 1), ys, marker=".", color=color(k), label=label(k),
                    linewidth=2.2 if k == "pylayers" else 1)
        raw = []
        total = 0
        for st in scn["steps"]:
            total += st["raw_bytes"]
            raw.append(total / MB)
        ax.plot(range(1, len(raw) + 1), raw, "k:", label="raw (sum of versions)")
        ax.set_yscale("log")
        _plain(ax)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(scn["key"], fontsize=10)
        ax.set_xlabel("layers committed", fontsize=8)
        ax.set_ylabel("store MB (log)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(scns):]:
        ax.axis("off")
    _legend_on_top(fig, axes.flat[0])
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scaling(results: dict, path: Path) -> bool:
    pts, lay = scaling_points(results), layers_source(results)
    if not pts and not lay:
        return False
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for k, ps in pts.items():
        lw = 2.2 if k == "pylayers" else 1
        xs = [p["raw_bytes"] / MB for p in ps]
        axes[0].plot(xs, [p["first_s"] for p in ps], marker="o", color=color(k),
                     label=label(k), linewidth=lw)
        axes[1].plot(xs, [p["store_bytes"] / MB for p in ps], marker="o", color=color(k),
                     linewidth=lw)
    for ax, t, unit in ((axes[0], "first snapshot time", "seconds"),
                        (axes[1], "store growth (two versions)", "MB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain(ax, "xy")
        ax.set_xlabel("data size, MB (log)")
        ax.set_ylabel(unit)
        ax.set_title(t + " vs data size", fontsize=10)
    if lay:
        names = lay["checkout_targets"]
        ns = [int(n[1:]) + 1 for n in names]
        for k, rec in ok_tools(lay).items():
            lw = 2.2 if k == "pylayers" else 1
            axes[2].plot(ns, [checkout_s(rec, n) for n in names], marker="o", color=color(k),
                         label=label(k), linewidth=lw)
            ts = [c["seconds"] for c in rec["commits"]]
            axes[3].plot(range(1, len(ts) + 1), ts, marker=".", color=color(k), linewidth=lw)
        axes[2].set_title(f"checkout time vs layers in the chain ({lay['key']})", fontsize=10)
        axes[3].set_title(f"commit time of each layer ({lay['key']})", fontsize=10)
        for ax in axes[2:]:
            ax.set_xlabel("layers")
            ax.set_ylabel("seconds (log)")
            ax.set_yscale("log")
            _plain(ax)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend_on_top(fig, axes[2] if lay else axes[0], ncol=10)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def all_plots(results: dict, out: Path, prefix: str) -> list[Path]:
    made = []
    for name, fn in (("sizes", sizes), ("times", times), ("growth", growth),
                     ("scaling", scaling)):
        p = out / f"{prefix}-{name}.png"
        if fn(results, p) is not False:
            made.append(p)
    return made
