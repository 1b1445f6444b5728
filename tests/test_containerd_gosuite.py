"""containerd's own snapshotter test suite, in Go, against the gRPC service: Debian's
containerd sources (snapshots/testsuite, snapshots/proxy) and their dependencies build
offline in GOPATH mode; tests/containerd_suite/pylayers_test.go hands
testsuite.SnapshotterSuite a proxy.NewSnapshotter over one `pylayers
containerd-snapshotter` per test root. Every case must pass (the suite itself skips
Rename, on every snapshotter)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

GOCODE = Path("/usr/share/gocode")
CONTAINERD = GOCODE / "src/github.com/containerd/containerd"
HERE = Path(__file__).resolve().parent
SKIPPED_BY_THE_SUITE = {"Rename"}


def test_containerd_snapshotter_suite(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("containerd's snapshotter suite mounts: it needs root")
    if shutil.which("go") is None:
        pytest.skip("go is not installed (Debian: golang-go)")
    if not (CONTAINERD / "snapshots/testsuite").is_dir():
        pytest.skip(f"containerd's Go sources are not installed ({CONTAINERD}; Debian: "
                    "golang-github-containerd-containerd-dev)")
    pkg = tmp_path / "gopath/src/pylayerstest"
    pkg.mkdir(parents=True)
    shutil.copy(HERE / "containerd_suite" / "pylayers_test.go", pkg)
    env = {**os.environ, "GO111MODULE": "off", "GOPROXY": "off", "GOFLAGS": "",
           "GOPATH": f"{tmp_path / 'gopath'}:{GOCODE}"}
    build = subprocess.run(["go", "test", "-c", "-o", str(tmp_path / "suite.test"), "."],
                           cwd=pkg, env=env, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    pylayers = Path(sys.executable).parent / "pylayers"
    assert pylayers.exists(), pylayers
    run = subprocess.run([str(tmp_path / "suite.test"), "-test.root", "-test.v"],
                         cwd=tmp_path, env={**os.environ, "PYLAYERS": str(pylayers)},
                         capture_output=True, text=True, timeout=1200)
    out = run.stdout + run.stderr
    results = {name: res for res, name in
               re.findall(r"--- (PASS|FAIL|SKIP): TestPylayers/(\S+)", out)}
    assert run.returncode == 0, out[-5000:]
    assert len(results) >= 20, out[-3000:]  # the suite ran
    failed = {n for n, r in results.items() if r == "FAIL"}
    skipped = {n for n, r in results.items() if r == "SKIP"}
    assert not failed, out[-5000:]
    assert skipped <= SKIPPED_BY_THE_SUITE, skipped
    assert "Traceback" not in out, out[-5000:]
