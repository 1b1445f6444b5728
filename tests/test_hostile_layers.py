"""Hostile layers in a real store (issue 8, item 9, fourth bullet): a manifest with `..`
components and one with a file under a symlink, encoded by hand (encode_manifest
refuses both) and stored as a layer the way a snapshot stores one. Every reader
refuses them with one line and writes nothing outside its destination: checkout,
diff, ls, fsck (damage, one line per layer), and the snapshotter's prepare and view
with both drivers (the overlay driver once said `internal error: KeyError: b'..'`, and
mounted the file under a symlink as a directory).

Real store, real CLI in subprocesses, the Snapshotter API; needs root (the overlay
driver's lower directories hold files of any owner).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from hostile import fill_file, raw_manifest, store_manifest  # noqa: E402

import pylayers  # noqa: E402
from pylayers.layers.manifest import DIR, REG, SYMLINK, Entry  # noqa: E402
from pylayers.mounts import Snapshotter  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (overlay lower "
                                "directories, devices)")


def run_cli(store: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pylayers", "--store", str(store), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def refused(proc: subprocess.CompletedProcess) -> str:
    """Exit status 8 (CorruptData), one line on stderr and no traceback; returns the
    line."""
    assert proc.returncode == 8, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pylayers: "), proc.stderr
    return lines[0]


def _file(st: pylayers.Store, path: bytes, data: bytes) -> Entry:
    return fill_file(st, Entry(path, REG, 0o644), data)


@pytest.fixture
def world(tmp_path: Path):
    """STORE with a good base layer and four hostile ones; WORK/OUTSIDE/victim is what
    an escape would touch."""
    work = tmp_path / "work"
    outside = work / "OUTSIDE"
    outside.mkdir(parents=True)
    (outside / "victim").write_bytes(b"untouched")
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"good\n")
    os.symlink(outside, src / "link")
    store = tmp_path / "store"
    with pylayers.Store.open(store) as st:
        base = pylayers.Layers(st).snapshot(src).layer_id
        root = Entry(b"", DIR, 0o755)
        target = os.fsencode(outside)
        layers = {
            "base": base,
            # `..` components: in a base layer, and in a diff on the good base
            "dotdot": store_manifest(st, raw_manifest(None, [
                root, Entry(b"a", DIR, 0o755), _file(st, b"a/../../OUTSIDE/victim", b"evil")])),
            "dotdot-diff": store_manifest(st, raw_manifest(base, [
                _file(st, b"d/../../OUTSIDE/victim", b"evil")]), parent=base),
            # a file under a symlink: in one layer, and under the parent's symlink
            "under-symlink": store_manifest(st, raw_manifest(None, [
                root, Entry(b"link", SYMLINK, 0o777, target=target),
                _file(st, b"link/victim", b"evil")])),
            "under-parent-symlink": store_manifest(st, raw_manifest(base, [
                _file(st, b"link/victim", b"evil")]), parent=base),
        }
    return store, work, {k: v.hex() for k, v in layers.items()}


HOSTILE = ["dotdot", "dotdot-diff", "under-symlink", "under-parent-symlink"]


def untouched(work: Path) -> None:
    assert sorted(os.listdir(work / "OUTSIDE")) == ["victim"]
    assert (work / "OUTSIDE" / "victim").read_bytes() == b"untouched"


@pytest.mark.parametrize("name", HOSTILE)
def test_checkout_diff_and_ls_refuse_with_one_line(world, name: str) -> None:
    store, work, ids = world
    lid = ids[name]
    line = refused(run_cli(store, "checkout", lid, str(work / "dest"), cwd=work))
    assert "unsafe" in line or "not a directory" in line, line
    assert not (work / "dest").exists() or not any((work / "dest").iterdir())
    for args in (["diff", ids["base"], lid], ["diff", lid, ids["base"]], ["ls", lid]):
        refused(run_cli(store, *args, cwd=work))
    untouched(work)
    # the good layer still checks out
    assert run_cli(store, "checkout", ids["base"], str(work / "good"), cwd=work).returncode == 0


def test_fsck_reports_each_hostile_layer_as_damage(world) -> None:
    store, work, ids = world
    proc = run_cli(store, "fsck", cwd=work)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    out = proc.stdout.splitlines()
    for name in HOSTILE:
        hits = [ln for ln in out if ids[name][:12] in ln]
        assert len(hits) == 1, (name, out)
        assert "unsafe" in hits[0] or "not a directory" in hits[0], hits[0]
    assert not any(ids["base"][:12] in ln for ln in out), out


@pytest.mark.parametrize("driver", ["overlay", "copy"])
@pytest.mark.parametrize("name", HOSTILE)
def test_snapshotter_refuses_to_prepare_or_view(world, driver: str, name: str) -> None:
    """CorruptData from prepare and view, not a KeyError and not a tree that differs
    from checkout's; no snapshot is left behind, and the key can be used again."""
    store, work, ids = world
    with pylayers.Store.open(store, create=False) as st:
        snaps = Snapshotter(pylayers.Layers(st), driver)
        for make in (snaps.prepare, snaps.view):
            with pytest.raises(pylayers.CorruptData) as info:
                make("k", ids[name])
            assert "\n" not in str(info.value)
            assert "unsafe" in str(info.value) or "not a directory" in str(info.value)
            with pytest.raises(pylayers.NotFound):
                snaps.stat("k")
        snaps.view("k", ids["base"])  # the key is free, and a good layer still works
        snaps.remove("k")
    untouched(work)


