"""A snapshot's walk, started before the command line's modules are imported.

`pylayers snapshot DIR` begins with a native walk of DIR (csrc/walk.h: an lstat of every
entry, which decides whether anything changed). The walk runs in C without the GIL, so
the console entry point (`pylayers.__main__.run`) starts it on a thread for the
directory the arguments name, and imports click and the store meanwhile: on an
unchanged 13k-entry tree they take about the same 30 ms. `Layers.snapshot` takes the
walk's records when it is of the directory it snapshots (`take`), and otherwise walks
itself. The records are of the tree as it was when the walk ran, a few tens of
milliseconds before the scan, as a walk done by the snapshot itself would be: the
racy window counts from the moment the walk started, and a file that changes
afterwards is read again when its scan sees that.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

# The snapshot command's options that take a value (a test keeps this in step with its
# click definition): the token after one of them is not the directory.
_VALUE_OPTIONS = frozenset({"--parent", "-p", "--tag", "-t", "-m", "--message",
                            "--exclude", "-x"})
_GLOBAL_VALUE_OPTIONS = frozenset({"--store"})

_pending: WalkAhead | None = None


class WalkAhead:
    """A native walk of `directory`, running on a thread from construction."""

    def __init__(self, directory: str | os.PathLike) -> None:
        import threading  # here: every command line passes through this module

        from .._native import ffi

        self.real = os.path.realpath(directory)
        self.start_ns = time.time_ns()  # before the walk: where the racy window starts
        self._out = ffi.new("uint8_t **")
        self._len = ffi.new("size_t *")
        self._max_ctime = ffi.new("int64_t *")
        self._rc: int | None = None
        self._taken = False
        self._thread = threading.Thread(target=self._run, name="pylayers-walk-ahead",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from .._native import lib

        self._rc = lib.pl_walk(os.fsencode(self.real), self._out, self._len,
                               self._max_ctime)

    def of(self, directory: str | os.PathLike) -> bool:
        """Whether this is a walk of `directory`, not taken yet."""
        return not self._taken and os.path.realpath(directory) == self.real

    @contextmanager
    def records(self) -> Iterator[tuple[memoryview, int] | None]:
        """The walk's records and newest ctime (as `_native.walk` gives them), valid
        inside the block; None when the walk failed (the caller walks again, and
        reports the error its own way). Once only."""
        self._thread.join()
        self._taken = True
        if self._rc is None or self._rc < 0:
            yield None
            return
        from .._native import ffi, lib

        try:
            with memoryview(ffi.buffer(self._out[0], self._len[0])) as view:
                yield view, int(self._max_ctime[0])
        finally:
            lib.pl_free(self._out[0])


    def discard(self) -> None:
        """Free the walk's records without using them."""
        with self.records():
            pass


def snapshot_directory(args: list[str]) -> str | None:
    """The directory a `pylayers` command line would snapshot, if it is a `snapshot`
    command; a guess from the tokens alone (click decides later, and a wrong guess
    only costs a walk nobody takes)."""
    it = iter(args)
    for tok in it:
        if tok in _GLOBAL_VALUE_OPTIONS:
            next(it, None)
        elif tok == "--" or not tok.startswith("-"):
            if tok != "snapshot":
                return None
            break
    else:
        return None
    positional = False
    for tok in it:
        if positional or not tok.startswith("-") or tok == "-":
            return tok
        if tok == "--":
            positional = True
        elif tok in _VALUE_OPTIONS:
            next(it, None)
    return None


def start(args: list[str]) -> None:
    """Start the walk of the directory `args` would snapshot, if any."""
    global _pending
    directory = snapshot_directory(args)
    if directory is not None and os.path.isdir(directory):
        _pending = WalkAhead(directory)


def take(directory: str | os.PathLike) -> WalkAhead | None:
    """The walk started for `directory`, if there is one and nobody took it."""
    ahead = _pending
    return ahead if ahead is not None and ahead.of(directory) else None
