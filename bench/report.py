"""The Markdown report of a results JSON: tools, sizes, the issue's targets checked,
timings, scaling and the core primitives. Ratios are "peer / pylayers": above 1 means
pylayers is smaller (or faster)."""

from __future__ import annotations

from .competitors import BY_KEY

MB = 1e6
PEER_TAR = ("tar-diff-gzip", "tar-diff-pigz", "tar-diff-zstd", "tar-full-zstd")
TAR_DIFF = ("tar-diff-gzip", "tar-diff-pigz", "tar-diff-zstd")


def label(key: str) -> str:
    return BY_KEY[key].label if key in BY_KEY else key


def fmt_s(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def fmt_mb(b: float | None) -> str:
    if b is None:
        return "–"
    return f"{b / MB:.2f}" if b < 10 * MB else f"{b / MB:.1f}"


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "–"
    return f"{a / b:.2f}×"


def ok_tools(scn: dict) -> dict[str, dict]:
    return {k: v for k, v in scn["tools"].items() if not v.get("error") and v.get("store_bytes")}


def _peers(tools: dict[str, dict]) -> dict[str, dict]:
    return {k: v for k, v in tools.items() if k != "pylayers"}


def _best(tools: dict[str, dict], field: str) -> tuple[str | None, float | None]:
    vals = [(v[field], k) for k, v in tools.items() if v.get(field) is not None]
    if not vals:
        return None, None
    val, key = min(vals)
    return key, val


def checkout_s(rec: dict, name: str) -> float | None:
    co = rec.get("checkouts", {}).get(name)
    return co.get("seconds") if co else None


def targets(results: dict) -> list[dict]:
    """The issue's targets, each with the measured numbers and a verdict."""
    rows: list[dict] = []

    def add(target: str, scenario: str, measured: str, passed: bool, value: float) -> None:
        """`value` is pylayers' figure as a multiple of what the target compares with."""
        rows.append({"target": target, "scenario": scenario, "measured": measured,
                     "result": "pass" if passed else "FAIL", "value": round(value, 3)})

    for scn in results["scenarios"]:
        tools = ok_tools(scn)
        pl = tools.get("pylayers")
        if not pl:
            continue
        peers = _peers(tools)
        key = scn["key"]
        bk, bv = _best(peers, "store_bytes")
        if bk:
            r = pl["store_bytes"] / bv
            add("smallest store", key,
                f"pylayers {fmt_mb(pl['store_bytes'])} MB vs best peer {label(bk)} "
                f"{fmt_mb(bv)} MB ({r:.2f}×)", r <= 1, r)
            if key.startswith("chain"):
                add("≤ 0.9× best peer (linear chain)", key, f"{r:.2f}×", r <= 0.9, r)
        if key in ("rebuild", "images"):
            tars = {k: v for k, v in peers.items() if k in TAR_DIFF}
            tk, tv = _best(tars, "store_bytes")
            if tk:
                docker = tars.get("tar-diff-gzip")
                extra = (f"; Docker's gzip layers {docker['store_bytes'] / pl['store_bytes']:.1f}×"
                         if docker and tk != "tar-diff-gzip" else "")
                add("≥ 5× smaller than the tar store", key,
                    f"smallest tar store ({label(tk)}) is {tv / pl['store_bytes']:.1f}× "
                    f"pylayers{extra}", tv / pl["store_bytes"] >= 5, pl["store_bytes"] / tv)
        bk, bv = _best(peers, "incremental_s")
        if bk and pl.get("incremental_s"):
            add("incremental snapshot faster than every peer", key,
                f"pylayers {fmt_s(pl['incremental_s'])} s vs fastest peer {label(bk)} "
                f"{fmt_s(bv)} s ({pl['incremental_s'] / bv:.2f}× its time)",
                pl["incremental_s"] < bv, pl["incremental_s"] / bv)
        g = scn.get("git_status_s")
        if g and pl.get("unchanged_s"):
            st = scn.get("pylayers_startup_s")
            floor = f"; start-up alone {fmt_s(st)} s" if st else ""
            add("unchanged re-snapshot ≤ 2× git status", key,
                f"{fmt_s(pl['unchanged_s'])} s vs git status {fmt_s(g)} s "
                f"({pl['unchanged_s'] / g:.2f}×{floor})", pl["unchanged_s"] <= 2 * g,
                pl["unchanged_s"] / g)
        full = tools.get("tar-full-zstd")
        if full:
            for name in scn.get("checkout_targets", []):
                a, b = checkout_s(pl, name), checkout_s(full, name)
                if a and b:
                    add("checkout ≤ tar -x of a zstd full image", key,
                        f"{name}: {fmt_s(a)} s vs {fmt_s(b)} s ({a / b:.2f}×)", a <= b, a / b)
    return rows


def size_table(results: dict) -> list[str]:
    scns = results["scenarios"]
    keys = _tool_order(results)
    head = "| store | " + " | ".join(s["key"] for s in scns) + " |"
    lines = [head, "|---|" + "---:|" * len(scns)]
    lines.append("| raw data (sum of versions) | " + " | ".join(
        f"{fmt_mb(s['raw_total_bytes'])}" for s in scns) + " |")
    for k in keys:
        cells = []
        for s in scns:
            rec = s["tools"].get(k)
            pl = s["tools"].get("pylayers", {}).get("store_bytes")
            if not rec or rec.get("error") or not rec.get("store_bytes"):
                cells.append("failed" if rec and rec.get("error") else "–")
            elif k == "pylayers":
                cells.append(f"**{fmt_mb(rec['store_bytes'])}** "
                             f"(dedup {rec.get('dedup_ratio', 0):.1f}×)")
            else:
                cells.append(f"{fmt_mb(rec['store_bytes'])} ({ratio(rec['store_bytes'], pl)})")
        lines.append(f"| {label(k)} | " + " | ".join(cells) + " |")
    return lines


def speed_table(scn: dict) -> list[str]:
    names = scn.get("checkout_targets", [])
    pl = scn["tools"].get("pylayers", {})
    head = ("| store | first s | incremental s | unchanged s | "
            + " | ".join(f"checkout {n} s" for n in names) + " | peak RSS MiB | restore ok |")
    lines = [head, "|---|" + "---:|" * (4 + len(names)) + "---|"]
    for k, rec in scn["tools"].items():
        if rec.get("error"):
            lines.append(f"| {label(k)} | failed: {rec['error'][:120]} |" + " |" * (4 + len(names)))
            continue

        def cell(v: float | None, ref: float | None, k: str = k) -> str:
            if v is None:
                return "–"
            return fmt_s(v) if k == "pylayers" else f"{fmt_s(v)} ({ratio(v, ref)})"

        cos = [cell(checkout_s(rec, n), checkout_s(pl, n)) for n in names]
        ver = [rec["checkouts"].get(n, {}).get("verified") for n in names]
        ok = "yes" if all(v is True for v in ver) else "NO" if any(v is False for v in ver) else "–"
        rss = rec.get("peak_rss_kib")
        lines.append(f"| {label(k)} | {cell(rec.get('first_s'), pl.get('first_s'))} | "
                     f"{cell(rec.get('incremental_s'), pl.get('incremental_s'))} | "
                     f"{cell(rec.get('unchanged_s'), pl.get('unchanged_s'))} | "
                     + " | ".join(cos) + f" | {rss / 1024 if rss else 0:.0f} | {ok} |")
    if scn.get("git_status_s"):
        lines.append(f"| *git status (reference)* | | | {fmt_s(scn['git_status_s'])} |"
                     + " |" * (len(names) + 2))
    if scn.get("pylayers_startup_s"):
        lines.append(f"| *pylayers --version (start-up)* | | | "
                     f"{fmt_s(scn['pylayers_startup_s'])} |" + " |" * (len(names) + 2))
    return lines


def _tool_order(results: dict) -> list[str]:
    seen: list[str] = []
    for s in results["scenarios"]:
        for k in s["tools"]:
            if k not in seen:
                seen.append(k)
    return seen


def scaling_points(results: dict) -> dict[str, list[dict]]:
    """Per store, per data size: first and incremental snapshot time, store growth,
    checkout time (from the scaling run, whose stores take every size in turn)."""
    scn = (results.get("scaling") or {}).get("scaling")
    if not scn:
        return {}
    names = [st["name"] for st in scn["steps"]]
    out: dict[str, list[dict]] = {}
    for key, rec in scn["tools"].items():
        if rec.get("error") or len(rec["commits"]) != len(names):
            continue
        pts = []
        for i in range(0, len(names), 2):
            before = rec["commits"][i - 1]["store_bytes"] if i else rec.get("init_bytes", 0)
            pts.append({"scale": names[i].split("-")[0][1:],
                        "raw_bytes": scn["steps"][i]["raw_bytes"],
                        "first_s": rec["commits"][i]["seconds"],
                        "incremental_s": rec["commits"][i + 1]["seconds"],
                        "store_bytes": rec["commits"][i + 1]["store_bytes"] - before,
                        "checkout_s": checkout_s(rec, names[i + 1])})
        out[key] = pts
    return out


def layers_source(results: dict) -> dict | None:
    """The long chain of the full run, else the mutations scenario."""
    lay = (results.get("scaling") or {}).get("layers")
    if lay:
        return lay
    return next((s for s in results["scenarios"] if s["key"] == "mutations"), None)


def scaling_tables(results: dict) -> list[str]:
    out: list[str] = []
    pts = scaling_points(results)
    if pts:
        first = next(iter(pts.values()))
        out += ["### Scaling with data size", "",
                "A synthetic tree per size, snapshotted, changed by every mutation model, "
                "snapshotted again, restored; store growth is what the two snapshots added.",
                "", "| store | " + " | ".join(
                    f"{p['scale']}× ({fmt_mb(p['raw_bytes'])} MB): first / incr. / checkout s, "
                    "growth MB" for p in first) + " |",
                "|---|" + "---|" * len(first)]
        for k, ps in pts.items():
            cells = [f"{fmt_s(p['first_s'])} / {fmt_s(p['incremental_s'])} / "
                     f"{fmt_s(p['checkout_s'])}, {fmt_mb(p['store_bytes'])}" for p in ps]
            out.append(f"| {label(k)} | " + " | ".join(cells) + " |")
        out.append("")
    lay = layers_source(results)
    if lay:
        names = lay["checkout_targets"]
        out += [f"### Scaling with the number of layers ({lay['key']}: {len(lay['steps'])} "
                f"versions of a {fmt_mb(lay['steps'][0]['raw_bytes'])} MB tree)", "",
                "| store | " + " | ".join(f"checkout at {int(n[1:]) + 1} layers s" for n in names)
                + " | first commit s | last commit s |",
                "|---|" + "---:|" * (len(names) + 2)]
        for k, rec in lay["tools"].items():
            if rec.get("error") or not rec["commits"]:
                out.append(f"| {label(k)} | failed |" + " |" * (len(names) + 1))
                continue
            cells = [fmt_s(checkout_s(rec, n)) for n in names]
            out.append(f"| {label(k)} | " + " | ".join(cells)
                       + f" | {fmt_s(rec['commits'][0]['seconds'])} | "
                       f"{fmt_s(rec['commits'][-1]['seconds'])} |")
        out.append("")
    return out


def core_table(results: dict) -> list[str]:
    core = results.get("core")
    if not core:
        return []
    out = [f"### Core primitives ({core['bytes'] / 2**20:.0f} MiB, half text, half random)",
           "", "| job | implementation | timing | MB/s | notes |", "|---|---|---|---:|---|"]
    for name, rec in core["cases"].items():
        if "error" in rec:
            out.append(f"| {rec['kind']} | {name} | {rec['timing']} | – | {rec['error']} |")
            continue
        note = ""
        if rec.get("mean_chunk"):
            note = f"mean chunk {rec['mean_chunk'] / 1024:.0f} KiB"
        if rec.get("ratio"):
            note = f"ratio {rec['ratio']:.2f}"
        out.append(f"| {rec['kind']} | {name} | {rec['timing']} | {rec['mb_per_s']:.0f} | {note} |")
    out.append("")
    return out


def targets_summary(rows: list[dict]) -> list[str]:
    """One line per target: where it is met and where missed, with pylayers' figure as
    a multiple of what the target compares with."""
    out = ["| target | met | missed (pylayers as a multiple of the comparison) |",
           "|---|---|---|"]
    by: dict[str, dict[str, list[str]]] = {}
    for r in rows:
        cell = by.setdefault(r["target"], {"pass": [], "FAIL": []})
        cell[r["result"]].append(f"{r['scenario']} {r['value']:.2f}×")
    for target, cell in by.items():
        out.append(f"| {target} | {', '.join(cell['pass']) or '–'} | "
                   f"{', '.join(cell['FAIL']) or '–'} |")
    return out


def readme_block(results: dict, plot: str) -> str:
    """The README's Benchmarks section for a results file."""
    m = results["machine"]
    return "\n".join([
        "## Benchmarks", "",
        "`python -m bench --quick` (under 3 minutes) or `python -m bench --full` (the issue's "
        "sizes; `--scale F` shrinks them), both with `--out DIR`, run pylayers beside "
        "Docker-style tar layer stores (diff layers with gzip, pigz or zstd; full-image "
        "tarballs), OSTree (bare, archive), casync, borg and restic on the same generated "
        "data, each as a separate process, alternating, and write JSON, a Markdown report "
        "and plots to `bench/results/`. Latest quick run: "
        f"{results['started']}, {m['cpu']}, {m['cores']} cores, trees on {m['filesystem']}. "
        "Store size in MB after all versions; (×) is the peer's size over pylayers':", "",
        *size_table(results), "",
        "The issue's targets, per scenario (full table and timings in "
        f"[{results.get('report', 'bench/results/bench-quick.md')}]"
        f"({results.get('report', 'bench/results/bench-quick.md')})):", "",
        *targets_summary(results.get("targets", [])), "",
        f"![store size per scenario]({plot})", ""])


def targets_table(rows: list[dict]) -> list[str]:
    out = ["| target | scenario | measured | result |", "|---|---|---|---|"]
    out += [f"| {r['target']} | {r['scenario']} | {r['measured']} | {r['result']} |" for r in rows]
    return out


def markdown(results: dict) -> str:
    m = results["machine"]
    p = results["profile"]
    lines = [f"# pylayers benchmarks ({p['name']})", "",
             f"{results['started']}, {results['duration_s']:.0f} s, pylayers "
             f"{results.get('pylayers_version', '?')} (repository {results.get('git_rev', '?')}), "
             f"`{results.get('command', 'python -m bench')}`. "
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_bytes'] / 2**30:.0f} GiB, "
             f"Linux {m['kernel']}, {m['filesystem']}; shared and noisy, so only the ratios of "
             "side-by-side runs mean anything.", ""]
    if results.get("reduced"):
        lines += [f"**Reduced run**: {results['reduced']}", ""]
    lines += ["Sizes are the bytes of the files in each repository (`du -b`, directories "
              "left out; allocated bytes are in the JSON). Ratios are peer / pylayers: above "
              "1× pylayers is smaller or faster. Times are wall clock of a whole process, "
              "medians; commit times of the tar stores leave out finding the changes "
              "(overlayfs hands Docker its upper directory).", "",
              "## Store size (MB) after all versions", ""]
    lines += size_table(results)
    split = [f"{s['key']} {fmt_mb(s['pylayers_du']['packs_bytes'])} + "
             f"{fmt_mb(s['pylayers_du']['index_bytes'])}"
             for s in results["scenarios"] if (s.get("pylayers_du") or {}).get("packs_bytes")]
    if split:
        lines += ["", "pylayers' store is its packs plus its LMDB index (layer records, chunk "
                  "index, stat cache, and free pages LMDB has not reused), MB: "
                  + "; ".join(split) + "."]
    lines += ["", "## Targets from the issue", ""]
    lines += targets_table(results.get("targets", []))
    lines += ["", "## Speed per scenario", ""]
    for scn in results["scenarios"]:
        lines += [f"### {scn['key']}: {scn['title']}", "", scn["description"] + ".", ""]
        lines += speed_table(scn)
        lines.append("")
    lines += scaling_tables(results)
    lines += core_table(results)
    lines += ["## Tools", "", "| store | version | settings |", "|---|---|---|"]
    for t in results["tools"].values():
        lines.append(f"| {t['label']} | {t.get('version') or '–'} | "
                     f"{t.get('settings') or t.get('status', '')} |")
    if results.get("not_installed"):
        lines += ["", "Not installed (skipped): "
                  + ", ".join(sorted(results["not_installed"])) + "."]
    if results.get("left_out"):
        lines += ["", "Left out of this run: " + "; ".join(results["left_out"]) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    # python -m bench.report RESULTS.json [PLOT]: print the README's Benchmarks section.
    import json
    import sys
    from pathlib import Path

    res = json.loads(Path(sys.argv[1]).read_text())
    print(readme_block(res, sys.argv[2] if len(sys.argv) > 2 else
                       "bench/results/bench-quick-sizes.png"))
