"""Files that change, grow or vanish while a snapshot reads them (issue 8, item 9).

A file is read exactly to the size lstat saw, read again when it changed, and if it keeps
changing the snapshot fails (or, with allow_changing / --allow-changing, stores the last
read and says so with exit status 1, as tar's "file changed as we read it"). A directory
deleted under the walk is one warning, not one per entry it held.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pylayers import Layers, Store
from pylayers.errors import SourceChanged
from pylayers.store.ingest import BLOCK


def _grow_on_read(path: Path, step: bytes = b"x" * 1000):
    """A progress callback that appends to `path` each time the reader reports bytes:
    the file grows while it is read, every time it is read."""
    def progress(n: int) -> None:
        with open(path, "ab") as f:
            f.write(step)
    return progress


def test_a_file_that_keeps_growing_fails_the_snapshot(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    log = tree / "app.log"
    log.write_bytes(os.urandom(2 * BLOCK + 12345))
    with Store.open(tmp_path / "store") as store:
        layers = Layers(store)
        with pytest.raises(SourceChanged) as err:
            layers.snapshot(tree, tag="t", progress=_grow_on_read(log))
        assert "changed as we read it (3 reads)" in str(err.value)
        assert "\n" not in str(err.value)
        assert layers.tags() == {}  # nothing committed, no tag


def test_allow_changing_stores_the_size_lstat_saw_never_more(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    log = tree / "app.log"
    start = os.urandom(BLOCK + 777)  # large enough to be read in blocks
    log.write_bytes(start)
    (tree / "quiet").write_bytes(b"still")
    with Store.open(tmp_path / "store") as store:
        layers = Layers(store)
        res = layers.snapshot(tree, tag="t", progress=_grow_on_read(log),
                              allow_changing=True)
        assert res.stats.changed == [os.fsencode(log)]
        assert any("changed as we read it" in w and "stored the last read" in w
                   for w in res.stats.warnings)
        out = tmp_path / "out"
        layers.checkout(res.layer_id, out)
    final = log.read_bytes()
    stored = (out / "app.log").read_bytes()
    # the last read, exactly as big as the lstat before it: a prefix of the file as it
    # is now, not read past that size while it grew
    assert len(start) < len(stored) < len(final)
    assert final.startswith(stored)
    entry = {e.path: e for e in Layers(Store.open(tmp_path / "store")).tree(res.layer_id)}
    assert entry[b"app.log"].size == len(stored)
    assert (out / "quiet").read_bytes() == b"still"


def test_a_file_that_changed_once_is_read_again_and_stored_whole(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    f = tree / "data"
    f.write_bytes(os.urandom(3 * BLOCK))
    calls = []

    def change_once(n: int) -> None:
        calls.append(n)
        if len(calls) == 1:
            with open(f, "ab") as fh:
                fh.write(b"appended once")

    with Store.open(tmp_path / "store") as store:
        layers = Layers(store)
        res = layers.snapshot(tree, progress=change_once)
        assert res.stats.changed == [] and res.stats.warnings == []
        layers.checkout(res.layer_id, tmp_path / "out")
    assert (tmp_path / "out" / "data").read_bytes() == f.read_bytes()


def test_a_deleted_directory_is_one_warning_not_one_per_entry(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    sub = tree / "sub"
    sub.mkdir(parents=True)
    (sub / "a-big").write_bytes(os.urandom(BLOCK + 1))  # sorts first; read in blocks
    for i in range(200):
        d = sub / f"d{i:03}"
        d.mkdir()
        for j in range(10):
            (d / f"f{j}").write_bytes(b"%d" % j)
    deleted = []

    def delete_sub(n: int) -> None:  # an `rm -r` while the walk is inside sub/
        if not deleted:
            shutil.rmtree(sub)
            deleted.append(True)

    with Store.open(tmp_path / "store") as store:
        res = Layers(store).snapshot(tree, progress=delete_sub)
    vanished = [w for w in res.stats.warnings if "vanished" in w]
    assert vanished == [f"{sub}: vanished during scan"], res.stats.warnings


@pytest.mark.skipif(shutil.which("pylayers") is None,
                    reason="the pylayers command is not installed")
def test_cli_growing_file_fails_then_allow_changing_exits_1(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    log = tree / "app.log"
    with open(log, "wb") as f:  # big enough that each read takes a while
        for _ in range(32):
            f.write(os.urandom(4 << 20))
    writer = subprocess.Popen([sys.executable, "-c", (
        "import os,sys\n"
        "fd=os.open(sys.argv[1], os.O_WRONLY|os.O_APPEND)\n"
        "while True: os.write(fd, b'log line\\n')\n"), str(log)])
    try:
        size = log.stat().st_size
        while log.stat().st_size == size:  # the writer is running
            time.sleep(0.01)
        env = dict(os.environ, PYLAYERS_STORE=str(tmp_path / "store"))
        r = subprocess.run(["pylayers", "snapshot", str(tree), "-t", "t"], env=env,
                           capture_output=True, text=True)
        assert r.returncode == 5, r  # FailedPrecondition: the file kept changing
        assert r.stderr.count("\n") == 1 and "changed as we read it" in r.stderr
        assert "--allow-changing" in r.stderr and "Traceback" not in r.stderr
        r = subprocess.run(["pylayers", "tags"], env=env, capture_output=True, text=True)
        assert "t" not in r.stdout.split()
        r = subprocess.run(["pylayers", "snapshot", str(tree), "-t", "t", "--allow-changing"],
                           env=env, capture_output=True, text=True)
        assert r.returncode == 1, r
        assert "stored the last read" in r.stderr
        layer = r.stdout.split()[-1]
        assert len(layer) == 64
    finally:
        writer.kill()
        writer.wait()
