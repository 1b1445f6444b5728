"""What a new user meets at the command line (issue 9): bare `pylayers` prints help;
usage errors point to the verb's help; one exit code per kind of error, the table in
errors.py and the README alike; options checked at the door (a bad compression level
or chunk size creates nothing); tag names' rules; REF forms (`^`, `~N~M`, all-hex
tags, candidates of an ambiguous prefix); `layers` lists untagged layers; `rm` takes
several REFs; `snapshots` shows parents by id and current tags; diff's rule for a
directory against a REF.

Real stores in tmp_path; the CLI is the installed `pylayers` command in a subprocess.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pylayers.errors as errors

PYLAYERS = Path(sys.executable).parent / "pylayers"
README = Path(__file__).resolve().parent.parent / "README.md"


def cli(store: Path | None, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    argv = [str(PYLAYERS)] + (["--store", str(store)] if store is not None else [])
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd or (store.parent if store is not None else None))


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def fails(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pylayers: "), proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "motd").write_text("hello\n")
    return src


def snap(store: Path, src: Path, *args: str) -> str:
    return ok(cli(store, "snapshot", str(src), *args)).strip().splitlines()[-1]


def chain(store: Path, src: Path, n: int = 3) -> list[str]:
    ids = [snap(store, src, "--tag", "l0")]
    for i in range(1, n):
        (src / f"f{i}").write_text(str(i))
        ids.append(snap(store, src, "--parent", ids[-1]))
    return ids


# -- help and exit codes ------------------------------------------------------------------


def test_bare_pylayers_prints_help() -> None:
    proc = subprocess.run([str(PYLAYERS)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: pylayers" in proc.stdout and "snapshot" in proc.stdout
    assert "layers" in proc.stdout.split() and proc.stderr == ""


@pytest.mark.parametrize("args, verb", [
    (["snapshot"], "snapshot"), (["diff", "a"], "diff"), (["log", "--frob"], "log"),
    (["init", "--compression-level", "x"], "init"), (["frobnicate"], None),
])
def test_usage_errors_point_to_the_verbs_help(store: Path, args: list[str],
                                              verb: str | None) -> None:
    line = fails(cli(store, *args), 2)
    want = f"see `pylayers {verb} --help`" if verb else "see `pylayers --help`"
    assert want in line, line


def test_exit_code_table_is_the_same_in_errors_and_readme() -> None:
    """errors.py's docstring table, each class's exit_code and the README's table."""
    kinds = {"UsageError": 2, "NotFound": 3, "AlreadyExists": 4, "FailedPrecondition": 5,
             "InvalidArgument": 6, "StoreError": 7, "CorruptData": 8, "PylayersError": 1}
    for name, code in kinds.items():
        assert getattr(errors, name).exit_code == code, name
        entry = rf"^ +{code} [^\n]*(?:\n {{6,}}[^\n]*)*\({name}[),]"
        assert re.search(entry, errors.__doc__, re.M), name
    text = README.read_text()
    section = text[text.index("### Exit codes"):]
    for name, code in kinds.items():
        if name != "PylayersError":
            assert re.search(rf"^\| {code} \|.*`{name}`", section, re.M), (name, code)
    codes = sorted({v.exit_code for v in vars(errors).values()
                    if isinstance(v, type) and issubclass(v, errors.PylayersError)})
    assert codes == [1, 2, 3, 4, 5, 6, 7, 8]


# -- options at the door ------------------------------------------------------------------


@pytest.mark.parametrize("args, needle", [
    (["--compression-level", "99"], "0<=x<=22"),
    (["--compression-level", "-1"], "0<=x<=22"),
    (["--min-size", "1"], "chunk sizes"),
    (["--min-size", "1M", "--avg-size", "64K"], "chunk sizes"),
    (["--max-size", "3G"], "chunk sizes"),
    (["--avg-size", "lots"], "not a size"),
])
def test_init_refuses_bad_options_and_creates_nothing(store: Path, args: list[str],
                                                      needle: str) -> None:
    fails(cli(store, "init", *args), 2, needle, "pylayers init --help")
    assert not store.exists()


