"""bench/bench_containerd.py (issue 13's figures) runs: a tiny image series imported
through one containerd onto pylayers and overlayfs, with every figure it reports.
Timings are recorded, never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from test_containerd_e2e import missing  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("layout", ["rebuilt", "chain"])
def test_tiny_series_side_by_side(tmp_path, layout):
    if (why := missing()) is not None:
        pytest.skip(why)
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "bench.bench_containerd", "--tiny",
                          "--versions", "2", "--runs", "1", "--out", str(out),
                          "--work", str(tmp_path / "work"), "--layout", layout],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    name = "containerd" if layout == "rebuilt" else f"containerd-{layout}"
    doc = json.loads((out / f"{name}.json").read_text())
    rows = doc["result"]["versions"]
    assert [r["version"] for r in rows] == [0, 1]
    # rebuilt: busybox and the whole env; chain: the previous image and its changes
    assert [r["image_layers"] for r in rows] == ([2, 2] if layout == "rebuilt" else [2, 3])
    for r in rows:
        assert set(r["import_s"]) == set(r["run_first_output_s"]) == {"pylayers",
                                                                       "overlayfs"}
        assert all(t > 0 for t in r["import_s"].values())
        assert all(0 < r["run_first_output_s"][s] <= r["run_exit_s"][s]
                   for s in r["import_s"])
        assert all(b > 0 for b in r["disk"].values()), r["disk"]
    # each version's env layer went to both; the second overlayfs copy is whole
    assert rows[1]["disk"]["overlayfs_dir"] > rows[0]["disk"]["overlayfs_dir"]
    assert doc["result"]["snapshotter_tracebacks"] == 0
    assert doc["result"]["pylayers_du"]["layers"] == 3  # busybox, env v0, env v1
    assert len(doc["result"]["warm_runs"]["pylayers"]) == 1
    md = (out / f"{name}.md").read_text()
    assert "| v1 |" in md and "python -m bench.bench_containerd --tiny" in md
    assert not list((tmp_path / "work").glob("pylayers-store/snapshots/*/fs/*")), \
        "the runs' containers left their snapshots behind"


def test_skips_cleanly_without_containerd(tmp_path):
    """Without containerd on PATH it says so and exits 0, having written nothing."""
    env = {**os.environ, "PATH": str(tmp_path)}
    res = subprocess.run([sys.executable, "-m", "bench.bench_containerd", "--tiny",
                          "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert "skipped:" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()
