"""The error kinds. Each carries its exit code; the CLI prints str(error) on one line.

Code elsewhere raises these and never prints; only the CLI's top level catches them.
Tests check the kind, not the text.
"""

from __future__ import annotations

import errno
import os

# The longest path the kernel takes, terminating NUL included, and the longest name
# (linux/limits.h).
PATH_MAX = 4096
NAME_MAX = 255


class PylayersError(Exception):
    """Base of every error pylayers reports to a user."""

    exit_code = 1


class UsageError(PylayersError):
    """The command line or an argument is malformed."""

    exit_code = 2


class InvalidArgument(PylayersError):
    """An argument names something that cannot be used (not a directory, bad sizes...)."""


class NotFound(PylayersError):
    """A layer, tag, path or snapshot does not exist."""


class AlreadyExists(PylayersError):
    """The thing to create exists already."""


class FailedPrecondition(PylayersError):
    """The request is well formed but the state forbids it (layer has children...)."""


class SourceChanged(FailedPrecondition):
    """A file kept changing while it was read (tar's "file changed as we read it")."""

    def __init__(self, path: str, problem: str, hint: str = "") -> None:
        super().__init__(f"{path}: {problem}" + (f"; {hint}" if hint else ""))
        self.path, self.problem = path, problem


class StoreError(PylayersError):
    """The store cannot be opened: foreign directory, unknown format version, locked."""


class CorruptData(PylayersError):
    """Stored data does not match its id, or a structure fails to decode."""


class UnsafePath(CorruptData):
    """A manifest or archive names a path that would escape the destination."""


def short_path(path: bytes | str, limit: int = 200) -> str:
    """`path` for a message: decoded as os.fsdecode does (the CLI shows undecodable
    bytes as \\xNN) and, past `limit` characters, cut to its head and tail around
    " ... ", so a 4 KB path still makes a readable one-line error."""
    text = os.fsdecode(path)
    if len(text) <= limit:
        return text
    keep = max(limit - 5, 2)
    head = keep - keep // 2
    return f"{text[:head]} ... {text[len(text) - keep // 2:]}"


def os_error_reason(err: OSError, path: bytes | str) -> str:
    """What went wrong with `path`, for a message: the system's words, except that a
    name too long says which limit it passed."""
    text = err.strerror or str(err)
    if err.errno == errno.ENAMETOOLONG:
        n = len(os.fsencode(path))
        if n >= PATH_MAX:
            return f"{text} (the path is {n} bytes; PATH_MAX is {PATH_MAX})"
        return f"{text} (a name in the path is longer than NAME_MAX, {NAME_MAX} bytes)"
    return text
