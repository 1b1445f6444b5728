"""The error kinds. Each carries its exit code; the CLI prints str(error) on one line.

Code elsewhere raises these and never prints; only the CLI's top level catches them.
Tests check the kind, not the text.

Exit codes of the `pylayers` command (README, "Exit codes"):

    0    success
    1    error: anything not below (PylayersError, an I/O error outside the store, an
         internal error); also `fsck` found damage, `snapshot --allow-changing`
         stored a changing file
    2    usage: a malformed command line, option value, tag name or REF (UsageError)
    3    not found: a layer, tag, path or snapshot (NotFound)
    4    already exists (AlreadyExists)
    5    the state forbids it: a layer with children, a mounted snapshot, a file
         that kept changing (FailedPrecondition)
    6    an argument names something that cannot be used: not a directory, an
         unreadable file, an ambiguous or too short id prefix (InvalidArgument)
    7    the store cannot be used: no store, a foreign directory, a newer format, a
         full disk under the store (StoreError)
    8    stored data is damaged or unsafe (CorruptData, UnsafePath)
    130  interrupted
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


class InvalidArgument(PylayersError):
    """An argument names something that cannot be used (not a directory, bad sizes...)."""

    exit_code = 6


class UsageError(InvalidArgument):
    """The command line or an argument is malformed (a tag name, a REF's syntax): an
    invalid argument that no state of the store could make valid."""

    exit_code = 2


class NotFound(PylayersError):
    """A layer, tag, path or snapshot does not exist."""

    exit_code = 3


class AlreadyExists(PylayersError):
    """The thing to create exists already."""

    exit_code = 4


class FailedPrecondition(PylayersError):
    """The request is well formed but the state forbids it (layer has children...)."""

    exit_code = 5


class SourceChanged(FailedPrecondition):
    """A file kept changing while it was read (tar's "file changed as we read it")."""

    def __init__(self, path: str, problem: str, hint: str = "") -> None:
        super().__init__(f"{path}: {problem}" + (f"; {hint}" if hint else ""))
        self.path, self.problem = path, problem


class StoreError(PylayersError):
    """The store cannot be opened: foreign directory, unknown format version, locked."""

    exit_code = 7


class CorruptData(PylayersError):
    """Stored data does not match its id, or a structure fails to decode."""

    exit_code = 8


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
