"""Cheap totals for progress reports: how many bytes a snapshot will read, how many a
checkout will write. A pre-scan of sizes (lstat only, no reads) costs a small fraction
of the work it measures; it is only an estimate (files may change meanwhile)."""

from __future__ import annotations

import os
import stat

from .manifest import REG, Entry


def directory_bytes(root: str | os.PathLike) -> int:
    """Bytes of the regular files under `root` (symlinks not followed, each name
    counted, unreadable directories skipped: the snapshot itself reports them)."""
    total = 0
    stack = [os.fspath(root)]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for d in it:
                    try:
                        st = d.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(d.path)
                    elif stat.S_ISREG(st.st_mode):
                        total += st.st_size
        except OSError:
            continue
    return total


def tree_bytes(tree: list[Entry]) -> int:
    """Bytes of the regular files a checkout of `tree` writes."""
    return sum(e.size for e in tree if e.kind == REG)


__all__ = ["directory_bytes", "tree_bytes"]
