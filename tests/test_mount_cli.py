"""`pylayers mount`, `umount`, `commit` and `snapshots` end to end, through the CLI in
subprocesses, with real mounts (root and, for the overlay driver, overlayfs; each test
skips with the reason where mounting is not permitted here).

The flow: mount a layer writable (prints the snapshot key), edit the tree, unmount,
commit (prints the layer id), and `diff` shows exactly the edits. A read-only mount
is a view that umount removes; `umount --discard` drops a writable snapshot. Errors are
one line on stderr, exit status 1, never a traceback, and leave nothing mounted.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pylayers.errors import FailedPrecondition, NotFound
from pylayers.mounts.overlay import OverlayDriver

DRIVERS = ["overlay", "copy"]


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pylayers", "--store",
                           str(tmp_path / "store"), *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def fails(proc: subprocess.CompletedProcess, *needles: str, code: int) -> str:
    """The one-line failure, exit status `code` (README, "Exit codes"), nothing on
    stdout; returns the line."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pylayers: "), proc.stderr
    assert proc.stdout == ""
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    return lines[0]


def mounted(path: Path) -> bool:
    """Whether `path` is a mount point (bind mounts on one file system included, which
    os.path.ismount misses)."""
    with open("/proc/self/mountinfo") as f:
        targets = {line.split()[4].encode().decode("unicode_escape") for line in f}
    return str(path) in targets


def _try_mount(args: list[str]) -> str | None:
    res = subprocess.run(["mount", *args], capture_output=True, text=True)
    return None if res.returncode == 0 else ((res.stderr.strip() or "failed").splitlines()[0])


@pytest.fixture(scope="module")
def mount_support(tmp_path_factory) -> dict[str, str | None]:
    """Per driver: None where its mounts work here, else why not (found by trying)."""
    base = tmp_path_factory.mktemp("probe")
    for d in ("a", "b", "lower", "upper", "work", "merged"):
        (base / d).mkdir()
    err = _try_mount(["--bind", str(base / "a"), str(base / "b")])
    bind = None if err is None else f"cannot bind-mount here ({err})"
    if err is None:
        subprocess.run(["umount", str(base / "b")], check=True)
    overlay = OverlayDriver.unavailable()
    if overlay is None:
        err = _try_mount(["-t", "overlay", "-o", f"lowerdir={base / 'lower'},upperdir="
                          f"{base / 'upper'},workdir={base / 'work'}", "overlay",
                          str(base / "merged")])
        if err is None:
            subprocess.run(["umount", str(base / "merged")], check=True)
        else:
            overlay = f"cannot mount overlayfs here ({err})"
    return {"copy": bind, "overlay": overlay or bind}


@pytest.fixture
def mountpoints(tmp_path):
    """Fresh mount points; whatever is still mounted on them is unmounted afterwards."""
    made: list[Path] = []

    def make(name: str) -> Path:
        p = tmp_path / name
        p.mkdir()
        made.append(p)
        return p

    yield make
    for p in made:
        while mounted(p):
            if subprocess.run(["umount", str(p)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(p)], capture_output=True)


@pytest.fixture
def base(tmp_path) -> Path:
    """A store with the layer tagged `base`."""
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "bin").mkdir()
    (src / "etc" / "motd").write_text("hello\n")
    (src / "old").write_text("to be removed\n")
    (src / "bin" / "tool").write_bytes(b"\x7fELF" * 100)
    os.chmod(src / "bin" / "tool", 0o755)
    ok(cli(tmp_path, "snapshot", str(src), "--tag", "base"))
    return src


@pytest.fixture(params=DRIVERS)
def driver(request, mount_support) -> str:
    """Each driver, skipped with the reason where its mounts do not work here (before
    any other fixture runs the CLI)."""
    if mount_support[request.param] is not None:
        pytest.skip(f"{request.param} driver: {mount_support[request.param]}")
    return request.param


@pytest.fixture
def any_driver(mount_support) -> str:
    for name in DRIVERS:
        if mount_support[name] is None:
            return name
    pytest.skip(f"no driver can mount here: {mount_support}")


def snapshots(tmp_path: Path) -> dict[str, list[str]]:
    """`pylayers snapshots` as key -> the other columns."""
    out = {}
    for line in ok(cli(tmp_path, "snapshots")).splitlines():
        key, *rest = line.split()
        out[key] = rest
    return out


