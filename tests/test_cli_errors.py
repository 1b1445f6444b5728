"""Bad input at the command line: one line on stderr starting "pylayers: ", nothing on
stdout, exit status 1 (2 for usage errors), never a traceback. Also the REF forms, `rm`'s
refusals, and a hostile manifest that a checkout must refuse without writing anything
outside DEST.

Real stores and trees in tmp_path; the CLI in a subprocess; hostile manifests are
encoded by hand (tests/hostile.py) and stored as a snapshot's would be.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import blake3
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from hostile import fill_file, raw_manifest, store_manifest  # noqa: E402
from treeutil import run_cli, snapshot  # noqa: E402

import pylayers  # noqa: E402
from pylayers.layers.manifest import (  # noqa: E402
    DIR,
    HARDLINK,
    REG,
    SYMLINK,
    Entry,
    encode_manifest,
)

NOBODY = 65534


def fails(proc: subprocess.CompletedProcess, *needles: str, code: int) -> str:
    """Assert the one-line failure; return the line."""
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == code, (proc.returncode, proc.stdout, err)
    assert "Traceback" not in err and "internal error" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pylayers: "), lines[0]
    assert proc.stdout == b"", proc.stdout
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    return lines[0]


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout.decode()


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"hello")
    return src


# -- snapshot sources ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["missing", "new\nline", "esc\x1b[31mred", "tab\tcr\r"])
def test_snapshot_of_a_missing_directory(store: Path, tmp_path: Path, name: str) -> None:
    """Even a path holding control characters stays on one line, escaped."""
    line = fails(run_cli(store, "snapshot", str(tmp_path / name)), "no such directory",
                 code=3)
    assert "\x1b" not in line and "\r" not in line and "\t" not in line
    assert name.split("\n")[0].split("\x1b")[0].split("\t")[0] in line


def test_snapshot_of_a_regular_file(store: Path, tree: Path) -> None:
    fails(run_cli(store, "snapshot", str(tree / "d" / "f")), "not a directory", code=6)


def test_snapshot_of_a_dangling_symlink(store: Path, tmp_path: Path) -> None:
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    fails(run_cli(store, "snapshot", str(tmp_path / "dangling")), "dangling", code=3)


@pytest.fixture
def world_dir():
    """A directory every user can reach (pytest's tmp_path is 0700 root)."""
    d = Path(tempfile.mkdtemp(prefix="pylayers-test-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def run_as_nobody(store: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*AS_NOBODY, sys.executable, "-m", "pylayers", "--store", str(store),
                           *args], capture_output=True, timeout=120, cwd=store.parent)


@pytest.mark.parametrize("what, secret", [("file", "secret"), ("dir", "secret"),
                                          ("file", "se\ncret"), ("dir", "se\ncret")])
def test_snapshot_of_an_unreadable_entry(world_dir: Path, what: str, secret: str) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to run the CLI as uid 65534")
    src = world_dir / "src"
    src.mkdir()
    (src / "readable").write_bytes(b"fine")
    if what == "file":
        (src / secret).write_bytes(b"no")
        os.chmod(src / secret, 0)
    else:
        (src / secret).mkdir()
        (src / secret / "inner").write_bytes(b"no")
        os.chmod(src / secret, 0)
    store = world_dir / "store"
    store.mkdir()
    os.chown(store, NOBODY, NOBODY)
    probe = subprocess.run([*AS_NOBODY, sys.executable, "-c", "import pylayers"],
                           capture_output=True, cwd=world_dir)
    if probe.returncode != 0:
        pytest.skip("uid 65534 cannot run this Python or import pylayers: "
                    + probe.stderr.decode(errors="replace").strip()[-200:])
    fails(run_as_nobody(store, "snapshot", str(src)), "se", "cret", "permission denied", code=6)
    # nothing stored, no pack data left behind, and the store still works
    assert not list((store / "packs").rglob("*.pack"))
    assert ok(run_as_nobody(store, "tags")) == ""
    os.chmod(src / secret, 0o755)
    if what == "file":
        os.chmod(src / secret, 0o644)
    lid = ok(run_as_nobody(store, "snapshot", str(src))).strip().splitlines()[-1]
    assert len(lid) == 64


def test_snapshot_of_a_tree_deeper_than_path_max(store: Path, tmp_path: Path) -> None:
    """Paths past PATH_MAX (made with directory fds): one readable line, no repr of
    bytes, no traceback."""
    src = tmp_path / "deep"
    src.mkdir()
    fd = os.open(src, os.O_RDONLY)
    try:
        for _ in range(20):
            os.mkdir(b"d" * 250, dir_fd=fd)
            nfd = os.open(b"d" * 250, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        os.close(os.open(b"f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    line = fails(run_cli(store, "snapshot", str(src)), "too long", code=6)
    assert "b'" not in line and 'b"' not in line, line[:200]


def test_warnings_are_one_line_each(store: Path, tree: Path) -> None:
    """A socket cannot be checked out, so a snapshot skips it with a warning; a name
    holding a newline stays on the warning's line."""
    socks = []
    for name in ("sock", "so\nck"):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(tree / name))
        socks.append(s)
    try:
        proc = run_cli(store, "snapshot", str(tree))
    finally:
        for s in socks:
            s.close()
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.decode().splitlines()
    warnings = [line for line in err if line.startswith("pylayers: warning: ")]
    assert len(warnings) == 2 and all("socket ignored" in w for w in warnings), err
    assert len(err) == 3  # the two warnings and the summary
    lid = proc.stdout.decode().split()[-1]
    listing = ok(run_cli(store, "ls", lid, "/"))
    assert "sock" not in listing


# -- checkout destinations -------------------------------------------------------------


@pytest.mark.parametrize("name", ["dest", "de\nst"])
def test_checkout_into_a_non_empty_directory(store: Path, tree: Path, tmp_path: Path,
                                             name: str) -> None:
    lid = snapshot(store, tree)
    dest = tmp_path / name
    dest.mkdir()
    (dest / "mine").write_bytes(b"keep me")
    fails(run_cli(store, "checkout", lid, str(dest)), "not empty", code=6)
    assert os.listdir(dest) == ["mine"] and (dest / "mine").read_bytes() == b"keep me"


def test_checkout_onto_a_file_or_a_symlink(store: Path, tree: Path, tmp_path: Path) -> None:
    lid = snapshot(store, tree)
    (tmp_path / "file").write_bytes(b"x")
    fails(run_cli(store, "checkout", lid, str(tmp_path / "file")), "not a directory", code=6)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    fails(run_cli(store, "checkout", lid, str(tmp_path / "link")), "not a directory", code=6)
    assert os.listdir(tmp_path / "elsewhere") == []


# -- references --------------------------------------------------------------------------


def make_chain(store: Path, tree: Path) -> list[str]:
    """Three layers, each the parent of the next; the last tagged `top`."""
    ids = [snapshot(store, tree)]
    for i in range(2):
        (tree / f"n{i}").write_bytes(b"%d" % i)
        ids.append(snapshot(store, tree, "--parent", ids[-1]))
    ok(run_cli(store, "tag", "top", ids[-1]))
    return ids


@pytest.fixture
def chain(store: Path, tree: Path) -> list[str]:
    return make_chain(store, tree)


@pytest.fixture(scope="module")
def ro_chain(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """(store, its tree, the chain) shared by tests that only read the store."""
    base = tmp_path_factory.mktemp("refs")
    src = base / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"hello")
    store = base / "store"
    return store, src, make_chain(store, src)


def shown(store: Path, ref: str) -> str:
    out = ok(run_cli(store, "show", ref))
    first = out.splitlines()[0].split()
    assert first[0] == "layer"
    return first[1]


def test_ref_forms(ro_chain) -> None:
    store, _src, (one, two, three) = ro_chain
    assert shown(store, three) == three
    assert shown(store, three.upper()) == three
    assert shown(store, three[:6]) == three
    assert shown(store, two[:6].upper()) == two
    assert shown(store, three[:40]) == three
    assert shown(store, "top") == three
    assert shown(store, "top~0") == three
    assert shown(store, "top~1") == two
    assert shown(store, "top~") == two
    assert shown(store, "top~2") == one
    assert shown(store, three + "~2") == one
    assert shown(store, three[:8] + "~1") == two
    log = ok(run_cli(store, "log", "top")).splitlines()
    assert [line.split()[0] for line in log] == [three, two, one]


@pytest.mark.parametrize("ref, needles, code", [
    ("nope", ["nope"], 3),
    ("top~3", ["top~3", "ancestors"], 3),
    ("top^^^", ["top^^^", "ancestors"], 3),
    ("top~99999999999999999999", ["ancestors"], 3),
    ("TOP", ["TOP"], 3),
    ("0" * 64, ["not found"], 3),
    ("abcde", ["abcde", "too short", "6 hex digits"], 6),  # too short to be a prefix
    ("~1", ["invalid reference"], 2),
    ("^", ["invalid reference"], 2),
    ("top~x", ["invalid reference"], 2),
    ("top~-1", ["invalid reference"], 2),
    ("top^x", ["invalid reference"], 2),
    ("", ["invalid reference"], 2),
])
def test_bad_refs(ro_chain, tmp_path: Path, ref: str, needles: list[str], code: int) -> None:
    """Not found: 3; an unusable prefix: 6; a malformed REF: a usage error (2) that
    points at the verb's help."""
    store, src, _ids = ro_chain
    for verb, args in (("checkout", ["checkout", ref, str(tmp_path / "co")]),
                       ("snapshot", ["snapshot", str(src), "--parent", ref])):
        line = fails(run_cli(store, *args), *needles, code=code)
        if code == 2:
            assert f"pylayers {verb} --help" in line, line
    assert not (tmp_path / "co").exists()


def test_bad_ref_for_every_verb_that_takes_one(ro_chain, tmp_path: Path) -> None:
    store, _src, _ids = ro_chain
    for args in (["show", "nope"], ["log", "nope"], ["ls", "nope"], ["cat", "nope", "/d/f"],
                 ["diff", "nope", "top"], ["tag", "t2", "nope"], ["rm", "nope"]):
        fails(run_cli(store, *args), "nope", code=3)
    fails(run_cli(store, "ls", "top", "/missing"), "missing", code=3)
    fails(run_cli(store, "cat", "top", "/d"), "not a regular file", code=6)
    fails(run_cli(store, "tag", "bad name!", "top"), "invalid tag name", code=2)


def test_a_short_prefix_of_several_layers_is_ambiguous(store: Path, tree: Path,
                                                       tmp_path: Path) -> None:
    """Two layers whose ids share their first 6 hex digits (found by hashing manifests
    of one-entry trees until two collide, then stored as a snapshot stores them)."""
    seen: dict[bytes, int] = {}
    pair = None
    for t in range(200_000):
        lid = blake3.blake3(encode_manifest(None, [Entry(b"", DIR, 0o755, 0, 0, t)])).digest()
        prev = seen.setdefault(lid[:3], t)
        if prev != t:
            pair = (prev, t)
            break
    assert pair is not None
    with pylayers.Store.open(store) as st:
        layers = pylayers.Layers(st)
        ids = []
        for t in pair:
            with st.writer() as w:
                ids.append(layers.commit_entries(None, [Entry(b"", DIR, 0o755, 0, 0, t)], w))
    a, b = (i.hex() for i in ids)
    assert a[:6] == b[:6] and a != b
    # the candidates are listed
    line = fails(run_cli(store, "show", a[:6]), "ambiguous", a[:16], b[:16], code=6)
    assert "2 layers" in line
    fails(run_cli(store, "checkout", a[:6], str(tmp_path / "co")), "ambiguous", code=6)
    assert not (tmp_path / "co").exists()
    # a longer prefix that tells them apart works
    n = next(i for i in range(6, 64) if a[i] != b[i]) + 1
    assert shown(store, a[:n]) == a and shown(store, b[:n]) == b


# -- stores ------------------------------------------------------------------------------


def test_store_of_a_newer_format(store: Path, tree: Path) -> None:
    snapshot(store, tree)
    cfg = json.loads((store / "config.json").read_text())
    cfg["version"] = 99
    (store / "config.json").write_text(json.dumps(cfg))
    for args in (["log", "x"], ["snapshot", str(tree)], ["tags"], ["gc"], ["fsck"]):
        fails(run_cli(store, *args), "version 99", "upgrade", code=7)


def test_foreign_directory_as_store(tmp_path: Path, tree: Path) -> None:
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_bytes(b"mine")
    for args in (["snapshot", str(tree)], ["tags"], ["init"]):
        fails(run_cli(foreign, *args), "not a pylayers store", code=7)
    assert os.listdir(foreign) == ["notes.txt"]  # nothing created in it


def test_missing_store_is_not_created_by_read_commands(tmp_path: Path) -> None:
    for args in (["log", "x"], ["tags"], ["checkout", "x", str(tmp_path / "co")]):
        fails(run_cli(tmp_path / "nostore", *args), "no store", code=7)
    assert not (tmp_path / "nostore").exists() and not (tmp_path / "co").exists()


def test_store_path_is_a_file(tmp_path: Path, tree: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    fails(run_cli(tmp_path / "file", "snapshot", str(tree)), "not a directory", code=7)


# -- usage ---------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["frobnicate"], ["snapshot", "--frob", "x"], ["snapshot"], ["checkout", "x"], [],
    ["diff", "a"], ["--no-such-option", "tags"], ["du", "--json", "extra"],
])
def test_usage_errors_exit_2(store: Path, args: list[str]) -> None:
    fails(run_cli(store, *args), code=2)


def test_empty_store_path_is_a_usage_error(tmp_path: Path, tree: Path) -> None:
    """`--store "$UNSET"`: not the current directory made a store."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for args in (["snapshot", str(tree)], ["tags"], ["init"]):
        proc = subprocess.run([sys.executable, "-m", "pylayers", "--store", "", *args],
                              capture_output=True, cwd=cwd, timeout=60)
        fails(proc, "--store", code=2)
    assert os.listdir(cwd) == []


# -- rm --------------------------------------------------------------------------------------


def test_rm(store: Path, chain: list[str]) -> None:
    one, two, three = chain
    fails(run_cli(store, "rm", two), "parent", code=5)  # has a child
    fails(run_cli(store, "rm", "top~2"), "parent", code=5)
    fails(run_cli(store, "rm", three), "tagged", "top", code=5)  # tagged
    fails(run_cli(store, "rm", "nope"), "nope", code=3)
    assert shown(store, two) == two and shown(store, three) == three
    assert ok(run_cli(store, "rm", "top")).strip() == "removed tag top"
    assert shown(store, three) == three  # the layer stays
    fails(run_cli(store, "show", "top"), "top", code=3)
    assert ok(run_cli(store, "rm", three[:10])).strip() == f"removed layer {three}"
    fails(run_cli(store, "show", three), "not found", code=3)
    assert ok(run_cli(store, "rm", two)).strip() == f"removed layer {two}"
    assert shown(store, one) == one


# -- hostile manifests ---------------------------------------------------------------------


def _store_layer(store: Path, entries: list[Entry], files: dict[bytes, bytes]) -> str:
    """Store a layer of exactly these entries (regular files get their content from
    `files`), encoded by hand (encode_manifest refuses them) and stored the way
    Layers._commit stores a snapshot's."""
    with pylayers.Store.open(store) as st:
        for e in entries:
            if e.kind == REG:
                fill_file(st, e, files[e.path])
        return store_manifest(st, raw_manifest(None, entries)).hex()


def _root() -> Entry:
    return Entry(b"", DIR, 0o755)


HOSTILE = {
    "dotdot": [_root(), Entry(b"../evil", REG, 0o644)],
    "dotdot-inside": [_root(), Entry(b"a", DIR, 0o755), Entry(b"a/../../evil", REG, 0o644)],
    "absolute": [_root(), Entry(b"/evil", REG, 0o644)],
    "dot": [_root(), Entry(b".", DIR, 0o755), Entry(b"./evil", REG, 0o644)],
    "empty-part": [_root(), Entry(b"a", DIR, 0o755), Entry(b"a//evil", REG, 0o644)],
    "under-symlink": [_root(), Entry(b"link", SYMLINK, 0o777, target=b"OUTSIDE"),
                      Entry(b"link/evil", REG, 0o644)],
    "under-file": [_root(), Entry(b"f", REG, 0o644), Entry(b"f/evil", REG, 0o644)],
    "no-parent": [_root(), Entry(b"missing/evil", REG, 0o644)],
    "hardlink-out": [_root(), Entry(b"evil", HARDLINK, 0o644, target=b"../OUTSIDE/victim")],
    "hardlink-to-symlink": [_root(), Entry(b"link", SYMLINK, 0o777, target=b"OUTSIDE/victim"),
                            Entry(b"zz", HARDLINK, 0o644, target=b"link")],
    "no-root": [Entry(b"evil", REG, 0o644)],
    "long-name": [_root(), Entry(b"e" * 256, REG, 0o644)],
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_manifest_is_refused_and_writes_nothing(tmp_path: Path, name: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    outside = work / "OUTSIDE"
    outside.mkdir()
    (outside / "victim").write_bytes(b"untouched")
    store = tmp_path / "store"
    entries = [Entry(e.path, e.kind, e.mode, target=e.target) for e in HOSTILE[name]]
    files = {e.path: b"evil bytes" for e in entries if e.kind == REG}
    lid = _store_layer(store, entries, files)
    dest = work / "sub" / "dest"
    line = fails(run_cli(store, "checkout", lid, str(dest), cwd=work), code=8)
    assert "unsafe" in line or "not a directory" in line or "not a regular file" in line \
        or "root" in line, line
    # nothing anywhere: not in or beside DEST, not through the symlink, not the victim
    assert sorted(os.listdir(work)) == ["OUTSIDE"]
    assert os.listdir(outside) == ["victim"]
    assert (outside / "victim").read_bytes() == b"untouched"
    assert not (tmp_path / "evil").exists() and not Path("/evil").exists()
    # the API refuses it the same way
    with pylayers.Store.open(store, create=False) as st, pytest.raises(pylayers.CorruptData):
        pylayers.Layers(st).checkout(bytes.fromhex(lid), work / "api")
    assert sorted(os.listdir(work)) == ["OUTSIDE"]


def test_every_verb_is_listed_and_loads_on_demand(tmp_path: Path) -> None:
    """The verbs' modules are imported lazily (pylayers.cli.app.VERBS): each verb named
    there is defined by its module, none is missing from help, and each verb's --help
    works in a fresh process that imported no other verb."""
    import importlib

    from pylayers.cli import app

    for module in set(app.VERBS.values()):
        importlib.import_module(f"pylayers.cli.{module}")
    assert set(app.cli.commands) == set(app.VERBS)
    listed = subprocess.run([sys.executable, "-m", "pylayers", "--help"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    for verb in app.VERBS:
        assert f"\n  {verb} " in listed.stdout, verb
        proc = subprocess.run([sys.executable, "-m", "pylayers", verb, "--help"],
                              capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0 and "Usage:" in proc.stdout, (verb, proc.stderr)
