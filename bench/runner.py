"""Running a scenario: every competitor commits every step, in rotating order, as a
separate process; then unchanged re-snapshots and checkouts, alternated and repeated.

Commit times are per step (medians over whole-scenario repeats when there are several);
"first" is the first commit, "incremental" the median over commits that have a parent.
Store sizes are measured after every step. Each checkout is verified once against the
tree it restores (types, permissions, sizes, content digests, link targets).
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .competitors import Commit, Competitor, Pylayers, TarDiff
from .proc import PY, Cmd, CommandFailed, check, run
from .scenarios import Scenario
from .tarlayers import content_manifest, manifest, stage_upper

# pylayers (like git) does not trust its stat cache for files changed within a second
# of a snapshot, and would read them again next time; real workflows rarely snapshot
# within a second of an edit, so pylayers' commit waits (untimed) until each change is
# that old. The other stores need no such wait (borg's cache rule does not use the clock).
RACY_S = 1.05


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Options:
    repeat: int = 3                   # alternated runs of last checkouts, unchanged snapshots
    middle_repeat: int = 3            # alternated runs of the other checkouts
    chain_repeat: int = 1             # whole-scenario runs
    unchanged: bool = True
    reference: bool = True            # git status beside the unchanged re-snapshot
    verify: bool = True
    keep: bool = False                # keep the stores (and the last trees) for a look


@dataclass
class ToolRun:
    tool: Competitor
    init_bytes: int = 0
    commits: list[dict] = field(default_factory=list)
    unchanged: list[float] = field(default_factory=list)
    checkouts: dict[str, dict] = field(default_factory=dict)
    rss: list[int] = field(default_factory=list)
    error: str | None = None


class Clock:
    """Wall time spent outside the measured commands, by activity (to show where a
    run's time goes)."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.spent[what] += time.perf_counter() - t

    def steps(self, it: Iterator) -> Iterator:
        while True:
            with self("generate data"):
                item = next(it, None)
            if item is None:
                return
            yield item


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def rotate(items: list, k: int) -> list:
    k %= max(1, len(items))
    return items[k:] + items[:k]


def run_scenario(scn: Scenario, classes: list[type[Competitor]], work: Path,
                 opts: Options) -> dict:
    t0 = time.perf_counter()
    runs = []
    for rep in range(opts.chain_repeat):
        runs.append(_run_once(scn, classes, work / f"run{rep}", opts))
        if not opts.keep:
            shutil.rmtree(work / f"run{rep}", ignore_errors=True)
    result = _merge(runs)
    result.update(key=scn.key, title=scn.title, description=scn.describe(),
                  seconds=round(time.perf_counter() - t0, 1))
    return result


def _run_once(scn: Scenario, classes: list[type[Competitor]], work: Path,
              opts: Options) -> dict:
    data, repos = work / "data", work / "repos"
    clock = Clock()
    tools = [ToolRun(cls(repos / cls.key)) for cls in classes]
    with clock("init stores"), ThreadPoolExecutor(len(tools) or 1) as pool:
        # Untimed, so in parallel (restic's and borg's key set-up take a second each).
        for t, err in zip(tools, pool.map(_init, [t.tool for t in tools]), strict=True):
            if err:
                t.error = err
            else:
                t.init_bytes = t.tool.size()[0]
    need_upper = any(isinstance(t.tool, TarDiff) for t in tools)
    manifests: dict[str, dict] = {}
    contents: dict[str, dict] = {}
    steps: list[dict] = []
    last_src: Path | None = None
    n = scn.count()
    target_idx = scn.checkout_targets(n)
    for i, step in enumerate(clock.steps(scn.steps(data))):
        changed_at = time.monotonic()
        last_src = step.src
        with clock("manifests"):
            m = manifest(step.src)
            manifests[step.name] = m
            if opts.verify and i in target_idx:
                contents[step.name] = content_manifest(step.src)
        steps.append({"name": step.name, "parent": step.parent, "what": step.what,
                      "raw_bytes": sum(f[4] for f in m.values()), "entries": len(m)})
        upper = None
        if need_upper:
            with clock("stage tar diffs"):
                upper = work / "upper" / step.name
                n_changed, n_deleted = stage_upper(step.src, manifests.get(step.parent, {}),
                                                   m, upper)
            steps[-1].update(diff_entries=n_changed, whiteouts=n_deleted)
        commit = Commit(step.name, step.parent, step.src, upper)
        # Rotating the order alternates who goes first; starting one along keeps pylayers
        # from opening the first step, where it would wait out the racy second.
        for t in rotate(tools, i + 1):
            if isinstance(t.tool, Pylayers):
                with clock("racy wait"):
                    time.sleep(max(0.0, changed_at + RACY_S - time.monotonic()))
            with clock("timed commands"):
                _commit(t, commit)
        with clock("sizes"):
            for t in tools:
                if t.error is None:
                    app, disk = t.tool.size()
                    t.commits[-1].update(store_bytes=app, store_disk_bytes=disk)
            if upper is not None:
                shutil.rmtree(upper)
        log(f"  {scn.key} {step.name}: {steps[-1]['raw_bytes'] / 1e6:.1f} MB raw, "
            + ", ".join(f"{t.tool.key} {t.commits[-1]['seconds']:.2f}s"
                        for t in tools if t.error is None and t.commits))
    assert last_src is not None
    final_sizes = {t.tool.key: t.tool.size() for t in tools if t.error is None}
    pl_du = next((t.tool.self_reported() for t in tools
                  if isinstance(t.tool, Pylayers) and t.error is None), None)
    names = [s["name"] for s in steps]

    git_runs: list[float] = []
    startup_runs: list[float] = []
    if opts.unchanged:
        with clock("git reference set-up"):
            git = _git_reference(work / "git", last_src) if opts.reference else None
        last = names[-1]
        empty = work / "upper-empty"
        empty.mkdir()
        if need_upper:
            stage_upper(last_src, manifests[last], manifests[last], empty)
        for r in range(opts.repeat):
            c = Commit(f"{last}-again{r}", last, last_src, empty)
            with clock("timed commands"):
                for t in rotate(tools, r):
                    _commit(t, c, unchanged=True)
                if git is not None:
                    git_runs.append(run(git).seconds)
                # The floor under any pylayers command: starting Python and the CLI.
                startup_runs.append(run(Cmd([PY, "-m", "pylayers", "--version"])).seconds)

    assert len(names) == n, f"{scn.key}: {len(names)} steps, count() said {n}"
    targets = [names[i] for i in target_idx]
    for target in targets:
        for r in range(opts.repeat if target == names[-1] else opts.middle_repeat):
            for t in rotate(tools, r):
                _checkout(t, target, work / "co" / f"{t.tool.key}-{target}-{r}",
                          contents.get(target) if r == 0 else None, clock)
    if not opts.keep:
        with clock("clean up"):
            shutil.rmtree(data, ignore_errors=True)

    out_tools = {}
    for t in tools:
        rec: dict = {"error": t.error, "init_bytes": t.init_bytes, "commits": t.commits}
        if t.tool.key in final_sizes:
            rec["store_bytes"], rec["store_disk_bytes"] = final_sizes[t.tool.key]
        rec["unchanged_runs"] = t.unchanged
        rec["checkouts"] = t.checkouts
        rec["peak_rss_kib"] = max(t.rss) if t.rss else None
        out_tools[t.tool.key] = rec
    return {"steps": steps, "tools": out_tools, "pylayers_du": pl_du,
            "git_status_runs": git_runs, "startup_runs": startup_runs,
            "checkout_targets": targets,
            "time_outside_commands": {k: round(v, 2) for k, v in clock.spent.items()}}


def _init(tool: Competitor) -> str | None:
    try:
        tool.init()
    except CommandFailed as e:
        return f"init: {e}"
    return None


def _commit(t: ToolRun, c: Commit, unchanged: bool = False) -> None:
    if t.error is not None:
        return
    try:
        r = run(t.tool.commit(c))
    except CommandFailed as e:
        t.error = f"commit {c.name}: {e}"
        log(f"  ! {t.tool.key}: {t.error}")
        return
    t.tool.committed(c, r)
    if r.rss_kib:
        t.rss.append(r.rss_kib)
    if unchanged:
        t.unchanged.append(r.seconds)
    else:
        t.commits.append({"name": c.name, "seconds": r.seconds, "rss_kib": r.rss_kib})


def _checkout(t: ToolRun, name: str, dest: Path, expect: dict | None, clock: Clock) -> None:
    if t.error is not None:
        return
    rec = t.checkouts.setdefault(name, {"runs": [], "rss_kib": 0, "verified": None})
    try:
        with clock("timed commands"):
            r = run(t.tool.checkout(name, dest))
    except CommandFailed as e:
        t.error = f"checkout {name}: {e}"
        log(f"  ! {t.tool.key}: {t.error}")
        return
    rec["runs"].append(r.seconds)
    if r.rss_kib:
        rec["rss_kib"] = max(rec["rss_kib"], r.rss_kib)
        t.rss.append(r.rss_kib)
    if expect is not None:
        with clock("verify restores"):
            got = content_manifest(dest)
        problems = [p for p in sorted(set(expect) | set(got)) if expect.get(p) != got.get(p)]
        rec["verified"] = not problems
        if problems:
            rec["mismatches"] = len(problems)
            rec["mismatch_examples"] = [
                {"path": p, "expected": expect.get(p), "got": got.get(p)} for p in problems[:3]]
            log(f"  ! {t.tool.key} checkout {name}: {len(problems)} mismatches, "
                f"e.g. {problems[:3]}")
    with clock("clean up"):
        shutil.rmtree(dest, ignore_errors=True)


def _git_reference(gitdir: Path, tree: Path) -> Cmd | None:
    """`git status` of the tree, its index fresh: the speed a stat-cache scan can reach."""
    if shutil.which("git") is None:
        return None
    g = ["git", f"--git-dir={gitdir}", f"--work-tree={tree}", "-c", "core.looseCompression=0"]
    check(["git", "init", "-q", "--bare", str(gitdir)])
    check([*g, "add", "-A"])
    check([*g, "update-index", "--refresh"])
    check([*g, "status", "--porcelain"])
    return Cmd([*g, "status", "--porcelain", "--untracked-files=all"])


def _merge(runs: list[dict]) -> dict:
    """One result from whole-scenario repeats: per-step commit times are medians over
    them, sizes come from the first, repeated-run samples are pooled."""
    first = runs[0]
    tools: dict[str, dict] = {}
    for key, rec in first["tools"].items():
        recs = [r["tools"][key] for r in runs]
        out = dict(rec)
        commits = []
        for i, c in enumerate(rec["commits"]):
            times = [r["commits"][i]["seconds"] for r in recs if len(r["commits"]) > i]
            commits.append({**c, "seconds": statistics.median(times), "samples": times})
        out["commits"] = commits
        out["unchanged_runs"] = [x for r in recs for x in r["unchanged_runs"]]
        checkouts = {}
        for name, co in rec["checkouts"].items():
            all_runs = [x for r in recs for x in r["checkouts"].get(name, {}).get("runs", [])]
            checkouts[name] = {**co, "runs": all_runs, "seconds": median(all_runs)}
        out["checkouts"] = checkouts
        out["error"] = next((r["error"] for r in recs if r["error"]), None)
        parented = [c["seconds"] for c, s in zip(commits, first["steps"], strict=False)
                    if s["parent"] is not None]
        out["first_s"] = commits[0]["seconds"] if commits else None
        out["incremental_s"] = median(parented)
        out["unchanged_s"] = median(out["unchanged_runs"])
        rss = [r["peak_rss_kib"] for r in recs if r["peak_rss_kib"]]
        out["peak_rss_kib"] = max(rss) if rss else None
        tools[key] = out
    raw_total = sum(s["raw_bytes"] for s in first["steps"])
    for rec in tools.values():
        if rec.get("store_bytes"):
            rec["dedup_ratio"] = raw_total / rec["store_bytes"]
    spent: dict[str, float] = defaultdict(float)
    for r in runs:
        for k, v in r["time_outside_commands"].items():
            spent[k] += v
    git = [x for r in runs for x in r["git_status_runs"]]
    startup = [x for r in runs for x in r["startup_runs"]]
    return {"steps": first["steps"], "raw_total_bytes": raw_total, "tools": tools,
            "pylayers_du": first["pylayers_du"], "checkout_targets": first["checkout_targets"],
            "git_status_s": median(git), "git_status_runs": git,
            "pylayers_startup_s": median(startup), "time_outside_commands": dict(spent)}