def test_mount_edit_umount_commit_diff(driver, tmp_path, base, mountpoints):
    mnt = mountpoints("mnt")
    key = ok(cli(tmp_path, "mount", "base", str(mnt), "--rw", "--driver", driver)).strip()
    assert re.fullmatch(r"rw-[0-9a-f]{12}", key), key
    assert mounted(mnt)
    listed = snapshots(tmp_path)
    assert listed[key][:2] == ["active", driver] and str(mnt) in listed[key]

    fails(cli(tmp_path, "commit", key, "--tag", "not a tag"), "tag", code=2)
    assert mounted(mnt)  # refused before anything was done

    with open(mnt / "etc" / "motd", "a") as f:
        f.write("edited\n")
    (mnt / "new").write_text("new file\n")
    os.unlink(mnt / "old")
    os.chmod(mnt / "bin" / "tool", 0o700)

    assert ok(cli(tmp_path, "umount", str(mnt))).strip() == key
    assert not mounted(mnt)
    assert os.listdir(mnt) == []
    listed = snapshots(tmp_path)
    assert listed[key][:2] == ["active", driver] and str(mnt) not in listed[key]

    out = ok(cli(tmp_path, "commit", key, "--tag", "t", "-m", "edited"))
    layer = out.strip().splitlines()[-1]
    assert re.fullmatch(r"[0-9a-f]{64}", layer), out
    diff = ok(cli(tmp_path, "diff", "base", "t")).splitlines()
    assert diff == ["C /bin/tool", "C /etc/motd", "A /new", "D /old"]
    listed = snapshots(tmp_path)
    assert key not in listed
    assert listed[layer][:2] == ["committed", driver]
    assert ok(cli(tmp_path, "cat", "t", "/etc/motd")) == "hello\nedited\n"


def test_read_only_mount_is_a_view_umount_removes(driver, tmp_path, base, mountpoints):
    mnt = mountpoints("ro")
    key = ok(cli(tmp_path, "mount", "base", str(mnt), "--driver", driver)).strip()
    assert re.fullmatch(r"ro-[0-9a-f]{12}", key), key
    assert mounted(mnt)
    assert (mnt / "etc" / "motd").read_text() == "hello\n"
    with pytest.raises(OSError) as info:
        (mnt / "x").write_text("x")
    assert info.value.errno == errno.EROFS
    assert snapshots(tmp_path)[key][:2] == ["view", driver]
    # a view cannot be committed: refused, and left mounted
    fails(cli(tmp_path, "commit", key), key, code=5)
    assert mounted(mnt) and (mnt / "etc" / "motd").read_text() == "hello\n"
    assert ok(cli(tmp_path, "umount", str(mnt))) == ""
    assert not mounted(mnt)
    assert key not in snapshots(tmp_path)
    assert list((tmp_path / "store" / "snapshots").iterdir()) == []


def test_umount_discard(driver, tmp_path, base, mountpoints):
    mnt = mountpoints("rw with a space")  # escaped as \040 in the kernel's mount table
    key = ok(cli(tmp_path, "mount", "base", str(mnt), "--rw", "--driver", driver)).strip()
    (mnt / "scratch").write_text("thrown away\n")
    ok(cli(tmp_path, "umount", str(mnt), "--discard"))
    assert not mounted(mnt)
    assert key not in snapshots(tmp_path)
    assert list((tmp_path / "store" / "snapshots").iterdir()) == []
    fails(cli(tmp_path, "commit", key), key, code=3)


def test_errors_are_one_line(any_driver, tmp_path, base, mountpoints):
    driver = any_driver
    mnt = mountpoints("mnt")
    fails(cli(tmp_path, "mount", "no-such-ref", str(mnt), "--driver", driver), "no-such-ref",
          code=3)
    fails(cli(tmp_path, "mount", "", str(mnt), "--driver", driver), code=2)
    fails(cli(tmp_path, "mount", "base", str(tmp_path / "absent"), "--driver", driver), code=3)
    assert not mounted(mnt) and snapshots(tmp_path) == {}
    fails(cli(tmp_path, "umount", str(mnt)), str(mnt), code=3)  # nothing mounted there
    fails(cli(tmp_path, "commit", "no-such-key"), "no-such-key", code=3)
    fails(cli(tmp_path, "commit", "k" * 600), code=3)
    snapdir = tmp_path / "store" / "snapshots"
    assert not snapdir.exists() or list(snapdir.iterdir()) == []


