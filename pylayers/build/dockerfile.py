"""Dockerfiles: parsing into stages of instructions, and Docker's variable substitution.

Parsing follows Docker's (moby/buildkit `frontend/dockerfile/parser`):

- *Directives* (`# syntax=...`, `# escape=\\` or `` ` ``, `# check=...`) are comments of
  the form `# name=value` at the very top; the first other line (a comment, a blank
  line, an instruction) ends them. `escape` sets the escape character (default `\\`).
- A line ending in the escape character (trailing blanks allowed) continues on the
  next; comment lines and blank lines inside a continued instruction are dropped.
- A line whose first non-blank character is `#` is a comment.
- An instruction is its keyword (any case) and the rest of the line; `RUN`, `CMD`,
  `ENTRYPOINT`, `SHELL`, `COPY`, `ADD` and `VOLUME` take a JSON array of strings (the
  *exec* form) or plain text (the *shell* form); leading `--name=value` flags come
  first.

`expand` does Docker's word processing (its `shell.Lex`): single quotes keep
everything, double quotes keep all but `$` and escapes, the escape character takes the
next character as it is, and `$NAME`, `${NAME}`, `${NAME:-word}`, `${NAME-word}`,
`${NAME:+word}`, `${NAME+word}`, `${NAME:?msg}`, `${NAME?msg}` substitute (unset names
give ""). The builder applies it to the instructions Docker applies it to (not RUN,
CMD, ENTRYPOINT, SHELL: their shell does).

A malformed Dockerfile is `DockerfileError` (InvalidArgument, exit 6) naming the line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..errors import InvalidArgument
from .heredoc import HEREDOC_INSTRUCTIONS, Heredoc, markers, read_bodies, shell_script
from .metadata import HEALTHCHECK_FLAGS, healthcheck, trigger_refused
from .mounts import parse_mount, parse_network

# the instructions this builder runs, and those Docker knows but it refuses
INSTRUCTIONS = ("FROM", "COPY", "ADD", "RUN", "WORKDIR", "ENV", "ARG", "USER", "LABEL",
                "CMD", "ENTRYPOINT", "EXPOSE", "VOLUME", "SHELL", "STOPSIGNAL", "MAINTAINER",
                "HEALTHCHECK", "ONBUILD")
JSON_FORMS = {"RUN", "CMD", "ENTRYPOINT", "SHELL", "COPY", "ADD", "VOLUME"}
FLAGS = {"FROM": {"platform"}, "COPY": {"from", "chown", "chmod", "link"},
         "ADD": {"chown", "chmod", "link", "checksum"}, "RUN": {"mount", "network"},
         "HEALTHCHECK": HEALTHCHECK_FLAGS}
DIRECTIVE = re.compile(r"^#[ \t]*([A-Za-z][A-Za-z0-9_-]*)[ \t]*=[ \t]*(.*?)[ \t]*$")
_NAME_START = re.compile(r"[A-Za-z_]")
_NAME_CHAR = re.compile(r"[A-Za-z0-9_]")


class DockerfileError(InvalidArgument):
    """The Dockerfile cannot be parsed or used; the message names the line."""

    def __init__(self, message: str, line: int | None = None, path: str = "Dockerfile"):
        where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.line = line


@dataclass
class Instruction:
    """One instruction as written: its keyword (upper case), its flags, and its
    arguments either as the exec form's list (`json`) or as the text after the flags."""

    cmd: str
    text: str  # the arguments after the flags (shell form), continuations joined
    line: int  # where it starts (1-based)
    original: str  # keyword, flags and arguments, as one line
    flags: dict[str, str] = field(default_factory=dict)
    json: list[str] | None = None  # the exec form's strings
    heredocs: list[Heredoc] = field(default_factory=list)  # RUN/COPY/ADD <<NAME bodies
    mounts: list[str] = field(default_factory=list)  # RUN --mount values, in order

    def __str__(self) -> str:
        return self.original

    @property
    def key_text(self) -> str:
        """The instruction with its here-documents' bodies (what its cache key holds)."""
        if not self.heredocs:
            return self.original
        return shell_script(self.original, self.heredocs).rstrip("\n")


