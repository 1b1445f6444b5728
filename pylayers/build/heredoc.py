"""Here-documents in Dockerfiles (BuildKit's dockerfile syntax 1.4 and later).

A `RUN`, `COPY` or `ADD` line may name here-documents: a word `<<NAME` (`<<-NAME`
strips leading tabs from the body and the terminator; a quoted name, `<<"NAME"` or
`<<'NAME'`, keeps the body as written, without variable substitution). The lines after
the instruction (after its continuations) are the bodies, in the order of the words,
each up to a line that is exactly NAME. Bodies are raw text: no continuations, no
comments.

- `RUN <<EOF` alone: the body (tabs stripped for `<<-`) is the script the shell runs;
  a body starting with `#!` is written to `/dev/pipes/NAME` (mode 0755, on the step's
  private /dev, never in the layer) and executed, so its interpreter runs it.
- Any other RUN (`RUN <<EOF bash`, `RUN cat <<A > a && cat <<B > b`): the line and its
  bodies, with their terminators, go to the shell as one script; the shell reads the
  here-documents itself.
- `COPY <<NAME DEST` (and ADD): a file NAME holding the body, with `$VAR` and
  `${VAR...}` substituted from ARG and ENV unless the name is quoted (quotes in the
  body stay, `\\$` is a literal `$`, as in a shell here-document). With several sources
  or a DEST ending in `/`, DEST is a directory and NAME the file's name.

The bodies are part of the instruction's cache key (`Instruction.key_text`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HEREDOC_INSTRUCTIONS = ("RUN", "COPY", "ADD")
MARKER = re.compile(r"(\d*)<<(-?)([^<]*)\Z", re.S)
SCRIPT_DIR = "/dev/pipes"


@dataclass
class Heredoc:
    """One here-document: its NAME, the word that named it, and its body."""

    name: str
    word: str  # as written on the instruction line, e.g. <<-"EOF"
    chomp: bool  # <<-: leading tabs stripped
    expand: bool  # unquoted name: COPY substitutes variables in the body
    raw: str = ""  # the body's lines as written, each with its newline
    terminator: str = ""  # the terminating line as written

    @property
    def content(self) -> str:
        """The body, leading tabs stripped from each line for `<<-`."""
        if not self.chomp:
            return self.raw
        return "".join(line.lstrip("\t") for line in self.raw.splitlines(keepends=True))

    @property
    def is_script(self) -> bool:
        return self.content.startswith("#!")


def parse_marker(word: str) -> Heredoc | None:
    """The here-document `word` names (a word of the instruction line, quotes kept),
    or None when it names none."""
    m = MARKER.match(word)
    if not m or not m.group(3):
        return None
    rest = m.group(3)
    name = _unquote(rest)
    if name is None or name in ("", ".", "..") or any(c in name for c in " \t\n/"):
        return None
    return Heredoc(name, word, m.group(2) == "-", name == rest)


def _unquote(text: str) -> str | None:
    """`text` with shell quotes removed (None when a quote is left open)."""
    out, i, quote = [], 0, ""
    while i < len(text):
        c = text[i]
        if quote:
            if c == quote:
                quote = ""
            else:
                out.append(c)
        elif c in "'\"":
            quote = c
        elif c == "\\" and i + 1 < len(text):
            i += 1
            out.append(text[i])
        else:
            out.append(c)
        i += 1
    return None if quote else "".join(out)


def markers(words: list[str]) -> list[Heredoc]:
    """The here-documents named by the words of an instruction line, in order."""
    return [h for h in (parse_marker(w) for w in words) if h is not None]


def read_bodies(docs: list[Heredoc], lines: list[str], start: int) -> int | str:
    """Fill each of `docs`' bodies from `lines[start:]`; the index of the first line
    after the last terminator, or the name of the first here-document never closed."""
    i = start
    for doc in docs:
        body = []
        while True:
            if i >= len(lines):
                return doc.name
            line = lines[i]
            i += 1
            bare = line.rstrip("\r")
            if (bare.lstrip("\t") if doc.chomp else bare) == doc.name:
                doc.terminator = line
                break
            body.append(line + "\n")
        doc.raw = "".join(body)
    return i


def sources(words: list[str], docs: list[Heredoc]) -> dict[int, Heredoc]:
    """COPY/ADD: which of `words` (its arguments after the flags, split, quotes kept)
    are here-documents, by index."""
    out: dict[int, Heredoc] = {}
    pending = list(docs)
    for i, word in enumerate(words):
        if pending and parse_marker(word) is not None:
            out[i] = pending.pop(0)
    return out


def run_command(text: str, docs: list[Heredoc],
                shell: list[str]) -> tuple[list[str], tuple[tuple[str, bytes, int], ...]]:
    """(argv, files for the step's /dev) of a shell-form RUN whose arguments are
    `text` and which names the here-documents `docs`."""
    if len(docs) == 1 and text.strip() == docs[0].word:
        doc = docs[0]
        if doc.is_script:
            path = f"{SCRIPT_DIR}/{doc.name}"
            return [path], ((path, doc.content.encode("utf-8", "surrogateescape"), 0o755),)
        return [*shell, doc.content], ()
    return [*shell, shell_script(text, docs)], ()


def shell_script(line: str, docs: list[Heredoc]) -> str:
    """The script a shell runs for `line` and its here-documents: the line, then each
    body and terminator as written."""
    parts = [line]
    for doc in docs:
        parts.append("\n" + doc.raw + doc.terminator.rstrip("\r"))
    return "".join(parts) + "\n"


__all__ = ["HEREDOC_INSTRUCTIONS", "Heredoc", "SCRIPT_DIR", "markers",
           "parse_marker", "read_bodies", "run_command", "sources", "shell_script"]
