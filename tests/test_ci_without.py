""".ci/without.py, which CI's second pass and developers use to run the suite as on a
machine without some tools and without user namespaces: it must really hide the tools
and really refuse user namespaces, and change nothing else (other tools, exit codes,
ordinary child processes and threads)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WITHOUT = Path(__file__).resolve().parents[1] / ".ci" / "without.py"


def without(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WITHOUT), *args], capture_output=True,
                          text=True, timeout=60)


def test_hides_the_named_tools_only() -> None:
    if shutil.which("sh") is None or shutil.which("ls") is None:
        pytest.skip("no sh or ls on PATH")
    res = without("--tools", "ls", "--", "sh", "-c", "command -v ls; command -v sh; exit 3")
    assert res.returncode == 3, res.stderr
    found = res.stdout.splitlines()
    assert len(found) == 1 and os.path.basename(found[0]) == "sh", res.stdout
    # the symlink farm is gone afterwards
    farm = os.path.dirname(os.path.dirname(found[0]))
    assert not os.path.exists(farm)


def test_refuses_user_namespaces_and_nothing_else() -> None:
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed (Debian: util-linux)")
    if subprocess.run(["unshare", "-Ur", "true"], capture_output=True).returncode:
        pytest.skip("user namespaces are refused here already")
    res = without("--tools", "", "--no-userns", "--", "unshare", "-Ur", "true")
    assert res.returncode != 0 and "Operation not permitted" in res.stderr, res
    code = ("import ctypes, os, subprocess, threading\n"
            "t = threading.Thread(target=print, args=('thread',)); t.start(); t.join()\n"
            "print(subprocess.run(['echo', 'child'], capture_output=True, text=True).stdout,"
            " end='')\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "print(libc.unshare(0x10000000), os.strerror(ctypes.get_errno()))\n")
    res = without("--tools", "", "--no-userns", "--", sys.executable, "-c", code)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "thread\nchild\n-1 Operation not permitted\n", res
