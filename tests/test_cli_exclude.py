"""What a snapshot leaves out (issue 9 item 7): the store's own directory when it lies
inside the tree, `--exclude PATTERN`, and DIRECTORY/.pylayersignore with
.dockerignore's rules; `diff` against a directory leaves out the same; and a tree with
paths left out never takes the fingerprint fast path (which covers every path), so the
same directory snapshotted with other patterns is another layer.

Real stores and trees in tmp_path; the CLI is the installed `pylayers` command.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

PYLAYERS = Path(sys.executable).parent / "pylayers"


def cli(store: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(PYLAYERS), "--store", str(store), *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd or store.parent)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def snap(store: Path, src: Path, *args: str) -> tuple[str, str]:
    proc = cli(store, "snapshot", str(src), *args)
    return ok(proc).strip().splitlines()[-1], proc.stderr


def paths(store: Path, lid: str, where: str = "/") -> set[str]:
    """Every path of the layer's tree (by listing directories recursively)."""
    out: set[str] = set()
    todo = [where]
    while todo:
        d = todo.pop()
        for e in json.loads(ok(cli(store, "ls", lid, d, "--json"))):
            out.add(e["path"])
            if e["kind"] == "dir":
                todo.append(e["path"])
    return out


@pytest.fixture
def src(tmp_path: Path) -> Path:
    s = tmp_path / "src"
    for rel, data in {"app.py": "code", "app.log": "log", "d/x.log": "nested log",
                      "build/out.o": "obj", "d/build/keep": "not top-level",
                      "cache/a.tmp": "t", "keep.tmp": "k", "junk.tmp": "j"}.items():
        (s / rel).parent.mkdir(parents=True, exist_ok=True)
        (s / rel).write_text(data)
    return s


def test_a_store_inside_the_tree_is_left_out(tmp_path: Path, src: Path) -> None:
    store = src / ".store"
    lid, err = snap(store, src)
    got = paths(store, lid)
    assert not any(p.startswith("/.store") for p in got), sorted(got)
    assert "/app.py" in got and "/d/x.log" in got
    assert err.count("the store itself, left out") == 1, err
    # the store grew meanwhile; the directory still equals the layer
    assert ok(cli(store, "diff", lid, str(src))) == ""
    (src / "new").write_text("n")
    lid2, _ = snap(store, src, "--parent", lid)
    assert ok(cli(store, "diff", lid, lid2)) == "A /new\n"


def test_exclude_patterns_are_dockerignore_rules(tmp_path: Path, src: Path) -> None:
    store = tmp_path / "store"
    lid, _ = snap(store, src, "--exclude", "*.log", "-x", "build/")
    got = paths(store, lid)
    assert "/app.log" not in got and "/build" not in got and "/build/out.o" not in got
    # a pattern without ** matches at the top only, as .dockerignore's
    assert {"/d/x.log", "/d/build/keep", "/app.py"} <= got
    lid2, _ = snap(store, src, "-x", "**/*.log", "-x", "**/build")
    got2 = paths(store, lid2)
    assert not {"/app.log", "/d/x.log", "/build", "/d/build"} & got2
    assert "/d" in got2


def test_pylayersignore_with_an_exception(tmp_path: Path, src: Path) -> None:
    store = tmp_path / "store"
    (src / ".pylayersignore").write_text("# scratch\n\ncache\n*.tmp\n!keep.tmp\n")
    lid, _ = snap(store, src)
    got = paths(store, lid)
    assert "/keep.tmp" in got and "/.pylayersignore" in got
    assert not {"/junk.tmp", "/cache", "/cache/a.tmp"} & got
    # the command line decides last
    lid2, _ = snap(store, src, "-x", "keep.tmp")
    assert "/keep.tmp" not in paths(store, lid2)
    # diff against the directory leaves out the same
    assert ok(cli(store, "diff", lid, str(src))) == ""
    assert ok(cli(store, "diff", lid, "--dir", str(src), "-x", "keep.tmp")) == "D /keep.tmp\n"


@pytest.mark.parametrize("first, second", [((), ("-x", "*.log")), (("-x", "*.log"), ())])
def test_other_patterns_never_reuse_a_layer_by_fingerprint(tmp_path: Path, src: Path,
                                                           first, second) -> None:
    """An unchanged directory is found by its fingerprint, which covers every path: a
    snapshot with other exclusions must scan, not return the earlier layer."""
    store = tmp_path / "store"
    time.sleep(1.2)  # every ctime out of the racy window: the fingerprint is recorded
    a, _ = snap(store, src, *first)
    b, err = snap(store, src, *second)
    assert a != b, err
    assert ("/app.log" in paths(store, a)) == (not first)
    assert ("/app.log" in paths(store, b)) == (not second)
    assert "unchanged since" not in err


@pytest.mark.parametrize("pattern", ["[abc", "../up", "/.."])
def test_bad_patterns_are_usage_errors(tmp_path: Path, src: Path, pattern: str) -> None:
    proc = cli(tmp_path / "store", "snapshot", str(src), "-x", pattern)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("pylayers: exclude pattern") and \
        proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "store").exists()