@dataclass
class Stage:
    """FROM and the instructions up to the next FROM."""

    index: int
    base: str  # as written (variables not yet substituted)
    name: str | None  # AS name, lower case
    line: int
    instructions: list[Instruction] = field(default_factory=list)
    from_instruction: Instruction | None = None


@dataclass
class Dockerfile:
    directives: dict[str, str]
    global_args: list[Instruction]  # the ARGs before the first FROM
    stages: list[Stage]
    escape: str = "\\"
    path: str = "Dockerfile"

    def stage(self, ref: str) -> Stage | None:
        """The stage named `ref` (any case), or numbered `ref`."""
        for s in self.stages:
            if s.name is not None and s.name == ref.lower():
                return s
        if ref.isdigit() and int(ref) < len(self.stages):
            return self.stages[int(ref)]
        return None


# -- lines --------------------------------------------------------------------------------


def _logical_lines(text: str, escape: str, first: int,
                   path: str = "Dockerfile") -> list[tuple[int, str, list[Heredoc]]]:
    """(first line number, joined text, here-documents) of each instruction; comments
    and blank lines dropped, continuations joined; the bodies of a RUN, COPY or ADD
    line's here-documents (heredoc.py) are the lines after it, taken as written."""
    out: list[tuple[int, str, list[Heredoc]]] = []
    lines = [raw.rstrip("\r") for raw in text.split("\n")]
    buf: list[str] = []
    start = 0
    i = first
    while i < len(lines):
        line = lines[i]
        number = i + 1
        i += 1
        stripped = line.strip()
        if buf:
            if not stripped or stripped.startswith("#"):
                continue  # dropped inside a continuation, as Docker does
        elif not stripped or stripped.startswith("#"):
            continue
        body = line.rstrip(" \t")
        cont = body.endswith(escape)
        if cont:
            body = body[: -len(escape)]
        if not buf:
            start = number
            body = body.lstrip(" \t")
        buf.append(body)
        if not cont:
            joined = "".join(buf)
            buf = []
            docs = _heredocs(joined, escape)
            keyword, _, inner = re.sub(r"\s", " ", joined.strip(), count=1).partition(" ")
            if keyword.upper() == "ONBUILD" and _heredocs(inner, escape):
                raise DockerfileError("ONBUILD: a trigger with a here-document is not "
                                      "supported by pylayers build", start, path)
            if docs:
                end = read_bodies(docs, lines, i)
                if isinstance(end, str):
                    raise DockerfileError(f"here-document <<{end} is never closed (no "
                                          f"line {end!r} after it)", start, path)
                i = end
            out.append((start, joined, docs))
    if buf:
        joined = "".join(buf).strip()
        if joined:
            out.append((start, joined, []))
    return out


def _heredocs(line: str, escape: str) -> list[Heredoc]:
    """The here-documents a RUN, COPY or ADD line names (none for other keywords)."""
    keyword, _, rest = re.sub(r"\s", " ", line.strip(), count=1).partition(" ")
    if keyword.upper() not in HEREDOC_INSTRUCTIONS or "<<" not in rest:
        return []
    try:
        words = split_words(rest, escape)
    except ValueError:
        return []
    return markers(words)


def _directives(lines: list[str], path: str) -> tuple[dict[str, str], int]:
    """The directives at the top, and the index of the first line after them."""
    found: dict[str, str] = {}
    for i, raw in enumerate(lines):
        m = DIRECTIVE.match(raw.rstrip("\r"))
        if not m:
            return found, i
        name = m.group(1).lower()
        if name in found:
            raise DockerfileError(f"directive {name!r} given twice", i + 1, path)
        found[name] = m.group(2)
    return found, len(lines)