def test_init_makes_the_store_a_first_snapshot_would(tmp_path: Path, tree: Path) -> None:
    """`pylayers init` with no options and the store a snapshot creates by itself have
    the same chunker, compression level and format version (init once said level 2)."""
    made, implicit = tmp_path / "made", tmp_path / "implicit"
    ok(cli(made, "init"))
    snap(implicit, tree)
    a, b = (json.loads((s / "config.json").read_text()) for s in (made, implicit))
    for cfg in (a, b):
        del cfg["store_id"]
    assert a == b and a["compression"]["level"] == 3


def test_init_with_sizes_in_units(store: Path, tree: Path) -> None:
    ok(cli(store, "init", "--min-size", "4K", "--avg-size", "16K", "--max-size", "64KiB",
           "--compression-level", "22"))
    cfg = json.loads((store / "config.json").read_text())
    assert (cfg["chunker"]["min_size"], cfg["chunker"]["max_size"]) == (4096, 65536)
    snap(store, tree)  # the level is usable: no "level must be less than 23" later


@pytest.mark.parametrize("name, needle", [
    ("a/", "'/'"), ("a//b", "'/'"), ("/a", "'/'"), ("with space", "' '"),
    (".x", "start"), ("f" * 64, "hide"), ("x" * 129, "the limit is 128"), ("", "empty"),
])
def test_bad_tag_names_are_usage_errors(store: Path, tree: Path, name: str,
                                        needle: str) -> None:
    lid = snap(store, tree)
    for args in (["tag", name, lid], ["snapshot", str(tree), "--tag", name]):
        fails(cli(store, *args), 2, needle)
    assert ok(cli(store, "tags")) == ""


def test_tag_length_limit_is_named_and_held(store: Path, tree: Path) -> None:
    lid = snap(store, tree)
    ok(cli(store, "tag", "x" * 128, lid))
    line = fails(cli(store, "tag", "y" * 129, lid), 2)
    assert "129 characters" in line and "128" in line


# -- REFs ---------------------------------------------------------------------------------


def test_parent_forms(store: Path, tree: Path) -> None:
    one, two, three = chain(store, tree)
    ok(cli(store, "tag", "top", three))

    def show(ref: str) -> str:
        return json.loads(ok(cli(store, "show", ref, "--json")))["id"]

    assert show("top^") == two
    assert show("top^^") == one
    assert show("top~1~1") == one
    assert show("top^~1") == one
    assert show(three[:10] + "^") == two
    assert show("top~0^") == two
    fails(cli(store, "show", "top^^^"), 3, "ancestors")


def test_an_all_hex_tag_made_by_tag_resolves_before_a_prefix(store: Path,
                                                             tree: Path) -> None:
    one, two = chain(store, tree, 2)
    ok(cli(store, "tag", one[:8], two))  # a hex tag naming the *other* layer
    ok(cli(store, "tag", "cafe", one))
    assert json.loads(ok(cli(store, "show", one[:8], "--json")))["id"] == two
    assert json.loads(ok(cli(store, "show", "cafe", "--json")))["id"] == one
    assert json.loads(ok(cli(store, "show", one[:9], "--json")))["id"] == one
    # under 6 hex digits and no such tag: too short
    fails(cli(store, "show", "abc"), 6, "too short", "6 hex digits")


# -- layers, rm, gc -------------------------------------------------------------------------


def test_layers_lists_untagged_layers(store: Path, tree: Path) -> None:
    one, two, three = chain(store, tree)
    rows = json.loads(ok(cli(store, "layers", "--json")))
    assert {r["id"] for r in rows} == {one, two, three}
    by_id = {r["id"]: r for r in rows}
    assert by_id[one]["tags"] == ["l0"] and by_id[two]["tags"] == []
    assert by_id[three]["parent"] == two and by_id[one]["parent"] is None
    for r in rows:
        assert set(r) >= {"id", "parent", "tags", "created", "entries", "new_bytes",
                          "file_bytes", "message"}
        assert "stored_bytes" not in r  # new bytes are not bytes on disk
    text = ok(cli(store, "layers")).splitlines()
    assert len(text) == 3
    assert any(line.startswith(three[:16]) and two[:12] in line for line in text)


