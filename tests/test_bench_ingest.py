"""bench/bench_ingest.py runs end to end on a small tree: every command measured, the
store's size and packs digest recorded, two installs comparable side by side."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("zstd") is None, reason="needs the zstd command")
def test_bench_ingest_measures_pylayers_beside_tar_zstd(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    rnd = random.Random(1)
    words = [bytes(rnd.choices(b"abcdefgh_./", k=rnd.randint(2, 9))) for _ in range(500)]
    for i in range(6):
        (tree / "d" / f"f{i}.txt").write_bytes(b" ".join(rnd.choices(words, k=30_000)))
    (tree / "small").write_bytes(b"tiny")
    out = tmp_path / "res.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_ingest", "--tree", str(tree), "--repeat", "1",
         "--work", str(tmp_path / "work"), "--pylayers", f"a={sys.executable}",
         "--pylayers", f"b={sys.executable}", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    cmds = res["commands"]
    assert set(cmds) == {"a", "b", "tar|zstd -1 -T1", "tar|zstd -3 -T1", "tar|zstd -3 -T2",
                         "zstd -1 -T1 (tar file)", "zstd -3 -T1 (tar file)"}
    assert res["tree_bytes"] == sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())
    for name, c in cmds.items():
        assert c["cpu_s"] > 0 and c["wall_s"] > 0 and c["bytes"] > 0, name
    # the same install on the same tree stores the same frames
    assert cmds["a"]["packs_sha256"] == cmds["b"]["packs_sha256"]
    assert cmds["a"]["bytes"] < res["tree_bytes"]  # compressed, index included
    assert "| a |" in proc.stdout and "vs tar\\|zstd -3" in proc.stdout
    assert not list((tmp_path / "work").iterdir())  # its work directory is removed
