"""glibc malloc settings for the store's large, short-lived buffers.

Writing and reading a store makes and drops buffers of about a frame (4 MiB) at a high
rate: a delta's base decompressed, its chunks copied for a worker thread, a file read
whole. glibc's malloc gives a block above its mmap threshold (128 KiB at first) a
mapping of its own and unmaps it when it is freed, and hands the top of its heap back
to the kernel once more than its trim threshold is free there: each next buffer is
then faulted in again, a page at a time, and zeroed by the kernel. Raising both keeps
freed memory for the next buffer, at the cost of holding up to the trim threshold
unused.
"""

from __future__ import annotations

import contextlib
import ctypes

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# loaded at import, before a checkout forks its reader process (which calls
# `keep_freed_memory`): a child of a threaded process must not take the loader's lock
_LIBC = ctypes.CDLL(None, use_errno=True)


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 64 << 20) -> None:
    """Blocks up to `mmap_threshold` come from malloc's heap, and up to `trim_threshold`
    bytes freed at its top are kept for later blocks. For the whole process; a C
    library other than glibc (no mallopt) keeps its own policy."""
    with contextlib.suppress(AttributeError):
        _LIBC.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