def test_rm_takes_several_refs_in_any_order(store: Path, tree: Path) -> None:
    one, two, three = chain(store, tree)
    # a typo anywhere removes nothing
    fails(cli(store, "rm", "l0", one, "nope"), 3, "nope")
    assert len(json.loads(ok(cli(store, "layers", "--json")))) == 3
    out = ok(cli(store, "rm", one, "l0", three, two)).splitlines()
    assert out == ["removed tag l0", f"removed layer {three}", f"removed layer {two}",
                   f"removed layer {one}"]
    assert json.loads(ok(cli(store, "layers", "--json"))) == []


def test_gc_after_rm_says_what_it_freed(store: Path, tree: Path) -> None:
    (tree / "big").write_bytes(b"x" * 300_000 + bytes(range(256)) * 500)
    lid = snap(store, tree)
    ok(cli(store, "rm", lid))
    res = json.loads(ok(cli(store, "gc", "--json")))
    assert res["chunks"] > 0 and res["pack_bytes_freed"] > 0
    assert res["bytes_freed"] >= res["pack_bytes_freed"]


# -- snapshots ------------------------------------------------------------------------------


def test_snapshots_show_parent_ids_and_current_tags(store: Path, tree: Path,
                                                    tmp_path: Path) -> None:
    base = snap(store, tree, "--tag", "base")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    key = ok(cli(store, "mount", "base", str(mnt), "--rw", "--driver", "copy")).strip()
    try:
        ok(cli(store, "tag", "renamed", base))
        ok(cli(store, "rm", "base"))  # the tag it was made from is gone
        rows = {r["key"]: r for r in json.loads(ok(cli(store, "snapshots", "--json")))}
        assert rows[key]["parent"] == base and rows[key]["parent_tags"] == ["renamed"]
        assert rows[key]["kind"] == "active" and rows[key]["driver"] == "copy"
        line = next(ln for ln in ok(cli(store, "snapshots")).splitlines() if key in ln)
        assert f"parent={base[:12]} (renamed)" in line and "base" not in line.split()
    finally:
        cli(store, "umount", str(mnt), "--discard")


def test_committing_a_view_says_it_is_a_view(store: Path, tree: Path,
                                             tmp_path: Path) -> None:
    snap(store, tree, "--tag", "base")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    key = ok(cli(store, "mount", "base", str(mnt), "--driver", "copy")).strip()
    try:
        fails(cli(store, "commit", key), 5, "is a view, not writable")
    finally:
        cli(store, "umount", str(mnt))


# -- diff: a directory or a REF -------------------------------------------------------------


def test_diff_directory_or_ref_rule(store: Path, tree: Path, tmp_path: Path) -> None:
    """An argument holding '/' or given with --dir is a directory; any other is a REF,
    and a REF that is also a directory's name is refused, naming both."""
    work = tmp_path / "work"
    work.mkdir()
    base = snap(store, tree, "--tag", "etc5")
    (tree / "etc" / "motd").write_text("changed\n")
    snap(store, tree, "--parent", "etc5", "--tag", "etc6")
    assert ok(cli(store, "diff", "etc5", "etc6", cwd=work)) == "C /etc/motd\n"
    (work / "etc5").mkdir()  # a directory named like the tag
    line = fails(cli(store, "diff", "etc5", "etc6", cwd=work), 2, "'etc5'", base[:12],
                 "directory", "./etc5")
    assert "pylayers diff --help" in line
    # with a '/', it is the directory (empty: everything deleted)
    out = ok(cli(store, "diff", "etc6", "./etc5", cwd=work))
    assert out == "D /etc\n"
    assert ok(cli(store, "diff", "etc6", "--dir", "etc5", cwd=work)) == out
    # a directory name that is no REF: not found, with the hint to write ./
    (work / "plain").mkdir()
    fails(cli(store, "diff", "etc6", "plain", cwd=work), 3, "./plain")
    fails(cli(store, "diff", "etc6", "./absent", cwd=work), 3, "no such directory")
    fails(cli(store, "diff", "etc5", "etc6", "--dir", "x", cwd=work), 2, "one of them")
