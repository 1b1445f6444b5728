"""`pylayers checkout --link`: regular files hardlinked from the store's checkout cache
(STORE/cache/checkout), keyed on content *and* metadata and path, so only a file
identical in all of them shares an inode; a file written once is linked by later
checkouts without being written again; gc deletes cached files no checkout links to
any more; a destination on another file system is refused with one line. The whole
tree round trip is in test_layers_roundtrip.py (test_linked_checkout_...). Real stores,
real trees, the real CLI."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from treeutil import run_cli  # noqa: E402

T = 1_600_000_000_000_000_000


def cache_files(store: Path) -> list[Path]:
    root = store / "cache" / "checkout"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def ok(proc) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.decode() if isinstance(proc.stdout, bytes) else proc.stdout


def make(root: Path, files: dict[str, tuple[bytes, int]]) -> Path:
    """Files {name: (content, mode)}, all with one mtime."""
    root.mkdir(parents=True)
    for name, (data, mode) in files.items():
        (root / name).write_bytes(data)
        os.chmod(root / name, mode)
        os.utime(root / name, ns=(T, T))
    return root


def test_identical_content_with_other_metadata_never_shares_an_inode(tmp_path: Path) -> None:
    """Two layers with the same bytes at the same path, one executable: their linked
    checkouts must not share the inode (its mode would be one of them for both)."""
    store = tmp_path / "store"
    a = make(tmp_path / "a", {"tool": (b"#!/bin/sh\necho same\n", 0o644)})
    b = make(tmp_path / "b", {"tool": (b"#!/bin/sh\necho same\n", 0o755)})
    ok(run_cli(store, "snapshot", "-t", "a", a))
    ok(run_cli(store, "snapshot", "-t", "b", b))
    ok(run_cli(store, "checkout", "--link", "a", tmp_path / "ca"))
    ok(run_cli(store, "checkout", "--link", "b", tmp_path / "cb"))
    sa, sb = os.stat(tmp_path / "ca/tool"), os.stat(tmp_path / "cb/tool")
    assert sa.st_ino != sb.st_ino
    assert (sa.st_mode & 0o777, sb.st_mode & 0o777) == (0o644, 0o755)
    assert len(cache_files(store)) == 2
    # and the same again shares: a third checkout of `a` is the first one's inode
    ok(run_cli(store, "checkout", "--link", "a", tmp_path / "ca2"))
    assert os.stat(tmp_path / "ca2/tool").st_ino == sa.st_ino
    assert len(cache_files(store)) == 2


def test_files_of_one_checkout_never_share_an_inode(tmp_path: Path) -> None:
    """Equal files at two paths of one tree stay two inodes in a linked checkout (the
    key holds the path): a snapshot of the checkout must not find hardlinks."""
    store = tmp_path / "store"
    src = make(tmp_path / "src", {"x": (b"same bytes\n", 0o644), "y": (b"same bytes\n", 0o644)})
    ok(run_cli(store, "snapshot", "-t", "v", src))
    dest = tmp_path / "co"
    ok(run_cli(store, "checkout", "--link", "v", dest))
    assert os.stat(dest / "x").st_ino != os.stat(dest / "y").st_ino
    out = ok(run_cli(store, "snapshot", "-p", "v", dest))
    again = out.split()[-1]
    assert ok(run_cli(store, "diff", "v", again)).strip() == ""  # the same tree


def test_gc_deletes_cached_files_only_when_no_checkout_links_them(tmp_path: Path) -> None:
    store = tmp_path / "store"
    src = make(tmp_path / "src", {f"f{i}": (os.urandom(100 + i), 0o644) for i in range(5)})
    ok(run_cli(store, "snapshot", "-t", "v", src))
    dest = tmp_path / "co"
    ok(run_cli(store, "checkout", "--link", "v", dest))
    assert len(cache_files(store)) == 5
    ok(run_cli(store, "gc"))
    assert len(cache_files(store)) == 5  # linked from the checkout: kept
    for i in range(5):
        assert (dest / f"f{i}").read_bytes() == (src / f"f{i}").read_bytes()
    shutil.rmtree(dest)
    ok(run_cli(store, "gc"))
    assert cache_files(store) == []
    # and a later linked checkout writes them again
    ok(run_cli(store, "checkout", "--link", "v", tmp_path / "co2"))
    assert (tmp_path / "co2/f3").read_bytes() == (src / "f3").read_bytes()


def test_a_destination_on_another_file_system_is_one_line(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a file system other than the test's tmp_path")
    store = tmp_path / "store"
    src = make(tmp_path / "src", {"f": (b"data", 0o644)})
    ok(run_cli(store, "snapshot", "-t", "v", src))
    dest = shm / f"pylayers-test-link-{os.getpid()}"
    try:
        proc = run_cli(store, "checkout", "--link", "v", dest)
        err = proc.stderr.decode() if isinstance(proc.stderr, bytes) else proc.stderr
        assert proc.returncode == 6, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "hardlinks cannot cross file systems" in lines[0], err
        assert not dest.exists() or not any(dest.iterdir())  # nothing written
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    # without --link it works there
    ok(run_cli(store, "checkout", "v", dest))
    try:
        assert (dest / "f").read_bytes() == b"data"
    finally:
        shutil.rmtree(dest, ignore_errors=True)
