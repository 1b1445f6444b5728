"""Loads the compiled C core and turns its return codes into exceptions.

Nothing else in the package touches the cffi module directly.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import CorruptData, InvalidArgument

try:
    from ._native_c import ffi, lib  # type: ignore[import-not-found]
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "pylayers' native core is not built; install the package with `pip install .` "
        f"({e})"
    ) from e

__all__ = ["ffi", "lib", "new_params", "new_state", "gear", "walk", "walk_compare",
           "walk_keep", "walk_records", "write_file", "xattr_marks", "WRITE_CREATE",
           "WRITE_OWNER", "patch_make", "patch_apply", "patch_table_bytes", "x86_filter",
           "x86_calls"]

# the fixed part of a walk record (csrc/walk.h): u16 path length + 4 u32 + 7 u64
WALK_RECORD_FIXED = 2 + 4 * 4 + 8 * 7


def new_params(min_size: int, avg_size: int, max_size: int):
    """A validated `plc_params` for the given sizes (see csrc/fastcdc.h)."""
    params = ffi.new("plc_params *")
    sizes = (min_size, avg_size, max_size)
    in_range = all(isinstance(s, int) and 0 <= s < 1 << 64 for s in sizes)
    if not in_range or lib.plc_params_init(params, min_size, avg_size, max_size) != 0:
        raise InvalidArgument(
            f"invalid chunk sizes min={min_size} avg={avg_size} max={max_size}: "
            "need 64 <= min <= avg <= max <= 2 GiB"
        )
    return params


def new_state():
    return ffi.new("plc_state *")


def gear(byte: int) -> int:
    return int(lib.plc_gear(byte))


@contextmanager
def walk(root: str | bytes) -> Iterator[tuple[memoryview, int]]:
    """The lstat records of every entry under `root` (see csrc/walk.h), as a view of
    the C buffer (valid inside the `with` block only, never copied), and the newest
    ctime among them. Raises OSError as the walk's errno says."""
    path = os.fsencode(root)
    out = ffi.new("uint8_t **")
    length = ffi.new("size_t *")
    max_ctime = ffi.new("int64_t *")
    rc = lib.pl_walk(path, out, length, max_ctime)
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc), os.fsdecode(path))
    try:
        with memoryview(ffi.buffer(out[0], length[0])) as view:
            yield view, int(max_ctime[0])
    finally:
        lib.pl_free(out[0])


def walk_records(root: str | bytes) -> tuple[bytes, int]:
    """`walk`'s records copied out as bytes (for tests and tools; `walk` avoids it)."""
    with walk(root) as (view, max_ctime):
        return bytes(view), max_ctime


def xattr_marks(root: str | bytes, records: memoryview | bytes) -> bytes:
    """One byte per record of `walk(root)`'s `records`: 1 where the entry may have
    xattrs (look), 0 where it has none (csrc/walk.h, pl_xattr_marks). Raises OSError as
    the probe's errno says."""
    path = os.fsencode(root)
    cap = len(records) // WALK_RECORD_FIXED + 1
    marks = ffi.new("uint8_t[]", cap)
    n = lib.pl_xattr_marks(path, ffi.from_buffer(records), len(records), marks, cap)
    if n < 0:
        raise OSError(-n, os.strerror(-n), os.fsdecode(path))
    return bytes(ffi.buffer(marks, n))


def walk_compare(old: bytes | memoryview, new: bytes | memoryview
                 ) -> tuple[bytes, list[tuple[int, int, int, int]], tuple[int, ...]]:
    """A new walk's records against those a walk cache kept (csrc/walk.h,
    pl_walk_compare): (one match byte per new record, the events as (new index, new
    offset, old index, old offset) with -1 for none, (new records, regular files, their
    bytes, matched files, their bytes)). Raises CorruptData for a malformed buffer."""
    cap = len(new) // WALK_RECORD_FIXED + 1
    ecap = cap + len(old) // WALK_RECORD_FIXED + 1
    match = ffi.new("uint8_t[]", cap)
    events = ffi.new("int64_t[]", 4 * ecap)
    totals = ffi.new("uint64_t[5]")
    n = lib.pl_walk_compare(ffi.from_buffer(old), len(old), ffi.from_buffer(new), len(new),
                            match, cap, events, ecap, totals)
    if n < 0:
        if n == -errno.ENOMEM:
            raise MemoryError("walk cache comparison")
        raise CorruptData("walk cache: malformed records")
    flat = ffi.unpack(events, 4 * n)
    out = [(flat[k], flat[k + 1], flat[k + 2], flat[k + 3]) for k in range(0, 4 * n, 4)]
    count = int(totals[0])
    return bytes(ffi.buffer(match, count)), out, tuple(int(totals[k]) for k in range(5))


