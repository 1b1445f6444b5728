"""A user who can read a store but not write it (a root-owned store, read as uid 65534):
read-only commands work and write nothing, not even a lock file; commands that would
write fail with one line; and such a reader is safe beside root writing (the byte-0
locks of docs/format.md, "Locking")."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
CLI = [sys.executable, "-m", "pylayers"]


def run(store: Path, *args: str, nobody: bool = True) -> subprocess.CompletedProcess:
    prefix = AS_NOBODY if nobody else []
    return subprocess.run([*prefix, *CLI, "--store", str(store), *args], capture_output=True,
                          timeout=120, cwd=store.parent)


def ok(proc: subprocess.CompletedProcess) -> bytes:
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert proc.stderr.count(b"\n") <= 2  # fsck's summary line, no warnings
    return proc.stdout


def fingerprint_of_files(store: Path) -> dict[str, tuple]:
    """Every file under the store with its size, mtime and content hash."""
    out = {}
    for p in sorted(store.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(store))] = (st.st_size, st.st_mtime_ns,
                                          hash(p.read_bytes()) if p.is_file() else None)
    return out


@pytest.fixture
def world():
    """A root-owned directory every user can reach (pytest's tmp_path is 0700)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to run the CLI as uid 65534")
    d = Path(tempfile.mkdtemp(prefix="pylayers-ro-"))
    os.chmod(d, 0o755)
    probe = subprocess.run([*AS_NOBODY, sys.executable, "-c", "import pylayers"],
                           capture_output=True, cwd=d)
    if probe.returncode != 0:
        shutil.rmtree(d)
        pytest.skip("uid 65534 cannot run this Python or import pylayers: "
                    + probe.stderr.decode(errors="replace").strip()[-200:])
    yield d
    shutil.rmtree(d, ignore_errors=True)


def make_tree(root: Path, n: int, salt: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"f{i}").write_bytes(f"{salt} {i}\n".encode() * (i + 1))
    return root


@pytest.fixture
def root_store(world: Path) -> tuple[Path, Path]:
    store = world / "store"
    src = make_tree(world / "src", 5, "base")
    ok(run(store, "snapshot", str(src), "--tag", "base", nobody=False))
    (src / "f0").write_bytes(b"changed\n")
    ok(run(store, "snapshot", str(src), "--parent", "base", "--tag", "next", nobody=False))
    return store, src


def test_read_commands_work_and_write_nothing(root_store) -> None:
    store, src = root_store
    before = fingerprint_of_files(store)
    assert b"base\t" in ok(run(store, "tags")) and b"next\t" in ok(run(store, "tags"))
    assert len(ok(run(store, "log", "next")).splitlines()) == 2
    assert ok(run(store, "cat", "next", "/f0")) == b"changed\n"
    assert ok(run(store, "cat", "base", "/f0")) == b"base 0\n"
    assert b"/f4" in ok(run(store, "ls", "next"))
    assert b"layer" in ok(run(store, "show", "base"))
    assert b"f0" in ok(run(store, "diff", "base", "next"))
    assert b"layers" in ok(run(store, "du"))
    fsck = run(store, "fsck")
    assert fsck.returncode == 0 and b"ok" in fsck.stderr, fsck.stderr
    assert fingerprint_of_files(store) == before  # not even index/lock.mdb changed


def test_commands_that_write_fail_with_one_line(root_store, world: Path) -> None:
    store, src = root_store
    before = fingerprint_of_files(store)
    for args in (["snapshot", str(src)], ["tag", "mine", "base"], ["rm", "next"],
                 ["gc"]):
        proc = run(store, *args)
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1, (args, lines)
        assert "permission denied" in lines[0].lower(), (args, lines)
        assert "Traceback" not in lines[0]
    assert fingerprint_of_files(store) == before


HOLD_READ = """
import sys
from pylayers import Layers, Store
s = Store.open(sys.argv[1], create=False)
assert s.readonly
with s.read() as t:
    print(sorted(t.tags.items())[0][0], flush=True)
    sys.stdin.readline()
    print(len(list(t.layers.ids())), flush=True)
s.close()
"""


def test_a_reader_holds_off_commits_only_while_it_reads(root_store, world: Path) -> None:
    """While uid 65534 is inside a read transaction, root's next commit waits (no page
    it may read is reused); as soon as the reader's transaction ends, it goes on."""
    store, src = root_store
    reader = subprocess.Popen([*AS_NOBODY, sys.executable, "-c", HOLD_READ, str(store)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=world)
    writer = None
    try:
        assert reader.stdout.readline() == "base\n", reader.stderr.read()
        writer = subprocess.Popen([*CLI, "--store", str(store), "snapshot",
                                   str(make_tree(world / "w", 3, "writer"))],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, cwd=world)
        time.sleep(2)  # ample for a 3-file snapshot, were it not held off
        assert writer.poll() is None, writer.communicate()
        out, err = reader.communicate("\n", timeout=60)
        assert reader.returncode == 0 and out == "2\n", err  # its snapshot: 2 layers
        wout, werr = writer.communicate(timeout=60)
        assert writer.returncode == 0, werr
    finally:
        for p in (reader, writer):
            if p is not None and p.poll() is None:
                p.kill()
    assert len(ok(run(store, "log", wout.split()[-1]))) > 0


def test_readers_beside_a_writer(root_store, world: Path) -> None:
    """Root snapshots over and over while uid 65534 runs read commands: every read
    succeeds and shows whole layers; the store checks clean after."""
    store, src = root_store
    script = (f"for i in $(seq 6); do echo $i > {src}/f1; "
              f"{sys.executable} -m pylayers --store {store} snapshot {src} -t loop "
              f">/dev/null 2>&1 || exit 1; done")
    writer = subprocess.Popen(["sh", "-c", script], cwd=world)
    try:
        seen = 0
        while writer.poll() is None or seen < 3:
            assert ok(run(store, "cat", "base", "/f0")) == b"base 0\n"
            assert b"base\t" in ok(run(store, "tags"))
            fsck = run(store, "fsck")
            assert fsck.returncode == 0, fsck.stdout + fsck.stderr
            seen += 1
        assert writer.wait(timeout=120) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
    ok(run(store, "fsck", nobody=False))
    ok(run(store, "fsck"))


def test_a_reader_opened_before_the_index_grew_past_its_first_map(root_store,
                                                                  world: Path) -> None:
    """The read-only open maps as much as writers do: a reader opened while the index
    was small still reads after a writer grew it by tens of MB (LMDB would otherwise
    refuse its next transaction with MDB_MAP_RESIZED)."""
    store, _src = root_store
    reader = subprocess.Popen([*AS_NOBODY, sys.executable, "-c", """
import sys
from pylayers import Store
s = Store.open(sys.argv[1], create=False)
assert s.readonly
print("open", flush=True)
sys.stdin.readline()
with s.read() as t:
    print(t.walkcache.count(), flush=True)
""", str(store)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd=world)
    try:
        assert reader.stdout.readline() == "open\n", reader.stderr.read()
        grow = subprocess.run([sys.executable, "-c", """
import os, sys
from pylayers import Store
with Store.open(sys.argv[1], create=False) as s, s.write() as t:
    for i in range(3000):
        t.walkcache.put(i.to_bytes(32, "little"), os.urandom(10000))
""", str(store)], capture_output=True, text=True, cwd=world, timeout=120)
        assert grow.returncode == 0, grow.stderr
        assert (store / "index" / "data.mdb").stat().st_size > 20 << 20
        out, err = reader.communicate("\n", timeout=60)
        assert reader.returncode == 0 and int(out) >= 3000, err
    finally:
        if reader.poll() is None:
            reader.kill()
