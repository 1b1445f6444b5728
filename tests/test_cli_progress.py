"""Progress (issue 9 item 17): a bar with total, percent and ETA on a terminal; with
`--progress` on a pipe, lines (every PYLAYERS_PROGRESS_INTERVAL seconds) and a last
one with the total; `--quiet` silences progress and summaries; the library reports
through callbacks and never prints.

Real stores and trees in tmp_path; the CLI is the installed `pylayers` command, in a
subprocess (on a pseudo-terminal for the bar). Nothing here depends on timing: the
line interval and the bar's delay are set to 0.
"""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pylayers

PYLAYERS = Path(sys.executable).parent / "pylayers"
ENV = dict(os.environ, PYLAYERS_PROGRESS_INTERVAL="0", PYLAYERS_PROGRESS_DELAY="0",
           TERM="xterm", COLUMNS="120")


def cli(store: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(PYLAYERS), "--store", str(store), *args], capture_output=True,
                          text=True, timeout=120, cwd=store.parent, env=ENV)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"f{i}").write_bytes(os.urandom(300_000))
    return src


def test_progress_lines_on_a_pipe(tmp_path: Path, tree: Path) -> None:
    store = tmp_path / "store"
    proc = cli(store, "snapshot", str(tree), "--progress")
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("snapshot: ")]
    assert len(lines) >= 2, proc.stderr
    # the last line: everything done, of the total the pre-scan found
    assert re.fullmatch(r"snapshot: 100% \(2\.3 MiB of 2\.3 MiB\) in [0-9.]+ s", lines[-1]), \
        lines[-1]
    assert all(re.match(r"snapshot: (\d+% \(|[0-9.]+ (B|KiB|MiB))", ln) for ln in lines), lines
    lid = proc.stdout.strip().splitlines()[-1]

    out = cli(store, "checkout", lid, str(tmp_path / "co"), "--progress")
    assert out.returncode == 0, out.stderr
    last = [ln for ln in out.stderr.splitlines() if ln.startswith("checkout: ")][-1]
    assert last.startswith("checkout: 100% (2.3 MiB of 2.3 MiB)"), out.stderr

    for verb in ("gc", "fsck"):
        res = cli(store, verb, "--progress")
        assert res.returncode == 0, res.stderr
        assert re.search(rf"^{verb}: done in [0-9.]+ s$", res.stderr, re.M), res.stderr


def test_no_progress_on_a_pipe_unless_asked(tmp_path: Path, tree: Path) -> None:
    proc = cli(tmp_path / "store", "snapshot", str(tree))
    assert proc.returncode == 0, proc.stderr
    assert "%" not in proc.stderr and "snapshot:" not in proc.stderr
    assert "entries" in proc.stderr  # the summary


def test_quiet_silences_progress_and_summaries(tmp_path: Path, tree: Path) -> None:
    store = tmp_path / "store"
    proc = cli(store, "snapshot", str(tree), "--quiet", "--progress")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert re.fullmatch(r"[0-9a-f]{64}\n", proc.stdout)
    for args in (["fsck", "-q"], ["gc", "-q", "--json"],
                 ["checkout", proc.stdout.strip(), str(tmp_path / "co"), "-q"]):
        res = cli(store, *args)
        assert res.returncode == 0 and res.stderr == "", (args, res.stderr)


def test_a_bar_with_percent_and_eta_on_a_terminal(tmp_path: Path, tree: Path) -> None:
    """stderr a pseudo-terminal: rich draws a bar (erased when done); its frames hold
    the description, a percentage and the byte counts."""
    store = tmp_path / "store"
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([str(PYLAYERS), "--store", str(store), "snapshot", str(tree)],
                                stdout=subprocess.PIPE, stderr=slave, cwd=tmp_path, env=ENV)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            chunks.append(data)
        out, _ = proc.communicate(timeout=120)
    finally:
        os.close(master)
    assert proc.returncode == 0
    screen = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", b"".join(chunks)).decode(errors="replace")
    assert "snapshot" in screen and re.search(r"\d+%", screen), screen
    assert "MiB" in screen, screen  # bytes done and the pre-scanned total
    assert re.fullmatch(r"[0-9a-f]{64}\n", out.decode())


def test_library_reports_through_callbacks_and_prints_nothing(tmp_path: Path, tree: Path,
                                                              capfd) -> None:
    seen: list[int] = []
    stages: list[str] = []
    with pylayers.Store.open(tmp_path / "store") as st:
        layers = pylayers.Layers(st)
        lid = layers.snapshot(tree, progress=seen.append).layer_id
        layers.checkout(lid, tmp_path / "co", progress=seen.append)
    with pylayers.Store.open(tmp_path / "store", exclusive=True) as st:
        pylayers.gc(st, progress=lambda stage, done, total: stages.append(stage))
        pylayers.fsck(st, progress=lambda stage, done, total: stages.append(stage))
    assert sum(seen) == 2 * 8 * 300_000
    assert {"snapshots", "chunks", "caches"} <= set(stages)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


@pytest.mark.parametrize("driver", ["copy", "overlay"])
def test_commit_reports_progress_of_what_it_reads(tmp_path: Path, tree: Path,
                                                  driver: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a snapshot needs root here")
    store = tmp_path / "store"
    base = cli(store, "snapshot", str(tree), "-t", "base")
    assert base.returncode == 0, base.stderr
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    got = cli(store, "mount", "base", str(mnt), "--rw", "--driver", driver)
    if got.returncode != 0 and driver == "overlay" and "overlay" in got.stderr:
        pytest.skip(f"overlayfs is not available here: {got.stderr.strip()}")
    assert got.returncode == 0, got.stderr
    key = got.stdout.split()[-1]
    (mnt / "new").write_bytes(os.urandom(1 << 20))
    assert cli(store, "umount", str(mnt)).returncode == 0
    res = cli(store, "commit", key, "--progress")
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("commit: ")]
    # the overlay driver reads its upper directory (the 1 MiB file); the copy driver
    # its whole tree (the base's 2.3 MiB too): the total is what the commit reads
    total = r"1\.0 MiB" if driver == "overlay" else r"3\.3 MiB"
    assert lines and re.fullmatch(rf"commit: 100% \({total} of {total}\) in [0-9.]+ s",
                                  lines[-1]), res.stderr
    quiet = cli(store, "log", res.stdout.split()[-1])
    assert quiet.returncode == 0 and "commit:" not in quiet.stderr
