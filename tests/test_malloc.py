"""store/malloc.py: freed buffers of a few MiB are kept for the next, not faulted in
again page by page (what a writer's frames, deltas and bases cost without it)."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

_FAULTS = """
import resource, sys
if sys.argv[1] == "keep":
    from pylayers.store.malloc import keep_freed_memory
    keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def frames():  # a few frame-sized buffers held together, then dropped
    bufs = [bytearray(4 << 20) for _ in range(6)]  # zeroed: every page written
    del bufs
frames()  # the first round is faulted in either way
before = faults()
for _ in range(10):
    frames()
print(faults() - before)
"""


def _faults(mode: str, cwd: Path) -> int:
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True,
                         text=True, check=True, cwd=cwd)
    return int(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                    reason="mallopt's thresholds are glibc's; another C library keeps its own")
def test_freed_buffers_are_reused_not_faulted_in_again(tmp_path: Path) -> None:
    default, kept = _faults("default", tmp_path), _faults("keep", tmp_path)
    pages = 10 * 6 * (4 << 20) // 4096
    # glibc's default hands the freed 24 MiB back to the kernel (its trim threshold
    # follows its mmap threshold, a few MiB): a fault per page, every round
    assert default > pages // 2
    # kept: the same heap memory each time, already mapped
    assert kept < pages // 10