def parse(text: str, path: str = "Dockerfile") -> Dockerfile:
    """Parse Dockerfile text into its global ARGs and stages."""
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.split("\n")
    directives, first = _directives(lines, path)
    escape = directives.get("escape", "\\")
    if escape not in ("\\", "`"):
        raise DockerfileError(f"invalid escape character {escape!r} (\\ or `)", 1, path)
    global_args: list[Instruction] = []
    stages: list[Stage] = []
    names: set[str] = set()
    for line, joined, docs in _logical_lines(text, escape, first, path):
        inst = parse_instruction(joined, line, path, escape)
        inst.heredocs = docs
        if inst.cmd == "FROM":
            stage = _from(inst, len(stages), path)
            if stage.name is not None:
                if stage.name in names:
                    raise DockerfileError(f"duplicate stage name {stage.name!r}", line, path)
                names.add(stage.name)
            stages.append(stage)
        elif not stages:
            if inst.cmd != "ARG":
                raise DockerfileError(f"{inst.cmd} before the first FROM (only ARG may "
                                      "come before it)", line, path)
            global_args.append(inst)
        else:
            stages[-1].instructions.append(inst)
    if not stages:
        raise DockerfileError("no FROM instruction", None, path)
    return Dockerfile(directives, global_args, stages, escape, path)


def _from(inst: Instruction, index: int, path: str) -> Stage:
    words = inst.text.split()
    if len(words) == 1:
        name = None
    elif len(words) == 3 and words[1].lower() == "as":
        name = words[2].lower()
        if not re.fullmatch(r"[a-z][a-z0-9._-]*", name):
            raise DockerfileError(f"invalid stage name {words[2]!r} (a letter, then "
                                  "letters, digits, '.', '_' or '-')", inst.line, path)
    else:
        raise DockerfileError("FROM takes an image and optionally `AS name`", inst.line,
                              path)
    return Stage(index, words[0], name, inst.line, [], inst)


def parse_instruction(line: str, number: int, path: str = "Dockerfile",
                      escape: str = "\\") -> Instruction:
    """One logical line (continuations joined) as an Instruction."""
    m = re.match(r"([A-Za-z]+)(?:\s+|$)(.*)\Z", line, re.S)
    if not m:
        raise DockerfileError(f"cannot parse {line[:40]!r}: an instruction keyword first",
                              number, path)
    cmd, rest = m.group(1).upper(), m.group(2).strip()
    if cmd not in INSTRUCTIONS:
        raise DockerfileError(f"unknown instruction {m.group(1)!r}", number, path)
    flags: dict[str, str] = {}
    mount_specs: list[str] = []
    allowed = FLAGS.get(cmd, set())
    while rest.startswith("--"):
        word, _, after = rest.partition(" ")
        fm = re.fullmatch(r"--([a-z][a-z-]*)(?:=(.*))?", word)
        if fm is None:
            raise DockerfileError(f"{cmd}: malformed flag {word!r}", number, path)
        name, value = fm.group(1), fm.group(2)
        if cmd == "RUN" and name == "security":
            raise DockerfileError(f"RUN --{name} is not supported by pylayers build",
                                  number, path)
        if cmd == "RUN" and name == "mount" and value is not None:
            if "$" not in value:  # else checked once substituted, at build time
                try:
                    parse_mount(value)
                except InvalidArgument as e:
                    raise DockerfileError(f"RUN: {e}", number, path) from None
            mount_specs.append(value)
            rest = after.lstrip()
            continue
        if cmd == "RUN" and name == "network" and value is not None and "$" not in value:
            try:
                parse_network(value)
            except InvalidArgument as e:
                raise DockerfileError(f"RUN: {e}", number, path) from None
        if name not in allowed:
            raise DockerfileError(f"{cmd} has no flag --{name}", number, path)
        if value is None:
            if name == "link":
                value = "true"
            else:
                raise DockerfileError(f"{cmd} --{name} needs a value (--{name}=VALUE)",
                                      number, path)
        if name in flags:
            raise DockerfileError(f"{cmd} --{name} given twice", number, path)
        flags[name] = value
        rest = after.lstrip()
    inst = Instruction(cmd, rest, number, line.strip(), flags, mounts=mount_specs)
    if cmd in JSON_FORMS and rest.startswith("["):
        try:
            value = json.loads(rest)
        except ValueError:
            value = None
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            inst.json = value
    _check(inst, path, escape)
    return inst