def walk_keep(records: bytes | memoryview, flags: bytes | bytearray) -> memoryview:
    """The records whose flag is set, their reserved field 0 for flag 1 (trusted) and
    1 for any other (csrc/walk.h, pl_walk_keep): a view of a buffer of their own (a
    million entries are 90 MB; not copied again)."""
    out = ffi.new("uint8_t[]", max(len(records), 1))
    n = lib.pl_walk_keep(ffi.from_buffer(records), len(records), ffi.from_buffer(flags),
                         len(flags), out, len(records))
    if n < 0:
        raise CorruptData("walk cache: records and flags do not agree")
    return memoryview(ffi.buffer(out, n))


WRITE_CREATE = 1  # pl_write_file's step numbers (csrc/writefile.h): creating the file,
WRITE_OWNER = 3  # giving it its owner


def write_file(dir_fd: int, name: bytes, mode: int, uid: int, gid: int, mtime_ns: int,
               data: bytes) -> tuple[int, int]:
    """Create the file `name` in the directory open at `dir_fd` from `data` with its
    metadata, holes for all-zero blocks (csrc/writefile.h): (0 or -errno, the step that
    failed). No exception: the caller words the error (it knows the entry)."""
    step = ffi.new("int *")
    rc = lib.pl_write_file(dir_fd, name, mode, uid, gid, mtime_ns, ffi.from_buffer(data),
                           len(data), step)
    return rc, step[0]


_uncleared = ffi.new_allocator(should_clear_after_alloc=False)


def patch_table_bytes(base_len: int) -> int:
    """The bytes of the table `patch_make` indexes a base of `base_len` bytes in."""
    return 4 * lib.pl_patch_table_slots(base_len)


def patch_make(raw: bytes | memoryview, base: bytes | memoryview, max_literals: int,
               max_ops: int, table: bytearray | None = None) -> bytes | None:
    """The op stream that rebuilds `raw` from `base` (csrc/patch.h), or None when it
    would hold more than `max_literals` literal bytes or `max_ops` bytes. `table`: a
    buffer to index the base in when it holds `patch_table_bytes(len(base))` (kept by
    the caller from call to call: no new memory, and no page faults, a call)."""
    ops = _uncleared("uint8_t[]", max(max_ops, 1))
    scratch = ffi.NULL if table is None else ffi.cast("uint32_t *", ffi.from_buffer(table))
    slots = 0 if table is None else len(table) // 4
    n = lib.pl_patch_make(ffi.from_buffer(raw), len(raw), ffi.from_buffer(base), len(base),
                          ops, max_ops, max_literals, scratch, slots)
    if n == -1 or n == -errno.EINVAL:
        return None
    if n < 0:
        raise MemoryError("patch of a delta frame")
    return ffi.buffer(ops, n)[:]


def patch_apply(ops: bytes | memoryview, base: bytes | memoryview, out_len: int,
                into: bytearray | None = None) -> bytes | memoryview:
    """The `out_len` bytes the op stream `ops` rebuilds from `base` (csrc/patch.h):
    new bytes, or a view of `into` when it is given and long enough. Raises CorruptData
    when the ops are malformed."""
    if into is not None and len(into) >= out_len:
        out = ffi.from_buffer(into)
    else:
        into, out = None, _uncleared("uint8_t[]", max(out_len, 1))
    if lib.pl_patch_apply(ffi.from_buffer(ops), len(ops), ffi.from_buffer(base), len(base),
                          out, out_len) != 0:
        raise CorruptData("malformed patch")
    if into is not None:
        return memoryview(into)[:out_len]
    return ffi.buffer(out, out_len)[:]


def x86_filter(buf: bytearray | memoryview, encode: bool) -> None:
    """Apply the x86 call filter (csrc/x86.h) to the writable buffer `buf` in place:
    encode, or decode (its inverse)."""
    lib.pl_x86_filter(ffi.from_buffer(buf, require_writable=True), len(buf), 1 if encode else 0)


def x86_calls(buf: bytes | bytearray | memoryview) -> int:
    """How many call and jump operands the x86 filter would convert in `buf`."""
    return lib.pl_x86_calls(ffi.from_buffer(buf), len(buf))
