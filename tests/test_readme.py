"""Every fenced code block of README.md, run as written.

Blocks are found by their fence (```sh, ```python, ```json, or a bare ``` for text) and
run by kind:

- the "Set up" commands are what `.ci/run` runs on a clean machine (it greps the README
  for them): checked to be exactly those, not re-run here (a `pip install` and a
  recursive `pytest` per test run would be neither quick nor useful);
- other `sh` blocks run with `sh -e` in a fresh directory holding a small `./rootfs`
  (and with `pylayers` on PATH, HOME and XDG_DATA_HOME in that directory), in one shell
  after the README's earlier `sh` blocks, as a reader following it would. Absolute paths under
  /tmp and /var/tmp are moved into that directory, so a run touches nothing outside it.
  A command whose trailing comment shows output (`# C /etc/motd  C /etc/shadow`) must
  print exactly that; "prints the layer id" must print one; "identical" after a
  `checkout` means the checkout equals ./rootfs, xattrs and mtimes included;
- `python` blocks run the same way, in a fresh directory (a fresh store); the block
  after `<!-- builder example -->` is run by tests/test_readme_builder.py;
- `json` blocks must parse; the bare "Layout" block must name paths that exist;
  `text` (`output`, `console`) blocks show output and are not run.

A block that needs user namespaces (`unshare`) skips where the kernel refuses them. Blocks
after `<!-- containerd -->` need root, containerd and runc: tests/test_containerd_e2e.py
runs them (a toml one is parsed here), and they are left out of the shell session. Blocks
after `<!-- registry -->` need a registry on localhost:5000: tests/test_registry_readme.py
runs them with one, and they are left out here likewise. A block of any other kind
fails, so a new one gets a way to run here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from treeutil import Dir, File, Symlink, build, describe_tree, tree_differences  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
T = 1_700_000_000_000_000_000


@dataclass(frozen=True)
class Block:
    n: int  # 1-based, in README order
    lang: str
    section: str  # the nearest heading above
    marker: str  # an HTML comment on the line before the fence, if any
    text: str
    line: int

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-")
        return f"{self.n}-{slug}-{self.lang or 'text'}"


def readme_blocks() -> list[Block]:
    blocks = []
    section, marker = "", ""
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        fence = re.fullmatch(r"```(\w*)\s*", line)
        if fence:
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            assert j < len(lines), f"README.md:{i + 1}: unclosed code block"
            prev = lines[i - 1].strip() if i else ""
            marker = prev[4:-3].strip() if prev.startswith("<!--") else ""
            blocks.append(Block(len(blocks) + 1, fence[1], section, marker,
                                "\n".join(lines[i + 1:j]) + "\n", i + 1))
            i = j
        i += 1
    return blocks


# ```text (or output/console) shows what a command prints: not code, not run
NOT_CODE = {"text", "output", "console"}
BLOCKS = [b for b in readme_blocks() if b.lang not in NOT_CODE]


def is_setup(b: Block) -> bool:
    return b.section.lower().startswith("set up")


# -- running shell blocks ------------------------------------------------------------------


def split_comment(line: str) -> tuple[str, str]:
    """(code, trailing comment) of one shell line; quotes respected."""
    quote = ""
    for i, c in enumerate(line):
        if quote:
            if c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line, ""


def commands(text: str) -> list[tuple[str, str]]:
    """The block's commands as (code, trailing comment): a command spans lines while a
    quote is open or a line ends in a backslash."""
    out, cur = [], ""
    for line in text.splitlines():
        cur = cur + "\n" + line if cur else line
        if cur.endswith("\\"):
            continue
        try:
            shlex.split(cur, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        if cur.strip():
            first, _, rest = cur.partition("\n")
            code, comment = split_comment(first)
            out.append((code + ("\n" + rest if rest else ""), comment if not rest else ""))
        cur = ""
    assert not cur, f"unfinished command: {cur!r}"
    return out


def localise(text: str, work: Path) -> str:
    """Absolute /tmp and /var/tmp paths moved under `work` (tmp-..., var-tmp-...)."""
    return re.sub(r"(?<![\w./])/(var/)?tmp/([\w.-]+)",
                  lambda m: str(work / (("var-tmp-" if m[1] else "tmp-") + m[2])), text)


def env_for(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYLAYERS")}
    bindir = os.path.dirname(sys.executable)  # where pip put the `pylayers` script
    env.update(PATH=bindir + os.pathsep + env.get("PATH", ""), HOME=str(work / "home"),
               XDG_DATA_HOME=str(work / "home" / ".local" / "share"),
               PYTHONDONTWRITEBYTECODE="1")
    return env


def make_rootfs(work: Path) -> None:
    """A small tree for ./rootfs: etc/motd, a shadow file that is not yet 0600."""
    build(work / "rootfs", [
        Dir("etc", mode=0o755), Dir("bin", mode=0o755), Dir("usr"), Dir("usr/bin"),
        File("etc/motd", b"Welcome to the README's rootfs\n", mode=0o644, mtime_ns=T),
        File("etc/shadow", b"root:*:19000:0:99999:7:::\n", mode=0o640, mtime_ns=T),
        File("etc/os-release", b"ID=readme\n", mtime_ns=T),
        File("usr/bin/hello", b"#!/bin/sh\necho hello\n", mode=0o755, mtime_ns=T),
        Symlink("bin/hello", target="../usr/bin/hello"),
        Dir("etc", mtime_ns=T), Dir("", mode=0o755, mtime_ns=T),
    ])
    (work / "home").mkdir()


def userns_refused() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare is not installed (Debian: util-linux)"
    res = subprocess.run(["unshare", "-Urm", "true"], capture_output=True, text=True)
    if res.returncode:
        return f"the kernel refuses a user namespace ({res.stderr.strip() or res.returncode})"
    return None


def run_sh(blocks: list[Block], work: Path,
           of: set[int] | None = None) -> list[tuple[str, str, str]]:
    """Run sh blocks in `work` in one `sh -e` session, as a reader types them into one
    shell; (command, its trailing comment, its stdout) for each command of the last (of
    the blocks numbered `of`, if given)."""
    cmds = [(b, code, comment) for b in blocks
            for code, comment in commands(localise(b.text, work))]
    script = []
    for i, (_b, code, _comment) in enumerate(cmds):
        script += [f"echo '@@@ {i}'", f"echo '@@@ {i}' >&2", code]
    proc = subprocess.run(["sh", "-e", "-c", "\n".join(script)], cwd=work, env=env_for(work),
                          capture_output=True, text=True, timeout=300)
    out = re.split(r"^@@@ \d+\n", proc.stdout, flags=re.M)[1:]
    err = re.split(r"^@@@ \d+\n", proc.stderr, flags=re.M)[1:]
    if proc.returncode:
        b, failed, _ = cmds[len(out) - 1] if out else (blocks[0], "?", "")
        raise AssertionError(f"README.md:{b.line} ({b.section}): `{failed}` failed (exit "
                             f"{proc.returncode}):\n{(err[-1] if err else proc.stderr)[-2000:]}")
    return [(code, comment, stdout) for (b, code, comment), stdout
            in zip(cmds, out, strict=True)
            if (b is blocks[-1] if of is None else b.n in of)]


def check_claim(code: str, comment: str, stdout: str, work: Path, where: str) -> None:
    shown = re.findall(r"(?:^|\s{2,})([ACD] /\S*)", comment)
    if shown and " ".join(shown) == " ".join(comment.split()):
        assert stdout.splitlines() == shown, f"{where}: `{code}` printed {stdout!r}"
    if "prints the layer id" in comment:
        assert re.fullmatch(r"[0-9a-f]{64}", stdout.strip().splitlines()[-1]), \
            f"{where}: `{code}` printed {stdout!r}"
    if "identical" in comment and code.split()[:2] == ["pylayers", "checkout"]:
        dest = Path(shlex.split(code)[-1])
        diffs = tree_differences(describe_tree(work / "rootfs"),
                                 describe_tree(dest if dest.is_absolute() else work / dest))
        assert not diffs, f"{where}: `{code}`:\n" + "\n".join(diffs[:20])
    if "logical vs stored bytes" in comment:
        assert "logical" in stdout and "stored" in stdout, f"{where}: `{code}`: {stdout!r}"


# -- the tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block(block: Block, tmp_path: Path) -> None:
    if block.lang in ("sh", "bash", "shell") and is_setup(block):
        ci = (REPO / ".ci" / "run").read_text()
        said = re.findall(r'^(?:INSTALL|TEST)="(.*)"$', ci, re.M)
        for cmd in block.text.strip().splitlines():
            assert cmd in said, f".ci/run does not run the README's `{cmd}` ({said})"
    elif block.marker == "containerd":  # needs root, containerd and runc
        if block.lang == "toml":
            tomllib.loads(block.text)
        pytest.skip("run with containerd by tests/test_containerd_e2e.py")
    elif block.marker == "registry":  # needs a registry
        pytest.skip("run with a registry by tests/test_registry_readme.py")
    elif block.lang in ("sh", "bash", "shell"):
        make_rootfs(tmp_path)
        session = [b for b in BLOCKS if b.n <= block.n
                   and b.marker not in ("containerd", "registry")
                   if b.lang in ("sh", "bash", "shell") and not is_setup(b)]
        if any("unshare" in b.text for b in session) and (why := userns_refused()):
            pytest.skip(f"a block up to this one needs a user namespace: {why}")
        for code, comment, stdout in run_sh(session, tmp_path):
            check_claim(code, comment, stdout, tmp_path,
                        f"README.md:{block.line} ({block.section})")
    elif block.lang == "python" and block.marker == "builder example":
        assert "builder example" in (REPO / "tests" / "test_readme_builder.py").read_text()
        pytest.skip("run as written, with its outputs checked, by tests/test_readme_builder.py")
    elif block.lang == "python":
        make_rootfs(tmp_path)
        script = tmp_path / "block.py"
        script.write_text(localise(block.text, tmp_path))
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path,
                              env=env_for(tmp_path), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"README.md:{block.line}: {proc.stderr[-3000:]}"
    elif block.lang == "json":
        json.loads(block.text)
    elif block.lang == "" and block.section == "Layout":
        described: dict[str, str] = {}
        name = ""
        for line in block.text.splitlines():
            first, _, what = line.partition(" ")
            name = first or name  # an indented line goes on describing the one above
            described[name] = described.get(name, "") + " " + what
        assert {"pylayers/", "tests/", "bench/"} <= set(described), described
        for name in described:
            assert (REPO / name).exists(), f"README's Layout names {name}, absent"
        mods = re.findall(r"[\w.]+\.py|\w+/", described["pylayers/"])
        assert len(mods) > 5, described["pylayers/"]
        for mod in mods:
            assert (REPO / "pylayers" / mod).exists(), f"pylayers/{mod} is absent"
    else:
        raise AssertionError(f"README.md:{block.line}: no way to run a {block.lang!r} "
                             f"block in {block.section!r}: add one to tests/test_readme.py")


def test_readme_has_the_blocks_this_test_expects() -> None:
    """The parser sees the README's blocks (so the tests above are not vacuous)."""
    kinds = {(b.section, b.lang) for b in BLOCKS}
    assert ("Quickstart", "sh") in kinds and ("Python API", "python") in kinds
    assert any(b.marker == "builder example" for b in BLOCKS)
    assert sum(is_setup(b) for b in BLOCKS) == 2
    text = README.read_text()
    assert len(readme_blocks()) == len(re.findall(r"^```\w*\s*$", text, re.M)) // 2