def test_commit_while_mounted_is_refused_until_umount(driver, tmp_path, base, mountpoints):
    """One lifecycle: mount, work, umount, commit. A commit while the snapshot is still
    mounted is refused, naming the mount point and what to run, and changes nothing;
    after `umount` (or an unmount by hand with umount(8)) it commits."""
    mnt = mountpoints("mnt")
    key = ok(cli(tmp_path, "mount", "base", str(mnt), "--rw", "--driver", driver)).strip()
    (mnt / "new").write_text("new\n")
    line = fails(cli(tmp_path, "commit", key), key, f"is mounted at {mnt}",
                 f"pylayers umount {mnt}", code=5)
    assert "Traceback" not in line
    assert mounted(mnt) and (mnt / "new").read_text() == "new\n"
    assert snapshots(tmp_path)[key][:2] == ["active", driver]
    assert ok(cli(tmp_path, "umount", str(mnt))).strip() == key
    # a second umount: nothing is mounted there any more, one clear line
    fails(cli(tmp_path, "umount", str(mnt)), f"nothing of this store is mounted at {mnt}",
          code=3)
    layer = ok(cli(tmp_path, "commit", key)).strip().splitlines()[-1]
    assert ok(cli(tmp_path, "diff", "base", layer)).splitlines() == ["A /new"]

    # unmounted by hand: the commit goes ahead
    key = ok(cli(tmp_path, "mount", layer, str(mnt), "--rw", "--driver", driver)).strip()
    (mnt / "newer").write_text("newer\n")
    subprocess.run(["umount", str(mnt)], check=True)
    second = ok(cli(tmp_path, "commit", key)).strip().splitlines()[-1]
    assert ok(cli(tmp_path, "diff", layer, second)).splitlines() == ["A /newer"]


def test_mount_refuses_a_busy_mountpoint_unless_forced(driver, tmp_path, base, mountpoints):
    """A mount point must be an empty directory nothing is mounted on: files in it
    would be hidden, and a second mount would stack on the first. --force allows both."""
    full = mountpoints("full")
    (full / "precious").write_text("mine\n")
    fails(cli(tmp_path, "mount", "base", str(full), "--driver", driver), str(full),
          "not empty", "--force", code=5)
    assert not mounted(full) and snapshots(tmp_path) == {}
    key = ok(cli(tmp_path, "mount", "base", str(full), "--driver", driver, "--force")).strip()
    assert mounted(full) and (full / "etc" / "motd").read_text() == "hello\n"
    ok(cli(tmp_path, "umount", str(full)))
    assert (full / "precious").read_text() == "mine\n"  # there all along, under the mount
    assert key not in snapshots(tmp_path)

    mnt = mountpoints("mnt")
    first = ok(cli(tmp_path, "mount", "base", str(mnt), "--driver", driver)).strip()
    fails(cli(tmp_path, "mount", "base", str(mnt), "--driver", driver), str(mnt),
          "already a mount point", "--force", code=5)
    assert list(snapshots(tmp_path)) == [first]
    ok(cli(tmp_path, "umount", str(mnt)))
    assert not mounted(mnt)