def _check(inst: Instruction, path: str, escape: str) -> None:
    cmd, rest = inst.cmd, inst.text

    def fail(msg: str):
        raise DockerfileError(f"{cmd}: {msg}", inst.line, path)

    if not rest and cmd not in ("CMD", "ENTRYPOINT", "RUN"):
        fail("needs arguments")
    if cmd == "RUN" and not rest:
        fail("needs a command")
    if cmd == "SHELL" and (inst.json is None or not inst.json):
        fail('takes a JSON array of strings, e.g. SHELL ["/bin/sh", "-c"]')
    if cmd in ("COPY", "ADD"):
        n = len(inst.json) if inst.json is not None else len(rest.split())
        if n < 2:
            fail("needs at least one source and a destination")
    if cmd in ("ENV", "LABEL"):
        pairs(inst, path, escape)
    if cmd == "ARG":
        arg_decls(inst, path, escape)
    if cmd in ("USER", "STOPSIGNAL") and len(rest.split()) > 1:
        fail("takes one argument")
    if cmd == "HEALTHCHECK":
        try:
            healthcheck(rest, inst.flags)
        except InvalidArgument as e:
            fail(str(e))
    if cmd == "ONBUILD":
        why = trigger_refused(rest.split(None, 1)[0])
        if why is not None:
            fail(why)
        parse_instruction(rest, inst.line, path, escape)  # a malformed trigger: its error


# -- words and substitution ----------------------------------------------------------------


def split_words(text: str, escape: str) -> list[str]:
    """Whitespace-separated words, quotes and escapes kept (for expand to remove):
    a blank inside quotes or after the escape character does not separate."""
    words, cur, quote, i, started = [], [], "", 0, False
    while i < len(text):
        c = text[i]
        if quote:
            cur.append(c)
            if c == escape and quote == '"' and i + 1 < len(text):
                cur.append(text[i + 1])
                i += 1
            elif c == quote:
                quote = ""
        elif c == escape and i + 1 < len(text):
            cur += [c, text[i + 1]]
            started = True
            i += 1
        elif c in "'\"":
            quote = c
            cur.append(c)
            started = True
        elif c in " \t\r\n":
            if started:
                words.append("".join(cur))
                cur, started = [], False
        else:
            cur.append(c)
            started = True
        i += 1
    if quote:
        raise ValueError(f"unterminated {quote} quote")
    if started:
        words.append("".join(cur))
    return words


def pairs(inst: Instruction, path: str = "Dockerfile",
          escape: str = "\\") -> list[tuple[str, str]]:
    """ENV and LABEL's `key=value ...` (or the old `key value` form): raw pairs, values
    still to be expanded."""
    try:
        words = split_words(inst.text, escape)
    except ValueError as e:
        raise DockerfileError(f"{inst.cmd}: {e}", inst.line, path) from None
    if not words:
        raise DockerfileError(f"{inst.cmd}: needs arguments", inst.line, path)
    if "=" not in words[0]:
        # legacy `ENV key value with spaces`
        if len(words) < 2 and inst.cmd == "ENV":
            raise DockerfileError(f"{inst.cmd}: {words[0]!r} needs a value (key=value)",
                                  inst.line, path)
        key, _, value = inst.text.strip().partition(" ")
        if not value.strip() and inst.cmd != "LABEL":
            raise DockerfileError(f"{inst.cmd}: {key!r} needs a value", inst.line, path)
        return [(key, value.strip())]
    out = []
    for w in words:
        key, eq, value = w.partition("=")
        if not eq or not key:
            raise DockerfileError(f"{inst.cmd}: {w!r} is not key=value", inst.line, path)
        out.append((key, value))
    return out


def arg_decls(inst: Instruction, path: str = "Dockerfile",
              escape: str = "\\") -> list[tuple[str, str | None]]:
    """ARG's `NAME[=default] ...`: (name, raw default or None)."""
    try:
        words = split_words(inst.text, escape)
    except ValueError as e:
        raise DockerfileError(f"ARG: {e}", inst.line, path) from None
    out = []
    for w in words:
        name, eq, value = w.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise DockerfileError(f"ARG: invalid name {name!r}", inst.line, path)
        out.append((name, value if eq else None))
    return out


class ExpandError(ValueError):
    pass


def expand(word: str, env: Mapping[str, str], escape: str = "\\",
           used: set[str] | None = None) -> str:
    """`word` with quotes removed and variables substituted, as Docker does; the names
    looked up are added to `used`."""
    return _Lexer(word, env, escape, used).word()


