"""The build context: a directory, less what its `.dockerignore` leaves out, from which
COPY and ADD take their sources.

`.dockerignore` has Docker's rules (`layers/ignore.py` implements them: `*`, `?`,
`[...]`, `**`, `!exception`, the last matching pattern decides, a pattern matching a
directory matches what lies under it). As with Docker, an exception can bring back a
path under an excluded directory: such a directory is still walked (and created as
the path's parent), one without any exception that could apply below it is not.

COPY sources are paths relative to the context's top (a leading `/` too), never
leading out of it; each component may hold wildcards (`*`, `?`, `[...]`, matched as
Go's filepath.Match does, never across a `/`).
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgument, NotFound
from ..layers.ignore import Exclusions

IGNORE_FILE = ".dockerignore"
_WILD = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Source:
    """One COPY source: its path in the context (relative, '' for the top) and on disk."""

    rel: str
    path: Path

    @property
    def is_dir(self) -> bool:
        return self.path.is_dir()


class Context:
    def __init__(self, root: str | os.PathLike[str], ignore_lines: list[str] | None = None):
        self.root = Path(os.path.realpath(root))
        if not self.root.is_dir():
            raise InvalidArgument(f"build context {os.fspath(root)} is not a directory")
        if ignore_lines is None:
            try:
                text = (self.root / IGNORE_FILE).read_bytes().decode("utf-8",
                                                                     "surrogateescape")
                ignore_lines = text.splitlines()
            except FileNotFoundError:
                ignore_lines = []
        self.ignore_lines = ignore_lines
        self.exclusions = Exclusions.parse(ignore_lines)
        # the literal leading part of each exception pattern (up to its first wildcard)
        self._exception_prefixes = [_literal_prefix(p.text) for p in
                                    self.exclusions.patterns if p.exception]

    # -- exclusion --------------------------------------------------------------------
    def excluded(self, rel: str) -> bool:
        return bool(rel) and self.exclusions.excluded(os.fsencode(rel))

    def _may_bring_back_below(self, rel: str) -> bool:
        below = rel + "/"
        return any(p.startswith(below) or below.startswith(p) or not p
                   for p in self._exception_prefixes)

    def pruned(self, rel: str, is_dir: bool) -> bool:
        """Whether a walk leaves out `rel` and everything under it."""
        if not self.excluded(rel):
            return False
        return not (is_dir and self._may_bring_back_below(rel))

    def relative(self, path: bytes | str) -> str:
        return os.path.relpath(os.fsdecode(path), self.root)

    def walk_exclude(self, path: bytes) -> bool:
        """For a scan: whether the absolute `path` is left out (with what is under it)."""
        rel = self.relative(path)
        if not self.excluded(rel):
            return False
        try:
            is_dir = stat.S_ISDIR(os.lstat(path).st_mode)
        except OSError:
            return True
        return not (is_dir and self._may_bring_back_below(rel))

    # -- sources ----------------------------------------------------------------------
    def sources(self, patterns: list[str]) -> list[Source]:
        """The context paths the COPY sources `patterns` name, in order (a wildcard's
        matches sorted), none excluded; NotFound if one names nothing."""
        out: list[Source] = []
        seen: set[str] = set()
        for pat in patterns:
            found = self._match(pat)
            if not found:
                raise NotFound(f"COPY source {pat!r}: no such file or directory in the "
                               "build context" + (" (or excluded by .dockerignore)"
                                                  if self.exclusions else ""))
            for s in found:
                if s.rel not in seen:
                    seen.add(s.rel)
                    out.append(s)
        return out

    def _match(self, pattern: str) -> list[Source]:
        norm = os.path.normpath("/" + pattern).lstrip("/")
        if norm.startswith(".."):
            raise InvalidArgument(f"COPY source {pattern!r} leads out of the build context")
        if norm in ("", "."):
            return [Source("", self.root)]
        parts = norm.split("/")
        current = [""]
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            nxt = []
            for base in current:
                d = self.root / base if base else self.root
                if _WILD.search(part):
                    try:
                        names = sorted(os.listdir(d))
                    except (NotADirectoryError, FileNotFoundError):
                        continue
                    names = [n for n in names if fnmatch.fnmatchcase(n, _go_class(part))]
                else:
                    names = [part] if os.path.lexists(d / part) else []
                for n in names:
                    rel = f"{base}/{n}" if base else n
                    if last and self.excluded(rel):
                        continue
                    if not last and self.pruned(rel, True):
                        continue
                    nxt.append(rel)
            current = nxt
        out = []
        for rel in current:
            real = os.path.realpath(self.root / rel)
            if os.path.commonpath([real, self.root]) != str(self.root):
                raise InvalidArgument(f"COPY source {rel!r} is a symlink leading out of "
                                      "the build context")
            out.append(Source(rel, Path(real)))
        return out

    def read_dockerfile(self, name: str | None) -> tuple[str, str]:
        """(text, its name for messages) of the Dockerfile: `name` (relative to the
        current directory, as docker build's -f), else CONTEXT/Dockerfile."""
        path = Path(name) if name is not None else self.root / "Dockerfile"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{path}: no such Dockerfile") from None
        except IsADirectoryError:
            raise InvalidArgument(f"{path} is a directory, not a Dockerfile") from None
        except OSError as e:
            raise InvalidArgument(f"{path}: {e.strerror}") from None
        try:
            return data.decode("utf-8"), str(name or "Dockerfile")
        except UnicodeDecodeError as e:
            raise InvalidArgument(f"{path}: not UTF-8 text (byte {e.start})") from None


def _literal_prefix(pattern: str) -> str:
    m = _WILD.search(pattern)
    return pattern[: m.start()] if m else pattern


def _go_class(part: str) -> str:
    """Go's `[^...]` negated class in fnmatch's spelling (`[!...]`)."""
    return part.replace("[^", "[!")
