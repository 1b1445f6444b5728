"""Writing a tree out to a directory with all its metadata.

Each entry is made by `materialise`; directories get their metadata last, deepest
first, so read-only directories can still be filled and their mtimes stay put.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ..errors import InvalidArgument, PylayersError, os_error_reason, short_path
from .manifest import BLK, CHR, DIR, FIFO, HARDLINK, REG, SYMLINK, Entry
from .materialise import apply_metadata, drop_xattrs, make_node, write_file_from
from .tree import validate_tree


def prepare_destination(dest: Path) -> None:
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise InvalidArgument(f"{dest} exists and is not a directory")
    if dest.exists():
        if any(dest.iterdir()):
            raise InvalidArgument(f"{dest} is not empty")
    else:
        try:
            dest.mkdir(parents=True)
        except OSError as e:
            raise InvalidArgument(f"cannot create {dest}: {e.strerror}") from None


def checkout_tree(tree: list[Entry], dest: Path,
                  read_chunks: Callable[[Iterable[bytes]], Iterator[bytes]],
                  progress: Callable[[int], None] | None = None) -> None:
    """Write `tree` into the empty directory `dest`. `read_chunks` gives the bytes of
    a sequence of chunk ids, in order (`store.readahead.read_ahead(store, ids)` reads
    ahead on a thread)."""
    validate_tree(tree)
    prepare_destination(dest)
    stream = read_chunks(cid for e in tree if e.kind == REG for cid, _n in e.chunk_list())
    try:
        _write_tree(tree, dest, stream, progress)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def _write_tree(tree: list[Entry], dest: Path, stream: Iterator[bytes],
                progress: Callable[[int], None] | None) -> None:
    base = os.fsencode(dest.resolve())
    # DEST becomes the layer's root: its own xattrs go (the root's are set at the end),
    # above all a default ACL, which every entry made inside would otherwise inherit.
    drop_xattrs(base)
    dirs: list[tuple[bytes, Entry]] = []
    for e in tree:
        path = base + b"/" + e.path if e.path else base
        try:
            if e.kind == DIR:
                if e.path:
                    os.mkdir(path, 0o700)
                dirs.append((path, e))
            elif e.kind == REG:
                write_file_from(path, e, (next(stream) for _ in range(e.chunk_count())))
                if progress is not None:
                    progress(e.size)
            elif e.kind == HARDLINK:
                os.link(base + b"/" + e.target, path, follow_symlinks=False)
            elif e.kind in (SYMLINK, CHR, BLK, FIFO):
                make_node(path, e)
        except OSError as err:
            if err.errno == errno.EPERM and e.kind in (CHR, BLK):
                raise PylayersError(f"cannot create device /{short_path(e.path)}: "
                                    "permission denied (needs root)") from None
            raise PylayersError(f"cannot write /{short_path(e.path)}: "
                                f"{os_error_reason(err, path)}") from None
    for path, e in reversed(dirs):
        try:
            apply_metadata(path, e)
        except OSError as err:
            raise PylayersError(f"cannot set metadata of {short_path(path)}: "
                                f"{os_error_reason(err, path)}") from None