def expand_words(text: str, env: Mapping[str, str], escape: str = "\\",
                 used: set[str] | None = None) -> list[str]:
    """`text` split into words (blanks outside quotes separate them; a substituted
    value is not split again), each expanded."""
    return [expand(w, env, escape, used) for w in split_words(text, escape)]


class _Lexer:
    def __init__(self, text: str, env: Mapping[str, str], escape: str,
                 used: set[str] | None) -> None:
        self.s, self.i, self.vars, self.esc = text, 0, env, escape
        self.used = used if used is not None else set()

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def next(self) -> str:
        c = self.peek()
        self.i += 1
        return c

    def word(self, stop: str = "") -> str:
        out = []
        while self.i < len(self.s):
            c = self.peek()
            if stop and c == stop:
                break
            self.i += 1
            if c == "'":
                end = self.s.find("'", self.i)
                if end < 0:
                    raise ExpandError("unterminated single quote")
                out.append(self.s[self.i:end])
                self.i = end + 1
            elif c == '"':
                out.append(self.double())
            elif c == "$":
                out.append(self.dollar())
            elif c == self.esc:
                if self.i < len(self.s):
                    out.append(self.next())
            else:
                out.append(c)
        return "".join(out)

    def double(self) -> str:
        out = []
        while True:
            if self.i >= len(self.s):
                raise ExpandError("unterminated double quote")
            c = self.next()
            if c == '"':
                return "".join(out)
            if c == "$":
                out.append(self.dollar())
            elif c == self.esc and self.peek() in ('"', "$", self.esc) and self.peek():
                out.append(self.next())
            else:
                out.append(c)

    def lookup(self, name: str) -> str | None:
        self.used.add(name)
        return self.vars.get(name)

    def dollar(self) -> str:
        c = self.peek()
        if c == "{":
            self.i += 1
            name = self.name()
            if not name:
                raise ExpandError("bad substitution: ${ without a name")
            c = self.next()
            if c == "}":
                return self.lookup(name) or ""
            colon = c == ":"
            if colon:
                c = self.next()
            if c not in "-+?" or not c:
                raise ExpandError(f"unsupported modifier {c!r} in ${{{name}...}}")
            word = self.word("}")
            if self.next() != "}":
                raise ExpandError(f"missing '}}' in ${{{name}...}}")
            value = self.lookup(name)
            missing = value is None or (colon and value == "")
            if c == "-":
                return word if missing else value or ""
            if c == "+":
                return "" if missing else word
            if missing:
                raise ExpandError(f"{name}: {word or 'is not set'}")
            return value or ""
        if c and _NAME_START.match(c):
            return self.lookup(self.name()) or ""
        if c.isdigit():
            self.i += 1
            return self.lookup(c) or ""
        return "$"

    def name(self) -> str:
        start = self.i
        while self.i < len(self.s) and _NAME_CHAR.match(self.s[self.i]):
            self.i += 1
        return self.s[start:self.i]


def expand_heredoc(text: str, env: Mapping[str, str], used: set[str]) -> str:
    """A COPY here-document's body with variables substituted, as a shell does in an
    unquoted here-document: `$NAME` and `${NAME...}` (Docker's modifiers) replaced,
    quotes kept, `\\$`, `\\\\` and `` \\` `` the character itself, `\\` + newline
    removed, any other backslash kept."""
    out = []
    lex = _Lexer(text, env, "\\", used)
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt in "$\\`":
                out.append(nxt)
                i += 2
                continue
            if nxt == "\n":
                i += 2
                continue
            out.append(c)
            i += 1
        elif c == "$":
            lex.i = i + 1
            out.append(lex.dollar())
            i = lex.i
        else:
            out.append(c)
            i += 1
    return "".join(out)




def expander(env: Mapping[str, str], escape: str, line: int, path: str,
             used: set[str]) -> Callable[[str], str]:
    """expand(), with errors as DockerfileError naming `line`."""
    def run(word: str) -> str:
        try:
            return expand(word, env, escape, used)
        except ExpandError as e:
            raise DockerfileError(str(e), line, path) from None
    return run
