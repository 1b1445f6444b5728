"""Crash safety: snapshots and gc killed with SIGKILL at various moments, and a store on
a full disk. After each, the store must open, pass fsck, keep every earlier layer
intact and take the next snapshot; gc then reclaims what the dead process left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from treeutil import assert_checks_out, du, snapshot, start_cli  # noqa: E402
from treeutil import run_cli as _run_cli  # noqa: E402


def run_cli(store: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return _run_cli(store, *args, cwd=cwd, text=True)


def fsck_notes(store: Path) -> list[str]:
    """Runs fsck, which must pass; returns its notes."""
    proc = run_cli(store, "fsck")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert "damaged" not in proc.stdout
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("note:")]


def pack_files(store: Path) -> list[Path]:
    return sorted((store / "packs").glob("*/*.pack"))


def small_tree(root: Path, tag: str) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text(f"{tag}\n")
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_bytes(os.urandom(200_000))
    (root / "bin" / "tool").chmod(0o755)
    (root / "bin" / "link").symlink_to("tool")
    (root / "README").write_text(f"tree {tag}\n" * 500)
    return root


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory) -> Path:
    """~160 MB in 8 files: random blocks (stored raw) alternating with blocks of a
    16-letter alphabet (compress about 2:1). Nothing in it dedups."""
    root = tmp_path_factory.mktemp("big") / "tree"
    root.mkdir()
    squash = bytes(b"abcdefghijklmnop\n"[i % 17] for i in range(256))
    for i in range(8):
        with open(root / f"part{i}.dat", "wb") as f:
            for j in range(20):
                block = os.urandom(1 << 20)
                f.write(block if j % 2 else block.translate(squash))
    (root / "sub").mkdir()
    (root / "sub" / "note.txt").write_text("big tree\n")
    return root


def kill_when(proc: subprocess.Popen, store: Path, moment) -> bool:
    """SIGKILL `proc` at `moment`: seconds after start, or a predicate polled on the packs
    that appeared since the call. Returns whether it was still running when killed."""
    t0 = time.monotonic()
    before = set(pack_files(store))
    if isinstance(moment, float):
        time.sleep(moment)
    else:
        while proc.poll() is None and time.monotonic() - t0 < 30:
            if moment([p for p in pack_files(store) if p not in before]):
                break
            time.sleep(0.002)
    running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    return running


def first_pack_appears(new_packs: list[Path]) -> bool:
    return bool(new_packs)


def pack_holds_mbytes(n: int):
    def pred(new_packs: list[Path]) -> bool:
        total = 0
        for p in new_packs:
            try:
                total += p.stat().st_size
            except FileNotFoundError:
                pass
        return total >= n << 20
    pred.__name__ = f"pack_holds_{n}MB"
    return pred


MOMENTS = [0.05, 0.2, 0.35, 0.5, 1.0, first_pack_appears, pack_holds_mbytes(40),
           pack_holds_mbytes(100)]


@pytest.mark.parametrize("moment", MOMENTS, ids=lambda m: getattr(m, "__name__", f"{m}s"))
def test_snapshot_killed(tmp_path: Path, big_tree: Path, moment) -> None:
    store = tmp_path / "store"
    base_src = small_tree(tmp_path / "base", "base")
    base = snapshot(store, base_src, "--tag", "base")
    packs_before = set(pack_files(store))
    stored_before = du(store)["stored_bytes"]

    proc = start_cli(store, "snapshot", str(big_tree), "--tag", "big")
    running = kill_when(proc, store, moment)
    if not isinstance(moment, float):
        assert running, "the snapshot finished before the moment to kill it"

    # the store opens and passes fsck; the base layer is intact
    notes = fsck_notes(store)
    assert_checks_out(store, "base", base_src, tmp_path / "out_base")
    orphans = set(pack_files(store)) - packs_before
    tags = run_cli(store, "tags").stdout
    if running and "big" not in tags:  # killed before the commit: nothing indexed
        assert all(any(p.stem in n for n in notes) for p in orphans), notes
        assert du(store)["layers"] == 1
    # the next snapshot works (on the killed one's parent, to exercise that path too)
    next_src = small_tree(tmp_path / "next", "next")
    nxt = snapshot(store, next_src, "--parent", "base")
    assert_checks_out(store, nxt, next_src, tmp_path / "out_next")
    stored_mid = du(store)["stored_bytes"]
    orphan_bytes = sum(p.stat().st_size for p in orphans)

    # gc reclaims the dead snapshot's packs; everything still checks out
    proc = run_cli(store, "gc")
    assert proc.returncode == 0, proc.stderr
    assert not [n for n in fsck_notes(store) if "holds no indexed chunk" in n]
    after = du(store)["stored_bytes"]
    leftover = [p for p in orphans if p.exists()]
    if "big" not in tags:
        assert not leftover
        # what gc freed is the dead packs (gc's own index update may add a page or two)
        assert after <= stored_mid - orphan_bytes + (64 << 10)
        assert after < stored_before + (2 << 20)
    assert_checks_out(store, base, base_src, tmp_path / "out_base2")
    assert_checks_out(store, nxt, next_src, tmp_path / "out_next2")
    if "big" in tags:  # it finished before the kill: it must be whole
        assert_checks_out(store, "big", big_tree, tmp_path / "out_big")


def test_killed_snapshots_then_a_full_one(tmp_path: Path, big_tree: Path) -> None:
    """Several snapshots of the same big tree killed in a row, then one that completes:
    the complete layer is whole, and gc leaves only what it needs."""
    store = tmp_path / "store"
    base_src = small_tree(tmp_path / "base", "base")
    snapshot(store, base_src, "--tag", "base")
    killed = 0
    for moment in (first_pack_appears, pack_holds_mbytes(30), pack_holds_mbytes(60)):
        proc = start_cli(store, "snapshot", str(big_tree))
        killed += kill_when(proc, store, moment)
        fsck_notes(store)
    assert killed == 3
    assert len(pack_files(store)) == 4
    big = snapshot(store, big_tree, "--tag", "big")
    with_junk = du(store)["stored_bytes"]
    assert run_cli(store, "gc").returncode == 0
    assert len(pack_files(store)) == 2
    assert du(store)["stored_bytes"] < with_junk - (50 << 20)
    assert not [n for n in fsck_notes(store) if "no indexed chunk" in n]
    assert_checks_out(store, big, big_tree, tmp_path / "out_big")
    assert_checks_out(store, "base", base_src, tmp_path / "out_base")


@pytest.fixture(scope="module")
def gc_trees(tmp_path_factory) -> tuple[Path, Path]:
    """`gone` holds 24 MB of its own and the 16 MB (about 8 stored) that `keep` holds."""
    base = tmp_path_factory.mktemp("gc")
    keep, gone = base / "keep", base / "gone"
    keep.mkdir()
    gone.mkdir()
    squash = bytes(b"0123456789abcdef"[i % 16] for i in range(256))
    live = os.urandom(16 << 20).translate(squash)
    (keep / "live.dat").write_bytes(live)
    (gone / "dead.dat").write_bytes(os.urandom(24 << 20))
    (gone / "live.dat").write_bytes(live)
    return keep, gone


@pytest.mark.parametrize("moment", [0.1, first_pack_appears, pack_holds_mbytes(3),
                                    pack_holds_mbytes(7)],
                         ids=lambda m: getattr(m, "__name__", f"{m}s"))
def test_gc_killed_while_repacking(tmp_path: Path, gc_trees, moment) -> None:
    """gc rewriting a mostly dead pack, killed: index and packs stay consistent."""
    keep, gone = gc_trees
    store = tmp_path / "store"
    gone_id = snapshot(store, gone)
    keep_id = snapshot(store, keep)  # dedups: its data lives in gone's pack
    assert run_cli(store, "rm", gone_id).returncode == 0
    proc = start_cli(store, "gc")
    running = kill_when(proc, store, moment)
    if not isinstance(moment, float):
        assert running, "gc finished before the moment to kill it"
    fsck_notes(store)
    assert_checks_out(store, keep_id, keep, tmp_path / "out1")
    proc = run_cli(store, "gc")
    assert proc.returncode == 0, proc.stderr
    assert not [n for n in fsck_notes(store) if "no indexed chunk" in n]
    assert du(store)["stored_bytes"] < 10 << 20
    assert_checks_out(store, keep_id, keep, tmp_path / "out2")


# -- a full disk ------------------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path: Path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a 20 MiB tmpfs (needs root): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_full_disk(tmp_path: Path, small_tmpfs: Path) -> None:
    store = small_tmpfs / "store"
    base_src = small_tree(tmp_path / "base", "base")
    base = snapshot(store, base_src, "--tag", "base")
    free_before = free_bytes(small_tmpfs)

    big = tmp_path / "big"
    big.mkdir()
    for i in range(3):
        (big / f"r{i}.bin").write_bytes(os.urandom(10 << 20))  # 30 MB that cannot shrink
    proc = run_cli(store, "snapshot", str(big), "--tag", "big")
    assert proc.returncode == 7, proc.stderr  # StoreError: the store cannot be written
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "no space left on device" in lines[0].lower()
    assert "cannot read" not in lines[0], "blames the source file, not the store"

    # the store is as it was: nothing of the failed snapshot is left taking space
    assert free_bytes(small_tmpfs) >= free_before - (256 << 10)
    assert fsck_notes(store) == []
    assert "big" not in run_cli(store, "tags").stdout
    assert_checks_out(store, base, base_src, tmp_path / "out_base")
    # and the store still takes a snapshot that fits
    nxt_src = small_tree(tmp_path / "next", "next")
    nxt = snapshot(store, nxt_src, "--parent", "base")
    assert_checks_out(store, nxt, nxt_src, tmp_path / "out_next")
    assert fsck_notes(store) == []


@pytest.mark.parametrize("room_kb", [580, 250])
def test_full_disk_small_room(tmp_path: Path, small_tmpfs: Path, room_kb: int) -> None:
    """Little room left for 3000 new chunks: at 580 KiB the pack fits but the index
    pages do not (LMDB fails); at 250 KiB the pack does not fit. Either way: one clean
    line, the store as it was, and with room again the same snapshot works."""
    store = small_tmpfs / "store"
    base_src = small_tree(tmp_path / "base", "base")
    base = snapshot(store, base_src, "--tag", "base")
    many = tmp_path / "many"
    many.mkdir()
    for i in range(3000):
        # each too big for its manifest entry (INLINE_MAX): 3000 chunks, which
        # compress to little (zeros) but each take an index entry
        (many / f"f{i:05d}").write_bytes(bytes(1024) + os.urandom(64) + b"%d" % i)
    filler = small_tmpfs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.posix_fallocate(fd, 0, free_bytes(small_tmpfs) - (room_kb << 10))
    finally:
        os.close(fd)
    packs_before = pack_files(store)
    proc = run_cli(store, "snapshot", str(many))
    assert proc.returncode == 7, proc.stderr  # StoreError: the store cannot be written
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no space left on device" in proc.stderr.lower(), proc.stderr
    assert ("index" in proc.stderr) == (room_kb == 580), proc.stderr  # which write failed
    # no pack data left behind (the LMDB file may have grown: it reuses those pages)
    assert pack_files(store) == packs_before
    filler.unlink()
    assert fsck_notes(store) == []
    assert_checks_out(store, base, base_src, tmp_path / "out_base")
    lid = snapshot(store, many)
    assert_checks_out(store, lid, many, tmp_path / "out_many")


def test_reader_slots_of_a_killed_snapshot_are_freed(tmp_path: Path, big_tree: Path) -> None:
    """A snapshot killed while another process keeps the index open leaves its LMDB
    reader slots behind (LMDB resets the table only when nobody has it open). The next
    command must clear them, or the index could never reuse freed pages again."""
    store = tmp_path / "store"
    snapshot(store, small_tree(tmp_path / "base", "base"))
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, pylayers\n"
         f"s = pylayers.Store.open({str(store)!r}, create=False)\n"
         "print('ready', flush=True)\n"
         "sys.stdin.readline()\n"
         "print(s._index.env.readers(), flush=True)\n"
         "sys.stdin.readline()\n"
         "print(s._index.env.readers(), flush=True)\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert holder.stdout.readline().strip() == "ready"
        proc = start_cli(store, "snapshot", str(big_tree))
        assert kill_when(proc, store, first_pack_appears)

        def reader_pids() -> set[int]:
            holder.stdin.write("\n")
            holder.stdin.flush()
            lines = []
            while (line := holder.stdout.readline()).strip():
                lines.append(line)
            return {int(ln.split()[0]) for ln in lines[1:] if ln.split()}

        assert proc.pid in reader_pids(), "the killed snapshot held no read transaction?"
        fsck_notes(store)  # any command that opens the index
        assert proc.pid not in reader_pids()
    finally:
        holder.kill()
        holder.communicate()