@pytest.mark.parametrize("driver", ["overlay", "copy"])
def test_mount_of_a_hostile_layer_is_one_line(world, driver: str) -> None:
    store, work, ids = world
    (work / "mnt").mkdir()
    for name in HOSTILE:
        proc = run_cli(store, "mount", ids[name], str(work / "mnt"), "--driver", driver,
                       cwd=work)
        if proc.returncode == 0:
            subprocess.run(["umount", str(work / "mnt")], capture_output=True)
        line = refused(proc)
        assert "unsafe" in line or "not a directory" in line, line
        assert not os.listdir(work / "mnt")
    untouched(work)


def test_commit_checks_the_tag_whoever_calls_it(tmp_path: Path) -> None:
    """Tags are checked where they are written (Layers._commit), so the overlay
    driver's commit path (commit_entries) cannot store a tag a snapshot would refuse."""
    with pylayers.Store.open(tmp_path / "store") as st:
        layers = pylayers.Layers(st)
        before = layers.all_ids()
        with st.writer() as w:
            for bad in ("bad tag", "a//b", "-x", "", "f" * 64):
                with pytest.raises(pylayers.InvalidArgument):
                    layers.commit_entries(None, [Entry(b"", DIR, 0o755)], w, tag=bad)
        assert layers.all_ids() == before and layers.tags() == {}
        with st.writer() as w:
            lid = layers.commit_entries(None, [Entry(b"", DIR, 0o755)], w, tag="good")
        assert layers.tags() == {"good": lid}


def test_a_record_naming_another_parent_is_refused(tmp_path: Path) -> None:
    """The layer record is covered by no id: a record whose parent is not the one its
    manifest names (so the tree would be built on another base) is refused on read."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"base\n")
    store = tmp_path / "store"
    with pylayers.Store.open(store) as st:
        base = pylayers.Layers(st).snapshot(src).layer_id
        lid = store_manifest(st, raw_manifest(None, [Entry(b"", DIR, 0o755)]), parent=base)
        with pytest.raises(pylayers.CorruptData, match="different parents"):
            pylayers.Layers(st).tree(lid)
    line = refused(run_cli(store, "checkout", lid.hex(), str(tmp_path / "dest"), cwd=tmp_path))
    assert "parent" in line
    proc = run_cli(store, "fsck", cwd=tmp_path)
    assert proc.returncode == 1 and lid.hex()[:12] in proc.stdout, proc.stdout
