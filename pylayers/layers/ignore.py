"""What a snapshot leaves out: `--exclude PATTERN` and a `.pylayersignore` file at the
top of the directory, with `.dockerignore`'s rules.

A pattern matches a path relative to the top directory (`/` separates components; a
leading or trailing `/` is ignored): `*` any run of characters but `/`, `?` one such
character, `[...]` a character class, `**` any number of whole components (none
included). A pattern that matches a directory leaves out everything under it. A
pattern starting with `!` brings back what an earlier pattern left out; the last
pattern that decides wins. As with git, a path under a directory that is left out
cannot be brought back (the directory is not walked at all). Lines of the file that are
empty or start with `#` are skipped.

The store's own directory, when it lies inside the tree, is always left out.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ..errors import UsageError

IGNORE_FILE = ".pylayersignore"


def _translate(pattern: str) -> re.Pattern[bytes]:
    out = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**", i):
            # `**/` : zero or more components; `/**` at the end: everything below
            if pattern.startswith("**/", i):
                out.append("(?:.*/)?")
                i += 3
            else:
                out.append(".*")
                i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = pattern.find("]", i + 2 if pattern.startswith("[!", i) or
                             pattern.startswith("[^", i) else i + 1)
            if j < 0:
                raise UsageError(f"exclude pattern {pattern!r}: '[' without ']'")
            body = pattern[i + 1:j]
            if body[:1] in ("!", "^"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = j + 1
        elif c == "\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 2
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile(("".join(out) + r"\Z").encode("utf-8", "surrogateescape"), re.S)


@dataclass(frozen=True)
class _Pattern:
    text: str
    exception: bool
    regex: re.Pattern[bytes]


@dataclass
class Exclusions:
    """Patterns (in order) deciding which paths a snapshot leaves out."""

    patterns: list[_Pattern] = field(default_factory=list)

    @classmethod
    def parse(cls, lines: list[str]) -> Exclusions:
        out = []
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            exception = line.startswith("!")
            if exception:
                line = line[1:].strip()
            text = os.path.normpath(line.strip("/")) if line.strip("/") else ""
            if not text or text == ".":
                continue
            if text == ".." or text.startswith("../"):
                raise UsageError(f"exclude pattern {raw.strip()!r} points outside the "
                                 "directory")
            out.append(_Pattern(text, exception, _translate(text)))
        return cls(out)

    @classmethod
    def for_directory(cls, directory: str | os.PathLike,
                      extra: list[str] | tuple[str, ...] = ()) -> Exclusions:
        """The directory's `.pylayersignore` (if any), then the `extra` patterns (from
        the command line: they decide last)."""
        lines: list[str] = []
        path = os.path.join(os.fsencode(directory), IGNORE_FILE.encode())
        try:
            with open(path, "rb") as f:
                lines = f.read().decode("utf-8", "surrogateescape").splitlines()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            pass
        return cls.parse([*lines, *extra])

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def excluded(self, rel: bytes) -> bool:
        """Whether the path `rel` (relative, components joined by '/') is left out,
        itself or by a parent directory's match."""
        parts = rel.split(b"/")
        prefixes = [b"/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        matched = False
        for p in self.patterns:
            if p.exception != matched:
                continue  # an exception only matters once excluded, and vice versa
            if any(p.regex.match(x) for x in prefixes):
                matched = not p.exception
        return matched


__all__ = ["IGNORE_FILE", "Exclusions"]