def test_mount_table_reads_escaped_names(mount_support, tmp_path):
    """is_mounted/mount_count read /proc/self/mountinfo, where the kernel writes a
    space, tab, newline and backslash in a mount point as octal (\\040, \\011, \\012,
    \\134): real bind mounts on such names are found, stacked mounts counted, and a
    name that only looks like an escape is not taken for another."""
    if mount_support["copy"] is not None:
        pytest.skip(mount_support["copy"])
    from pylayers.mounts import Mount, is_mounted, mount_all, unmount
    from pylayers.mounts.mounting import mount_count, mount_points

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("f\n")
    names = ["with space", "tab\there", "new\nline", "back\\slash", "looks\\040escaped"]
    targets = [tmp_path / n for n in names]
    for t in targets:
        t.mkdir()
    decoy = tmp_path / "looks escaped"  # what a parser without unescaping would see
    decoy.mkdir()
    bind = Mount("bind", str(src), ["rbind", "ro"])
    try:
        for t in targets:
            bind.mount(t)
            assert is_mounted(t) and (t / "f").read_text() == "f\n", t
        assert not is_mounted(decoy) and not is_mounted(src)
        assert mount_count(targets[0]) == 1
        mount_all([bind, bind], targets[0])  # stacked
        assert mount_count(targets[0]) == 3
        for _ in range(3):
            unmount(targets[0])
        assert not is_mounted(targets[0])
        with pytest.raises(FailedPrecondition, match="nothing is mounted"):
            unmount(targets[0])
    finally:
        for t in targets:
            while is_mounted(t):
                subprocess.run(["umount", str(t)], capture_output=True)
    assert not any(is_mounted(t) for t in targets)
    table = b"36 35 98:0 / /a\\040b rw - ext3 /dev/x rw\n37 35 98:0 / /c\\134d rw - x y z\n"
    assert mount_points(table) == [b"/a b", b"/c\\d"]


def test_the_same_through_the_library(driver, tmp_path, base, mountpoints):
    """`pylayers mount`, `umount` and `commit` are pylayers.mounts calls: mount_ref,
    unmount_at, release; the same rules hold there."""
    from pylayers import Layers, Store
    from pylayers.mounts import (
        Snapshotter,
        is_mounted,
        mount_ref,
        mounted_at,
        release,
        unmount_at,
    )

    mnt = mountpoints("lib")
    with Store.open(tmp_path / "store", create=False) as store:
        snaps = Snapshotter(Layers(store))
        key = mount_ref(snaps, "base", mnt, writable=True, driver=driver)
        assert is_mounted(mnt) and mounted_at(snaps, mnt).key == key
        (mnt / "lib-new").write_text("x\n")
        with pytest.raises(FailedPrecondition, match="is mounted at"):
            release(snaps, key)
        with pytest.raises(FailedPrecondition, match="not empty|already a mount point"):
            mount_ref(snaps, "base", mnt, driver=driver)
        kept = unmount_at(snaps, mnt)
        assert kept is not None and kept.key == key and not is_mounted(mnt)
        release(snaps, key)
        layer = snaps.commit("lib-commit", key)
        tree = {e.path for e in Layers(store).tree(layer)}
        assert b"lib-new" in tree
        view = mount_ref(snaps, "lib-commit", mnt, driver=driver)
        assert (mnt / "lib-new").read_text() == "x\n"
        assert unmount_at(snaps, mnt) is None
        with pytest.raises(NotFound):
            snaps.stat(view)


def test_root_without_cap_sys_admin_links_the_copy_driver(tmp_path, base, mountpoints):
    """Root without CAP_SYS_ADMIN (an unprivileged container) may not mount: the copy
    driver's snapshot is linked at the mount point instead, and umount undoes it."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    drop = ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin"]
    probe = subprocess.run([*drop, "grep", "CapEff", "/proc/self/status"],
                           capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"setpriv cannot drop CAP_SYS_ADMIN here: {probe.stderr.strip()}")
    assert not int(probe.stdout.split()[1], 16) >> 21 & 1, probe.stdout
    mnt = mountpoints("mnt")
    pl = [*drop, sys.executable, "-m", "pylayers", "--store", str(tmp_path / "store")]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*pl, *args], capture_output=True, text=True, cwd=tmp_path)

    key = ok(run("mount", "base", str(mnt), "--rw", "--driver", "copy")).strip()
    assert mnt.is_symlink() and not mounted(mnt)
    (mnt / "added").write_text("a\n")
    fails(run("mount", "base", str(mnt), "--driver", "copy"), "not empty", code=5)
    fails(run("mount", "base", str(mnt), "--driver", "overlay", "--force"),
          "driver overlay is not available", code=6)
    assert ok(run("umount", str(mnt))).strip() == key
    assert mnt.is_dir() and not mnt.is_symlink() and os.listdir(mnt) == []
    layer = ok(run("commit", key)).strip().splitlines()[-1]
    assert ok(cli(tmp_path, "diff", "base", layer)).splitlines() == ["A /added"]
