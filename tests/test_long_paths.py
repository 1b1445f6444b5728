"""Paths longer than PATH_MAX (issue 8, item 9, last bullet): a snapshot of a tree
deeper than 4096 bytes is refused with one short line that names the limit, not a 4 KB
line holding the path; a checkout whose destination pushes a tree past it works.

Real trees (built with mkdir relative to directory fds, the only way past PATH_MAX),
the real CLI in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pylayers.errors import PATH_MAX, os_error_reason, short_path


def run_cli(store: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pylayers", "--store", str(store), *args],
                          capture_output=True, text=True, cwd=store.parent, timeout=120)


def one_short_line(proc: subprocess.CompletedProcess, code: int = 6) -> str:
    """One line under 300 characters; exit status `code` (6: InvalidArgument, the
    source path; 1: an I/O error writing a checkout)."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[:500])
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pylayers: "), proc.stderr[:500]
    assert len(lines[0]) < 300, len(lines[0])
    return lines[0]


def deep_tree(top: Path, depth: int, name: str = "d" * 250) -> int:
    """`depth` nested directories named `name` under `top`, a file at the bottom;
    returns the bottom file's path length relative to `top`."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        out = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, b"bottom\n")
        os.close(out)
    finally:
        os.close(fd)
    return depth * (len(name) + 1) + 1


def test_snapshot_past_path_max_is_one_short_line(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    assert deep_tree(src, 20) > PATH_MAX
    line = one_short_line(run_cli(tmp_path / "store", "snapshot", str(src)))
    assert "PATH_MAX" in line and str(PATH_MAX) in line, line
    assert " ... " in line and str(src) in line, line  # the head of the path is kept


def test_checkout_pushed_past_path_max_works(tmp_path: Path) -> None:
    """A checkout makes each entry relative to its parent directory's descriptor, so a
    destination that pushes the tree past PATH_MAX is no limit (it once was)."""
    src = tmp_path / "src"
    src.mkdir()
    rel = deep_tree(src, 15)
    assert len(os.fsencode(src)) + 1 + rel < PATH_MAX  # the tree itself fits
    proc = run_cli(tmp_path / "store", "snapshot", str(src))
    assert proc.returncode == 0, proc.stderr[:500]
    lid = proc.stdout.split()[-1]
    dest = tmp_path / ("x" * 250) / ("y" * 250) / "dest"  # and this pushes it past
    assert len(os.fsencode(dest)) + 1 + rel > PATH_MAX
    proc = run_cli(tmp_path / "store", "checkout", lid, str(dest))
    assert proc.returncode == 0, proc.stderr[:500]
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(15):
            sub = os.open("d" * 250, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        f = os.open("f", os.O_RDONLY, dir_fd=fd)
        assert os.read(f, 100) == b"bottom\n"
        assert os.fstat(f).st_mode & 0o777 == 0o644
        os.close(f)
    finally:
        os.close(fd)


def test_the_reason_names_the_limit_it_passed() -> None:
    long = b"a/" * 2100
    err = OSError(36, "File name too long")  # ENAMETOOLONG
    assert "PATH_MAX is 4096" in os_error_reason(err, long)
    assert "NAME_MAX, 255 bytes" in os_error_reason(err, b"x" * 300)
    assert os_error_reason(OSError(2, "No such file or directory"), long) == \
        "No such file or directory"
    assert len(short_path(long)) <= 200
