"""The checkout's reader process (store/readproc.py): chunks in order through a ring of
shared memory, errors where they stand, the child ended and reaped whatever happens to
either process; and the CLI's checkout through it, with a damaged pack, a full disk
and a killed reader, each one line. Real stores, real processes, real tmpfs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import blake3
import pytest

from pylayers.errors import CorruptData, StoreError
from pylayers.layers.repo import READ_PROCESS_MIN
from pylayers.store.readproc import read_in_process
from pylayers.store.repository import Store


def cid(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def children() -> set[int]:
    """This process's child processes (still there: running or not yet reaped)."""
    out: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            out |= {int(p) for p in f.read().split()}
    return out


def wait_until(cond, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@pytest.fixture
def store_with(tmp_path: Path):
    """A store holding `datas`; yields (store, datas, ids)."""
    rnd = [os.urandom(30_000 + 997 * i) for i in range(30)]  # raw frames
    text = [(b"line %d of a text file\n" % i) * (1000 + 37 * i) for i in range(30)]  # zstd
    big = [os.urandom(300_000)]  # more than half the small ring: through the pipe
    datas = [x for pair in zip(rnd, text, strict=True) for x in pair] + big
    store = Store.open(tmp_path / "s")
    with store.writer() as w:
        for d in datas:
            w.put(cid(d), d)
        w.commit()
    try:
        yield store, datas, [cid(d) for d in datas]
    finally:
        store.close()


def test_in_order_with_repeats_wraps_and_a_chunk_through_the_pipe(store_with) -> None:
    store, datas, ids = store_with
    before = children()
    # backwards, then forwards with repeats, through a ring of 256 KiB: it wraps many
    # times, the parent's credit lets the child go on, the 300 kB chunk takes the pipe
    order = list(range(len(datas)))[::-1] + [i for i in range(len(datas)) for _ in (0, 1)]
    got = [bytes(v) for v in read_in_process(store, [(ids[i], len(datas[i])) for i in order],
                                             ring_bytes=256 << 10)]
    assert got == [datas[i] for i in order]
    assert wait_until(lambda: children() <= before)  # reaped


def test_missing_chunk_is_an_error_where_it_stands(store_with) -> None:
    store, datas, ids = store_with
    missing = cid(b"never stored")
    seq = [(ids[0], len(datas[0])), (ids[1], len(datas[1])), (missing, 10), (ids[2], 5)]
    got = []
    with pytest.raises(CorruptData, match="missing"):
        for v in read_in_process(store, seq):
            got.append(bytes(v))
    assert got == datas[:2]
    assert wait_until(lambda: not children())


def test_wrong_length_in_the_entry_is_refused(store_with) -> None:
    store, datas, ids = store_with
    with pytest.raises(CorruptData, match="entry says"):
        list(read_in_process(store, [(ids[0], len(datas[0]) + 1)]))


def test_damaged_pack_is_an_error_at_the_damaged_chunk(tmp_path: Path) -> None:
    good = [os.urandom(40_000) for _ in range(3)]
    with Store.open(tmp_path / "s") as store:
        with store.writer() as w:
            for d in good:
                w.put(cid(d), d)
            w.commit()
        loc = store.location(cid(good[2]))
        pack = store.pack_files()[0]
        with open(pack, "r+b") as f:  # a byte of the third chunk's data (raw frame)
            at = loc.offset + loc.frame_len - loc.length // 2
            f.seek(at)
            b = f.read(1)
            f.seek(at)
            f.write(bytes([b[0] ^ 0xFF]))
        got = []
        with pytest.raises(CorruptData, match="damaged|checksum"):
            for v in read_in_process(store, [(cid(d), len(d)) for d in good]):
                got.append(bytes(v))
        assert got == good[:2]


def test_closed_early_the_child_is_ended_and_reaped(store_with) -> None:
    store, datas, ids = store_with
    it = read_in_process(store, [(ids[i % 10], len(datas[i % 10])) for i in range(5000)],
                         ring_bytes=256 << 10)
    assert bytes(next(it)) == datas[0]
    assert len(children()) == 1
    it.close()
    assert not children()  # killed and reaped before close() returned


def test_a_killed_reader_is_one_clear_error(store_with) -> None:
    store, datas, ids = store_with
    it = read_in_process(store, [(ids[i % 10], len(datas[i % 10])) for i in range(5000)],
                         ring_bytes=256 << 10)
    next(it)
    (child,) = children()
    os.kill(child, signal.SIGKILL)
    with pytest.raises(StoreError, match="reader process was killed by signal 9"):
        for _ in it:
            pass
    assert not children()


def test_the_reader_dies_with_its_parent(store_with, tmp_path: Path) -> None:
    """A parent killed mid-way (SIGKILL: no cleanup) leaves no reader behind."""
    store, _datas, _ids = store_with
    script = f"""
import os, signal, sys
from pylayers.store.readproc import read_in_process
from pylayers.store.repository import Store
import blake3
store = Store.open({str(store.path)!r})
ids = [cid for cid, _loc in store.iter_chunk_locations()]
with store.read() as t:
    lens = [t.chunks.get(c).length for c in ids]
it = read_in_process(store, [(ids[i % len(ids)], lens[i % len(ids)]) for i in range(10000)],
                     ring_bytes=256 << 10)
next(it)
with open(f"/proc/self/task/{{os.getpid()}}/children") as f:
    print(f.read().split()[0], flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    child = int(proc.stdout.split()[0])

    def gone() -> bool:
        try:
            with open(f"/proc/{child}/stat") as f:
                return f.read().split(") ")[1][0] in "ZX"  # a zombie of init's: ended
        except FileNotFoundError:
            return True
    assert wait_until(gone)


# -- through the CLI ----------------------------------------------------------------------

def run_cli(store: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pylayers", "--store", str(store), *args],
                          capture_output=True, text=True, timeout=300, cwd=store.parent)


def one_line(proc: subprocess.CompletedProcess, code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def big_tree(root: Path) -> Path:
    """More file data than READ_PROCESS_MIN, so the CLI reads it in a child process:
    files of one chunk and of many, text and random, a few metadata kinds."""
    (root / "d" / "e").mkdir(parents=True)
    total = 0
    i = 0
    while total < READ_PROCESS_MIN + (2 << 20):
        n = [3_000, 70_000, 1_500_000][i % 3]
        data = os.urandom(n) if i % 2 else (b"%d some text\n" % i) * (n // 13)
        p = root / ("d/e" if i % 5 == 0 else "d") / f"f{i:03d}"
        p.write_bytes(data)
        os.chmod(p, 0o640 if i % 4 else 0o755)
        total += len(data)
        i += 1
    (root / "d" / "link").symlink_to("f000")
    os.utime(root / "d" / "f001", ns=(1, 1_000_000_007))
    return root


def listing(root: Path) -> list[tuple]:
    out = []
    for dirpath, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            p = Path(dirpath) / name
            st = p.lstat()
            data = p.read_bytes() if p.is_file() and not p.is_symlink() else b""
            out.append((str(p.relative_to(root)), st.st_mode, st.st_mtime_ns, cid(data)))
    return sorted(out)


def test_cli_checkout_through_the_reader_process(tmp_path: Path) -> None:
    src = big_tree(tmp_path / "src")
    store = tmp_path / "store"
    proc = run_cli(store, "snapshot", str(src), "--tag", "t")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli(store, "checkout", "t", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert listing(tmp_path / "out") == listing(src)


def test_cli_checkout_of_a_damaged_pack_stops_with_one_line(tmp_path: Path) -> None:
    src = big_tree(tmp_path / "src")
    store = tmp_path / "store"
    assert run_cli(store, "snapshot", str(src), "--tag", "t").returncode == 0
    with Store.open(store) as st:
        pack = st.pack_files()[0]
    size = pack.stat().st_size
    with open(pack, "r+b") as f:  # a byte in the middle of the pack: some frame's data
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    out = tmp_path / "out"
    line = one_line(run_cli(store, "checkout", "t", str(out)), 8)  # CorruptData
    assert "pylayers:" in line
    # what was written is whole and right; nothing half-written is left
    want = {p: cid(p.read_bytes()) for p in src.rglob("f*")}
    written = [p for p in out.rglob("f*") if p.is_file()]
    assert written  # it did get going before the damaged chunk
    for p in written:
        assert cid(p.read_bytes()) == want[src / p.relative_to(out)], p


def test_cli_checkout_onto_a_full_disk_stops_with_one_line(tmp_path: Path) -> None:
    src = big_tree(tmp_path / "src")
    store = tmp_path / "store"
    assert run_cli(store, "snapshot", str(src), "--tag", "t").returncode == 0
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {proc.stderr.strip()}")
    try:
        line = one_line(run_cli(store, "checkout", "t", str(mnt / "out")), 1)
        assert "no space left on device" in line.lower(), line
        # no file was left half-written: each one there is whole
        want = {p: cid(p.read_bytes()) for p in src.rglob("f*")}
        for p in (mnt / "out").rglob("f*"):
            if p.is_file():
                assert cid(p.read_bytes()) == want[src / p.relative_to(mnt / "out")], p
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
