"""The unchanged path and start-up: a re-snapshot of a directory nothing touched
decodes no tree when the parent asked for holds the same tree (a chain of empty
layers), and its fingerprint then names the newest such layer; the CLI imports only
what a command uses (no store for `--version`; no checkout, OCI, mount, containerd,
rich or zstd for an unchanged snapshot). Real stores and trees, the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

from treeutil import assert_same_tree, checkout, run_cli  # noqa: E402

from pylayers import Layers, Store  # noqa: E402
from pylayers.layers import fingerprint  # noqa: E402


def files(root: Path, n: int = 30) -> Path:
    for i in range(n):
        d = root / f"d{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(50 + i))
    return root


def fingerprint_names(store: Path, src: Path) -> bytes | None:
    with Store.open(store, create=False) as s, s.read() as t:
        found = t.fingerprints.get(fingerprint.path_key(src))
        return found[1] if found else None


def test_unchanged_onto_an_empty_descendant_needs_no_tree_and_moves_the_fingerprint(
        tmp_path: Path) -> None:
    src = files(tmp_path / "src")
    time.sleep(1.1)  # every ctime out of the racy window: the fingerprint is recorded
    store = tmp_path / "store"
    with Store.open(store) as s:
        layers = Layers(s)
        v1 = layers.snapshot(src, tag="v1").layer_id
        v2 = layers.snapshot(src, v1, tag="v2")
        assert v2.stats.unchanged_since == v1 and v2.entries == 0
        again = layers.snapshot(src, v2.layer_id, tag="again")
        assert again.stats.unchanged_since == v2.layer_id  # not v1: it moved
        assert again.entries == 0 and layers.entries(again.layer_id) == []
        assert layers.record(again.layer_id).parent == v2.layer_id
        # the same again: the layer exists; nothing new
        assert layers.snapshot(src, v2.layer_id).layer_id == again.layer_id
    assert fingerprint_names(store, src) == again.layer_id
    out = tmp_path / "out"
    checkout(store, "again", out)
    assert_same_tree(src, out)


def test_unchanged_onto_a_layer_with_another_tree_stores_the_difference(
        tmp_path: Path) -> None:
    """The fast path must not take a parent whose tree differs for the same tree: the
    directory is unchanged since v1, the parent asked for (v2, made from another
    directory) has an extra file, which the new layer must remove."""
    src = files(tmp_path / "src")
    other = tmp_path / "other"
    subprocess.run(["cp", "-a", str(src), str(other)], check=True)
    (other / "extra").write_bytes(b"only in v2")
    time.sleep(1.1)
    store = tmp_path / "store"
    with Store.open(store) as s:
        layers = Layers(s)
        v1 = layers.snapshot(src, tag="v1").layer_id
        v2 = layers.snapshot(other, v1, tag="v2").layer_id
        res = layers.snapshot(src, v2, tag="back")
        assert res.stats.unchanged_since == v1
        assert b"extra" in [e.path for e in layers.entries(res.layer_id)]
    out = tmp_path / "out"
    checkout(store, "back", out)
    assert_same_tree(src, out)


CHECK_IMPORTS = """
import json, sys
from pylayers.cli import main
rc = main(sys.argv[1:])
print(json.dumps([rc, sorted(sys.modules)]))
"""


def modules_after(store: Path, *args: str) -> tuple[int, set[str]]:
    proc = subprocess.run([sys.executable, "-c", CHECK_IMPORTS, "--store", str(store), *args],
                          capture_output=True, text=True, timeout=120, cwd="/")
    rc, mods = json.loads(proc.stdout.splitlines()[-1])
    return rc, set(mods)


HEAVY = {"rich", "grpc", "zstandard", "google.protobuf", "concurrent.futures",
         "pylayers.oci", "pylayers.mounts",
         "pylayers.containerd", "pylayers.build", "pylayers.maintenance",
         "pylayers.layers.checkout", "pylayers.store.readahead"}


def test_version_opens_no_store(tmp_path: Path) -> None:
    rc, mods = modules_after(tmp_path / "store", "--version")
    assert rc == 0
    assert not mods & ({"lmdb", "blake3", "pylayers.store", "pylayers.layers.repo",
                        "pylayers._native"} | HEAVY)


def test_an_unchanged_snapshot_imports_only_what_it_uses(tmp_path: Path) -> None:
    src = files(tmp_path / "src")
    time.sleep(1.1)
    store = tmp_path / "store"
    assert run_cli(store, "snapshot", "-t", "v1", str(src)).returncode == 0
    # the first re-snapshot onto v1 stores a new (empty) layer; the next finds it
    assert run_cli(store, "snapshot", "-p", "v1", str(src)).returncode == 0
    rc, mods = modules_after(store, "snapshot", "-p", "v1", str(src))
    assert rc == 0
    assert "pylayers.layers.fingerprint" in mods  # it did take the unchanged path
    assert not mods & HEAVY, mods & HEAVY


def test_the_walk_ahead_guesses_the_directory_a_snapshot_walks() -> None:
    from pylayers.layers.walkahead import snapshot_directory as guess

    assert guess(["snapshot", "d"]) == "d"
    assert guess(["--store", "s", "snapshot", "-p", "v1", "-t", "v2", "d"]) == "d"
    assert guess(["--store=s", "snapshot", "--parent=v1", "-q", "-x", "*.o", "d"]) == "d"
    assert guess(["snapshot", "-m", "msg", "--", "-odd"]) == "-odd"
    for no in (["checkout", "v1", "d"], ["--version"], ["snapshot", "-p", "v1"], [],
               ["--store", "snapshot", "ls", "d"]):
        assert guess(no) is None, no


def test_the_walk_ahead_knows_every_snapshot_option_that_takes_a_value() -> None:
    """A value option it did not know would make it walk the option's value (a walk
    nobody takes, so no harm but the time): kept in step with the click definitions."""
    import click

    from pylayers.cli.app import cli
    from pylayers.layers import walkahead

    ctx = click.Context(cli)
    cmd = cli.get_command(ctx, "snapshot")
    assert cmd is not None
    for params, known in ((cmd.params, walkahead._VALUE_OPTIONS),
                          (cli.params, walkahead._GLOBAL_VALUE_OPTIONS)):
        takes = {o for p in params if isinstance(p, click.Option) and not p.is_flag
                 and not p.count for o in p.opts + p.secondary_opts}
        assert takes == set(known)


def test_a_snapshot_takes_the_walk_started_ahead(tmp_path: Path) -> None:
    """The walk started before the snapshot is its walk: a file added after it is not
    in the layer (as one added after a snapshot's own walk would not be); a walk of
    another directory is not taken."""
    from pylayers.layers.walkahead import WalkAhead

    src = files(tmp_path / "src")
    with Store.open(tmp_path / "store") as s:
        layers = Layers(s)
        ahead = WalkAhead(src)
        other = WalkAhead(tmp_path)
        (src / "later").write_bytes(b"added after the walk")
        res = layers.snapshot(src, ahead=ahead)
        paths = [e.path for e in layers.entries(res.layer_id)]
        assert b"later" not in paths and b"d0/f0" in paths
        assert not ahead.of(src)  # taken
        again = layers.snapshot(src, res.layer_id, ahead=other)  # not of src: ignored
        # the new file, and the root directory its creation changed
        assert [e.path for e in layers.entries(again.layer_id)] == [b"", b"later"]
