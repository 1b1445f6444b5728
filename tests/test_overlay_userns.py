"""The overlay driver without root: inside a user namespace (`unshare -Urm`), with
overlayfs's `userxattr` option, real mounts and no mocks.

The unprivileged side runs in subprocesses, as uid 65534 where that uid can run this
interpreter and read the installed package, else (a venv under a 0700 /root, say) as
root inside `unshare -Urm`, which is the same userxattr mode: a non-initial user
namespace. The test ids say which (`uid65534` or `root-in-userns`). Everything is
checked again from outside the namespace, as root, with the Layers API and the CLI.
The module skips, with the reason, where the kernel refuses the user namespace or the
overlay mount in it (found by trying).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import pytest

from pylayers import Layers, Store
from pylayers.layers.manifest import OPAQUE, WHITEOUT
from pylayers.mounts import overlay

PY = sys.executable
NOBODY = 65534
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@dataclass(frozen=True)
class Context:
    """Who runs the unprivileged side: `prefix` + `unshare -Urm` + the command."""

    name: str
    prefix: tuple[str, ...]
    uid: int
    note: str


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("cwd", "/")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def _first_line(res: subprocess.CompletedProcess) -> str:
    return ((res.stderr or res.stdout).strip() or f"exit {res.returncode}").splitlines()[0]


@functools.cache
def probe() -> Context | str:
    """The context to run in, or why there is none (the kernel's refusal)."""
    if os.geteuid() != 0:
        return "these tests start as root, to set up a non-root user and check as root"
    for tool in ("unshare", "setpriv", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    res = _run(["unshare", "-Urm", "true"])
    if res.returncode:
        return f"the kernel refuses a user namespace (unshare -Urm: {_first_line(res)})"
    with tempfile.TemporaryDirectory() as d:
        for sub in ("l", "u", "w", "m"):
            os.mkdir(os.path.join(d, sub))
        res = _run(["unshare", "-Urm", "mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={d}/l,upperdir={d}/u,workdir={d}/w,userxattr", f"{d}/m"])
        if res.returncode:
            return f"the kernel refuses overlayfs in a user namespace ({_first_line(res)})"
    # uid 65534 must run this interpreter as it is: its own standard library and this
    # installed pylayers (a venv whose python sits under a 0700 /root may start, yet
    # find another one's library, or none)
    check = "import os, sys, pylayers; print(sys.version); print(os.__file__); " \
            "print(pylayers.__file__)"
    mine = _run([PY, "-c", check]).stdout
    theirs = _run([*SETPRIV, PY, "-c", check])
    if theirs.returncode == 0 and theirs.stdout == mine:
        res = _run([*SETPRIV, "unshare", "-Urm", "true"])
        if res.returncode == 0:
            return Context("uid65534", tuple(SETPRIV), NOBODY, "as uid 65534")
        why = f"uid {NOBODY} may not make a user namespace ({_first_line(res)})"
    elif theirs.returncode:
        why = f"uid {NOBODY} cannot run {PY} ({_first_line(theirs)})"
    else:
        why = f"uid {NOBODY} cannot read {PY}'s library or the installed pylayers"
    return Context("root-in-userns", (), 0, f"as root inside unshare -Urm: {why}")


def pytest_generate_tests(metafunc):
    if "ctx" in metafunc.fixturenames:
        ctx = probe()
        if isinstance(ctx, str):
            param = pytest.param(None, id="no-userns", marks=pytest.mark.skip(reason=ctx))
        else:
            param = pytest.param(ctx, id=ctx.name)
        metafunc.parametrize("ctx", [param])


@pytest.fixture
def work(ctx: Context):
    """A directory uid 65534 can reach (tmp_path's parents are 0700), removed after.
    Mounts made in the namespaces went with them."""
    d = Path(tempfile.mkdtemp(prefix="pylayers-userns-", dir="/tmp"))
    os.chmod(d, 0o755)
    os.chown(d, ctx.uid, ctx.uid)
    print(f"unprivileged side runs {ctx.note}")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def give(ctx: Context, path: Path) -> None:
    """chown -R path to the context's user (the store root made as root)."""
    for dirpath, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.chown(os.path.join(dirpath, name), ctx.uid, ctx.uid, follow_symlinks=False)
    os.chown(path, ctx.uid, ctx.uid)


def env_for(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYLAYERS")}
    env.update(HOME=str(work), PYTHONDONTWRITEBYTECODE="1", PY=PY,
               PL=f"{PY} -m pylayers --store {work / 'store'}")
    return env


def in_userns(ctx: Context, work: Path, cmd: list[str]) -> subprocess.CompletedProcess:
    return _run([*ctx.prefix, "unshare", "-Urm", *cmd], cwd=work, env=env_for(work))


def python_in_userns(ctx: Context, work: Path, script: str,
                     *args: str) -> subprocess.CompletedProcess:
    return in_userns(ctx, work, [PY, "-c", PRELUDE + textwrap.dedent(script), *args])


def as_plain_user(work: Path, cmd: list[str]) -> subprocess.CompletedProcess:
    """uid 65534 with no user namespace of its own."""
    return _run([*SETPRIV, *cmd], cwd=work, env=env_for(work))


def fails(res: subprocess.CompletedProcess, *needles: str, code: int = 1) -> str:
    """The CLI's one-line failure: exit status `code` (README, "Exit codes"), no
    traceback; returns the line."""
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pylayers: "), res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def ok(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, (res.stdout, res.stderr)
    return res.stdout


def root_cli(work: Path, *args: str) -> subprocess.CompletedProcess:
    """The CLI as root, outside any user namespace."""
    return _run([PY, "-m", "pylayers", "--store", str(work / "store"), *args], cwd=work)


def make_base(ctx: Context, work: Path, tag: str = "base", owner: tuple[int, int] = (0, 0),
              xattr: tuple[str, bytes] | None = None) -> None:
    """As root: a base layer (files owned by `owner`, else root), store given to ctx."""
    src = work / f"src-{tag}"
    for d in ("etc", "lib/sub", "data", "keep"):
        (src / d).mkdir(parents=True)
    files = {"etc/motd": "hello\n", "old": "to be removed\n", "lib/a": "a\n",
             "lib/sub/b": "b\n", "data/d1": "d1\n", "data/d2": "d2\n", "keep/k": "k\n",
             "gone": "gone in layer 2\n"}
    for rel, text in files.items():
        (src / rel).write_text(text)
    os.chown(src / "etc/motd", *owner)
    if xattr is not None:
        os.setxattr(src / "lib/a", xattr[0], xattr[1])
    with Store.open(work / "store") as store:
        Layers(store).snapshot(src, tag=tag)
    give(ctx, work / "store")


# Runs inside the namespace: helpers for the scripts below.
PRELUDE = textwrap.dedent("""
    import json, os, shutil, stat, subprocess, sys
    from pylayers import Layers, Store
    from pylayers.mounts import Snapshotter
    from pylayers.mounts.registry import get_driver
    from pylayers.mounts.overlay import OverlayDriver, overlay_mode

    def describe(root):
        # path -> [type letter, uid, content (files) or [major, minor], xattrs]
        out = {}

        def walk(rel):
            p = os.path.join(root, rel)
            st = os.lstat(p)
            data = None
            if stat.S_ISREG(st.st_mode):
                data = open(p).read()
            elif stat.S_ISCHR(st.st_mode):
                data = [os.major(st.st_rdev), os.minor(st.st_rdev)]
            xattrs = {n: os.getxattr(p, n, follow_symlinks=False).decode()
                      for n in os.listxattr(p, follow_symlinks=False)}
            out[rel] = [stat.filemode(st.st_mode)[0], st.st_uid, data, xattrs]
            if stat.S_ISDIR(st.st_mode):
                for name in sorted(os.listdir(p)):
                    walk(os.path.normpath(os.path.join(rel, name)))

        walk(".")
        return out

    def mount(mounts, target):
        for m in mounts:
            subprocess.run(m.command(target), check=True, capture_output=True)

    def umount(target):
        subprocess.run(["umount", target], check=True, capture_output=True)
""")

CHAIN_SCRIPT = """
    store, mnt = sys.argv[1:3]
    out = {"mode": overlay_mode()[0], "uid_map": open("/proc/self/uid_map").read().split()}
    with Store.open(store) as s:
        layers = Layers(s)
        sn = Snapshotter(layers)  # no driver named: the best one here
        out["default_driver"] = get_driver(None, layers).name

        mounts = sn.prepare("a1", "base")
        out["options"] = mounts[0].options
        mount(mounts, mnt)
        with open(f"{mnt}/etc/motd", "a") as f:
            f.write("edited\\n")                    # modify a lower file
        open(f"{mnt}/new", "w").write("new\\n")     # add a file
        os.unlink(f"{mnt}/old")                     # delete one: a whiteout
        shutil.rmtree(f"{mnt}/lib")                 # replace a directory: opaque
        os.mkdir(f"{mnt}/lib")
        open(f"{mnt}/lib/fresh", "w").write("fresh\\n")
        shutil.rmtree(f"{mnt}/data")                # rm -rf, then the same name again
        os.mkdir(f"{mnt}/data")
        shutil.rmtree(f"{mnt}/keep")                # a directory becomes a file
        open(f"{mnt}/keep", "w").write("now a file\\n")
        out["active1"] = describe(mnt)
        umount(mnt)
        out["l1"] = sn.commit("l1", "a1").hex()

        # a second layer, mounted over both lower directories
        mount(sn.prepare("a2", "l1"), mnt)
        out["lower1"] = describe(str(OverlayDriver(layers).lower_dir(bytes.fromhex(out["l1"]))))
        out["active2_before"] = describe(mnt)
        os.unlink(f"{mnt}/lib/fresh")               # whiteout of l1's file
        os.unlink(f"{mnt}/gone")                    # whiteout of base's file, through l1
        open(f"{mnt}/data/x", "w").write("x\\n")
        shutil.rmtree(f"{mnt}/etc")                 # opaque again, over base's etc
        os.mkdir(f"{mnt}/etc")
        open(f"{mnt}/etc/motd", "w").write("second\\n")
        umount(mnt)
        out["l2"] = sn.commit("l2", "a2").hex()

        mounts = sn.view("v", "l2")                 # read-only, three lower dirs
        out["view_options"] = mounts[0].options
        mount(mounts, mnt)
        out["view"] = describe(mnt)
        umount(mnt)
        sn.remove("v")
    print(json.dumps(out))
"""

AFTER_L1 = {
    ".": ["d", 0, None, {}],
    "data": ["d", 0, None, {}],
    "etc": ["d", 0, None, {}],
    "etc/motd": ["-", 0, "hello\nedited\n", {}],
    "gone": ["-", 0, "gone in layer 2\n", {}],
    "keep": ["-", 0, "now a file\n", {}],
    "lib": ["d", 0, None, {}],
    "lib/fresh": ["-", 0, "fresh\n", {}],
    "new": ["-", 0, "new\n", {}],
}
AFTER_L2 = {
    ".": ["d", 0, None, {}],
    "data": ["d", 0, None, {}],
    "data/x": ["-", 0, "x\n", {}],
    "etc": ["d", 0, None, {}],
    "etc/motd": ["-", 0, "second\n", {}],
    "keep": ["-", 0, "now a file\n", {}],
    "lib": ["d", 0, None, {}],
    "new": ["-", 0, "new\n", {}],
}


def checkout_described(work: Path, ref: str) -> dict:
    """As root: `pylayers checkout REF`, described as the scripts describe trees."""
    dest = work / f"checkout-{ref}"
    ok(root_cli(work, "checkout", ref, str(dest)))
    res = _run([PY, "-c", PRELUDE + "print(json.dumps(describe(sys.argv[1])))", str(dest)])
    return json.loads(ok(res))


def test_chain_of_commits_in_userxattr_mode(ctx, work):
    make_base(ctx, work)
    (work / "mnt").mkdir()
    os.chown(work / "mnt", ctx.uid, ctx.uid)
    out = json.loads(ok(python_in_userns(ctx, work, CHAIN_SCRIPT, str(work / "store"),
                                         str(work / "mnt"))))
    assert out["mode"] == "userxattr" and out["default_driver"] == "overlay"
    assert out["uid_map"][:2] == ["0", str(ctx.uid)]
    assert "userxattr" in out["options"] and "redirect_dir=nofollow" in out["options"]
    assert "userxattr" in out["view_options"] and "ro" in out["view_options"]
    assert out["active1"] == AFTER_L1
    assert out["active2_before"] == AFTER_L1  # l1's lower dir over base's, as committed
    assert out["view"] == AFTER_L2

    # l1's lower directory: a whiteout, and the markers in user.overlay.opaque
    lower = out["lower1"]
    assert lower["old"][0] == "c" and lower["old"][2] == [0, 0]
    for d in ("lib", "data"):
        assert lower[d][3] == {"user.overlay.opaque": "y"}, (d, lower[d])
    assert lower["keep"][:3] == ["-", 0, "now a file\n"]
    assert not any(v[3] for k, v in lower.items() if k not in ("lib", "data")), lower

    # as root, outside: the layers' entries, their diffs and checkouts
    assert ok(root_cli(work, "diff", "base", out["l1"])).splitlines() == [
        "C /data", "D /data/d1", "D /data/d2", "C /etc/motd", "C /keep", "C /lib",
        "D /lib/a", "A /lib/fresh", "D /lib/sub", "A /new", "D /old"]
    assert ok(root_cli(work, "diff", out["l1"], out["l2"])).splitlines() == [
        "C /data", "A /data/x", "C /etc", "C /etc/motd", "D /gone", "C /lib", "D /lib/fresh"]
    with Store.open(work / "store") as store:
        layers = Layers(store)
        own = {e.path: e for e in layers.entries(bytes.fromhex(out["l1"]))}
        assert own[b"old"].kind == WHITEOUT
        assert own[b"lib"].flags & OPAQUE and own[b"data"].flags & OPAQUE
        assert b"etc" not in own  # copied up only to hold etc/motd: not stored
        own2 = {e.path: e for e in layers.entries(bytes.fromhex(out["l2"]))}
        assert own2[b"gone"].kind == WHITEOUT and own2[b"lib/fresh"].kind == WHITEOUT
        assert own2[b"etc"].flags & OPAQUE
        for e in [*own.values(), *own2.values()]:
            # owners as the namespace saw them (its root is 0), no overlayfs xattrs
            assert (e.uid, e.gid) == (0, 0), e
            assert not any(name.startswith(b"user.overlay.") for name, _ in e.xattrs), e
    assert checkout_described(work, out["l2"]) == AFTER_L2
    assert checkout_described(work, out["l1"]) == AFTER_L1

    # the userns mode's lower directories live apart from root mode's
    cache = work / "store" / "cache"
    assert not (cache / "layers").exists()
    (userns_cache,) = (cache / "userns").iterdir()
    lowers = {p.name for p in (userns_cache / "layers").iterdir()}
    assert {out["l1"][:16], out["l2"][:16]} <= lowers

    # and gc's cache collection and drop_caches reach them
    with Store.open(work / "store") as store:
        live = set(Layers(store).all_ids()) - {bytes.fromhex(out["l2"])}
    overlay.collect_caches(work / "store", live)
    lowers = {p.name for p in (userns_cache / "layers").iterdir()}
    assert out["l1"][:16] in lowers and out["l2"][:16] not in lowers
    assert overlay.cache_bytes(work / "store") > 0
    overlay.drop_caches(work / "store")
    assert not cache.exists()


CLI_SESSION = r"""
set -e
mkdir "$HOME/mnt"
key=$($PL mount base "$HOME/mnt" --rw)
$PL snapshots
echo edited >> "$HOME/mnt/etc/motd"
rm "$HOME/mnt/old"
rm -rf "$HOME/mnt/lib" && mkdir "$HOME/mnt/lib" && echo fresh > "$HOME/mnt/lib/fresh"
$PL umount "$HOME/mnt"
$PL commit "$key" --tag t -m "made in a user namespace"
$PL mount t "$HOME/mnt" >/dev/null
cat "$HOME/mnt/etc/motd" "$HOME/mnt/lib/fresh"
$PL umount "$HOME/mnt"
$PL du --json
"""


def test_cli_session_in_one_unshare(ctx, work):
    """`pylayers mount`, `umount` and `commit` in one `unshare -Urm sh -c` session (a
    private mount namespace's mounts end with its last process)."""
    make_base(ctx, work)
    out = ok(in_userns(ctx, work, ["sh", "-c", CLI_SESSION]))
    assert " active    overlay " in out
    assert "hello\nedited\nfresh\n" in out
    du = json.loads(out[out.index("{"):])
    assert du["cache_bytes"] > 0
    assert ok(root_cli(work, "diff", "base", "t")).splitlines() == [
        "C /etc/motd", "C /lib", "D /lib/a", "A /lib/fresh", "D /lib/sub", "D /old"]
    assert ok(root_cli(work, "cat", "t", "/etc/motd")) == "hello\nedited\n"
    assert "made in a user namespace" in ok(root_cli(work, "show", "t"))
    assert ok(root_cli(work, "fsck")) == ""


@pytest.mark.parametrize("owner, what", [((1000, 0), "uid 1000"), ((0, 1001), "gid 1001")])
def test_unmapped_owner_is_a_one_line_error(ctx, work, owner, what):
    """As rootless podman: a layer owning an id the namespace does not map cannot be
    mounted. One line, exit 1, and nothing half made left behind."""
    make_base(ctx, work, owner=owner)
    (work / "mnt").mkdir()
    os.chown(work / "mnt", ctx.uid, ctx.uid)
    res = in_userns(ctx, work, ["sh", "-c", '$PL mount base "$HOME/mnt" --rw'])
    line = fails(res, f"{what} is not mapped in this user namespace", "/etc/motd")
    assert "unshare" not in line
    layers_dirs = list((work / "store" / "cache").glob("userns/*/layers"))
    assert all(list(d.iterdir()) == [] for d in layers_dirs), layers_dirs
    assert ok(root_cli(work, "snapshots")) == ""
    assert list((work / "store" / "snapshots").iterdir()) == []
    # the copy driver says the same
    res = in_userns(ctx, work, ["sh", "-c", '$PL mount base "$HOME/mnt" --rw --driver copy'])
    fails(res, f"{what} is not mapped in this user namespace", "/etc/motd")
    assert ok(root_cli(work, "snapshots")) == ""


def test_overlay_xattrs_in_content_are_refused(ctx, work):
    """user.overlay.* is overlayfs's own namespace in userxattr mode: a layer holding
    such an xattr cannot be a lower directory, and is not silently changed."""
    make_base(ctx, work, xattr=("user.overlay.mine", b"1"))
    (work / "mnt").mkdir()
    os.chown(work / "mnt", ctx.uid, ctx.uid)
    res = in_userns(ctx, work, ["sh", "-c", '$PL mount base "$HOME/mnt" --rw'])
    fails(res, "/lib/a", "user.overlay.mine", "userxattr")
    assert ok(root_cli(work, "snapshots")) == ""


DRIVER_SCRIPT = """
    store = sys.argv[1]
    out = {"euid": os.geteuid(), "overlay": OverlayDriver.unavailable()}
    with Store.open(store) as s:
        layers = Layers(s)
        out["auto"] = get_driver(None, layers).name
        try:
            get_driver("overlay", layers)
        except Exception as e:
            out["asked"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out))
"""


def test_without_a_mount_namespace_overlay_is_unavailable(ctx, work):
    """`unshare -Ur` without -m: root in a user namespace that does not own the mount
    namespace cannot mount; the driver says why and the automatic choice is copy."""
    make_base(ctx, work)
    res = _run([*ctx.prefix, "unshare", "-Ur", PY, "-c",
                PRELUDE + textwrap.dedent(DRIVER_SCRIPT), str(work / "store")],
               cwd=work, env=env_for(work))
    out = json.loads(ok(res))
    assert out["euid"] == 0 and out["auto"] == "copy"
    assert "does not own its mount namespace" in out["overlay"]
    assert "unshare -Urm" in out["overlay"] and "copy driver" in out["overlay"]
    assert out["asked"].startswith("InvalidArgument: driver overlay is not available")


def test_plain_non_root(ctx, work):
    """uid 65534 without a user namespace: overlay is unavailable, with the reason (run
    inside `unshare -Urm`); the automatic choice is copy, whose checkout of root-owned
    files fails with one line."""
    if ctx.uid == 0:
        pytest.skip(f"no non-root user can run this interpreter here ({ctx.note})")
    make_base(ctx, work)
    res = as_plain_user(work, [PY, "-c", PRELUDE + textwrap.dedent(DRIVER_SCRIPT),
                               str(work / "store")])
    out = json.loads(ok(res))
    assert out["euid"] == NOBODY and out["auto"] == "copy"
    assert "needs root" in out["overlay"] and "unshare -Urm" in out["overlay"]
    assert "\n" not in out["overlay"]
    (work / "mnt").mkdir()
    os.chown(work / "mnt", ctx.uid, ctx.uid)
    pl = [PY, "-m", "pylayers", "--store", str(work / "store")]
    res = as_plain_user(work, [*pl, "mount", "base", str(work / "mnt"), "--rw",
                               "--driver", "overlay"])
    fails(res, "driver overlay is not available", "unshare -Urm", code=6)
    res = as_plain_user(work, [*pl, "mount", "base", str(work / "mnt"), "--rw"])
    fails(res, "cannot make uid 0, gid 0 the owner of /", "only root")
    assert ok(root_cli(work, "snapshots")) == ""


def test_snapshot_is_used_only_in_its_mode(ctx, work):
    """A writable snapshot made in a user namespace holds user.overlay.* markers and
    owners as that namespace maps them: root outside it may not commit it (one line,
    nothing changed), the namespace still can."""
    make_base(ctx, work)
    script = 'mkdir "$HOME/mnt" && $PL mount base "$HOME/mnt" --rw && rm "$HOME/mnt/old" ' \
             '&& $PL umount "$HOME/mnt" >/dev/null'
    key = ok(in_userns(ctx, work, ["sh", "-c", script])).strip()
    fails(root_cli(work, "commit", key), "userxattr mode", "user namespace", code=5)
    assert ok(root_cli(work, "snapshots")).split()[:3] == [key, "active", "overlay"]
    layer = ok(in_userns(ctx, work, ["sh", "-c", f"$PL commit {key}"])).strip()
    assert ok(root_cli(work, "diff", "base", layer)).splitlines() == ["D /old"]


# The conformance suite's overlay tests (tests/conformance/test_overlay.py) that need
# root in the initial user namespace.
ROOT_ONLY = {
    "type_changes": "makes device nodes (CAP_MKNOD)",
    "driver_neutral": "its layer holds a device node",
    "xattrs_and_ownership": "sets trusted.* xattrs",
    "user_overlay_xattrs": "user.overlay.* as content: root mode only (refused here, "
                           "see test_overlay_xattrs_in_content_are_refused)",
}


def test_conformance_suite_in_userxattr_mode(tmp_path):
    """tests/conformance's overlay tests, all in one pytest run as root inside a user
    and mount namespace mapping ids 0-65535 to themselves (their layers own many ids,
    which `unshare -Urm` would not map; real root writes the wider map), so the driver
    is in userxattr mode. Those needing root in the initial namespace are left out. An
    inner test may skip only because a tool is missing here (setfacl, say)."""
    ctx = probe()
    if isinstance(ctx, str):
        pytest.skip(ctx)
    repo = Path(__file__).resolve().parents[1]
    check = "from pylayers.mounts.overlay import overlay_mode; print(overlay_mode()[0])"
    select = "not (" + " or ".join(ROOT_ONLY) + ")"
    junit = tmp_path / "inner.xml"
    cmds = {"mode": [PY, "-P", "-c", check],
            "suite": [PY, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                      f"--basetemp={tmp_path / 'inner'}", f"--junitxml={junit}", "-k", select,
                      str(repo / "tests" / "conformance" / "test_overlay.py")]}
    out = {}
    for name, cmd in cmds.items():
        r, w = os.pipe()  # the child waits on it until its maps are written
        proc = subprocess.Popen(["unshare", "-Um", "sh", "-c", 'read _; exec "$@" </dev/null',
                                 "sh", *cmd], cwd=repo, stdin=r,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        os.close(r)
        try:
            deadline = time.monotonic() + 10
            while os.readlink(f"/proc/{proc.pid}/ns/user") == os.readlink("/proc/self/ns/user"):
                assert time.monotonic() < deadline, "unshare did not make a user namespace"
                time.sleep(0.01)
            for kind in ("uid", "gid"):
                with open(f"/proc/{proc.pid}/{kind}_map", "w") as f:
                    f.write("0 0 65536\n")
            os.write(w, b"go\n")
        finally:
            os.close(w)
        out[name] = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, out[name][-3000:]
    assert out["mode"].strip() == "userxattr"
    summary = out["suite"].strip().splitlines()[-1]
    print(summary)
    assert re.match(r"\d+ passed, ", summary), out["suite"][-3000:]
    assert not re.search(r"failed|error", summary), out["suite"][-3000:]
    # a skip is fine only where a tool this machine lacks is why (the skip of a userns
    # test for any other reason is a failure of this test)
    skipped = [(case.get("name"), sk.get("message", ""))
               for case in ElementTree.parse(junit).iter("testcase")
               for sk in case.findall("skipped")]
    assert len(skipped) == int((re.search(r"(\d+) skipped", summary) or [0, 0])[1])
    bad = [(name, why) for name, why in skipped if not missing_tools_only(why)]
    assert not bad, f"skipped in user namespace mode: {bad}"
    for name, why in skipped:
        print(f"skipped {name}: {why}")


def missing_tools_only(reason: str) -> bool:
    """Whether a skip reason names only tools (as treeutil.need_tools words it: "X is
    not installed (Debian: P)") and each really is missing here."""
    tools = re.findall(r"(\S+) is not installed \(Debian: [\w.+-]+\)", reason)
    words = ", ".join(f"{t} is not installed (Debian: {p})" for t, p in re.findall(
        r"(\S+) is not installed \(Debian: ([\w.+-]+)\)", reason))
    return bool(tools) and words == reason and all(shutil.which(t) is None for t in tools)


def readme_block(section: str) -> str:
    """The first sh block of the README section `section`, as written."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    m = re.search(rf"^#+ {re.escape(section)}\n.*?```sh\n(.*?)```", text, re.S | re.M)
    assert m, f"the README lost its {section!r} recipe"
    return m.group(1)


def own_tree(ctx: Context, src: Path) -> None:
    """A small tree owned by the context's user, as that user would have made it."""
    for d in ("etc", "lib"):
        (src / d).mkdir(parents=True)
    (src / "etc" / "motd").write_text("hello\n")
    (src / "lib" / "a").write_text("a\n")
    os.chmod(src / "lib" / "a", 0o750)
    give(ctx, src)


def test_readme_rootless_recipe_on_a_base_snapshotted_by_the_same_user(ctx, work):
    """A user snapshots their own tree (files owned by their uid), then follows the
    README's "Mounting without root" recipe as written: inside `unshare -Urm` their id
    is 0 and theirs is the only one mapped. The lower directories show their files as
    the namespace's 0, and the commit stores them as their own uid again, so the
    layer checks out as that user, outside the namespace."""
    if ctx.uid == 0:
        pytest.skip(f"no non-root user can run this interpreter here ({ctx.note})")
    recipe = readme_block("Mounting without root")
    assert "set -e" in recipe or "sh -ec" in recipe  # the snippet stops on errors
    own_tree(ctx, work / "rootfs")
    env = {**env_for(work), "PYLAYERS_STORE": str(work / "store"),
           "PATH": f"{os.path.dirname(PY)}:{os.environ['PATH']}"}
    pl = [PY, "-m", "pylayers"]
    ok(_run([*SETPRIV, *pl, "snapshot", "rootfs", "--tag", "base"], cwd=work, env=env))
    res = _run([*SETPRIV, "sh", "-ec", recipe], cwd=work, env=env)
    assert res.returncode == 0, res.stderr
    assert ok(_run([*SETPRIV, *pl, "diff", "base", "v2"], cwd=work,
                   env=env)).splitlines() == ["C /etc/motd"]
    assert ok(_run([*SETPRIV, *pl, "cat", "v2", "/etc/motd"], cwd=work,
                   env=env)) == "hello\nhi\n"
    with Store.open(work / "store") as store:
        layers = Layers(store)
        tree = {e.path: e for e in layers.tree(layers.resolve("v2"))}
        assert {(e.uid, e.gid) for e in tree.values()} == {(ctx.uid, ctx.uid)}, tree
    ok(_run([*SETPRIV, *pl, "checkout", "v2", "out"], cwd=work, env=env))
    assert (work / "out" / "etc" / "motd").read_text() == "hello\nhi\n"
    assert os.stat(work / "out" / "lib" / "a").st_uid == ctx.uid
    assert os.listdir(work / "mnt") == []  # the mount went with the namespace's umount

    # more of the same: a replaced directory (opaque), a new file, a deleted one
    session = """
        key=$($PL mount v2 "$HOME/mnt" --rw)
        rm -rf "$HOME/mnt/lib" && mkdir "$HOME/mnt/lib" && echo x > "$HOME/mnt/lib/new"
        echo n > "$HOME/mnt/etc/new" && rm "$HOME/mnt/etc/motd"
        $PL umount "$HOME/mnt" >/dev/null
        $PL commit "$key" --tag v3
    """
    ok(in_userns(ctx, work, ["sh", "-ec", session]))
    assert ok(_run([*SETPRIV, *pl, "diff", "v2", "v3"], cwd=work, env=env)).splitlines() == [
        "C /etc", "D /etc/motd", "A /etc/new", "C /lib", "D /lib/a", "A /lib/new"]
    with Store.open(work / "store") as store:
        layers = Layers(store)
        own = {e.path: e for e in layers.entries(layers.resolve("v3"))}
        assert own[b"lib"].flags & OPAQUE and own[b"etc/motd"].kind == WHITEOUT
        assert {(e.uid, e.gid) for e in own.values() if e.kind != WHITEOUT} == \
            {(ctx.uid, ctx.uid)}, own


def test_copy_driver_without_mounting(ctx, work):
    """A plain user (no user namespace) mounts with the copy driver: nothing is
    mounted; the mount point, an empty directory, becomes a symbolic link to the
    snapshot's directory, and umount puts the empty directory back. mount(8)'s own
    refusal is what the library reports where a mount is attempted."""
    if ctx.uid == 0:
        pytest.skip(f"no non-root user can run this interpreter here ({ctx.note})")
    own_tree(ctx, work / "rootfs")
    env = {**env_for(work), "PYLAYERS_STORE": str(work / "store")}
    pl = [PY, "-m", "pylayers"]

    def user(*args: str) -> subprocess.CompletedProcess:
        return _run([*SETPRIV, *pl, *args], cwd=work, env=env)

    ok(user("snapshot", "rootfs", "--tag", "base"))
    (work / "mnt").mkdir()
    os.chown(work / "mnt", ctx.uid, ctx.uid)
    key = ok(user("mount", "base", "mnt", "--rw", "--driver", "copy")).strip()
    assert (work / "mnt").is_symlink()
    with open(work / "mnt" / "etc" / "motd", "a") as f:
        f.write("edited\n")
    os.unlink(work / "mnt" / "lib" / "a")
    fails(user("commit", key), f"is mounted at {work / 'mnt'}", "pylayers umount", code=5)
    assert ok(user("umount", "mnt")).strip() == key
    assert (work / "mnt").is_dir() and not (work / "mnt").is_symlink()
    assert os.listdir(work / "mnt") == []
    layer = ok(user("commit", key, "--tag", "edited")).strip().splitlines()[-1]
    assert ok(user("diff", "base", layer)).splitlines() == ["C /etc/motd", "C /lib", "D /lib/a"]
    # a view, with the default driver (copy, for a plain user)
    key = ok(user("mount", "edited", "mnt")).strip()
    assert (work / "mnt" / "etc" / "motd").read_text() == "hello\nedited\n"
    assert ok(user("umount", "mnt")) == ""
    assert not (work / "mnt").is_symlink() and os.listdir(work / "mnt") == []
    assert key not in ok(user("snapshots"))
    # the library, asked to really mount: mount(8)'s reason, not just "see dmesg"
    script = ("import sys\nfrom pylayers.mounts import Mount\nfrom pylayers.errors import "
              "PylayersError\ntry:\n    Mount('bind', 'rootfs', ['rbind', 'ro']).mount('mnt')\n"
              "except PylayersError as e:\n    print(e)\n")
    said = ok(_run([*SETPRIV, PY, "-c", script], cwd=work, env=env))
    assert "must be superuser" in said and "dmesg" not in said, said
