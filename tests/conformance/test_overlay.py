"""The conformance suite (suite.py) for the overlay driver, and what is the overlay
driver's own: the options its writable mounts pin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pylayers.mounts.overlay import OverlayDriver

sys.path.insert(0, os.path.dirname(__file__))

from suite import Dir, File, run_chain, snapshotter_suite  # noqa: E402


def probe_overlay(base: Path) -> str | None:
    """None where an overlay mount works here, else mount(8)'s reason."""
    for d in ("lower", "upper", "work", "merged"):
        (base / d).mkdir()
    res = subprocess.run(["mount", "-t", "overlay", "-o", f"lowerdir={base / 'lower'},"
                          f"upperdir={base / 'upper'},workdir={base / 'work'}", "overlay",
                          str(base / "merged")], capture_output=True, text=True)
    if res.returncode == 0:
        subprocess.run(["umount", str(base / "merged")], capture_output=True)
        return None
    err = ((res.stderr or res.stdout).strip() or "failed").splitlines()[0]
    return f"cannot mount overlayfs here (mount: {err})"


globals().update(snapshotter_suite(OverlayDriver, breaks_hardlinks=True, probe=probe_overlay))


def test_overlay_upper_holds_plain_files(env):
    """The commit reads the upper directory as plain files: the overlay driver's
    writable mounts pin off redirect_dir and metacopy (some hosts default them on), so
    a renamed lower directory is copied and a chmod copies the data up."""
    (base,), _ = run_chain(env, [[Dir("d"), File("d/f", b"f")]], views=False)
    (mount,) = env.sn.prepare("k", base)
    # with userxattr (in a user namespace) the kernel refuses redirect_dir=off; nofollow
    # makes no redirects either
    redirect = "redirect_dir=nofollow" if "userxattr" in mount.options else "redirect_dir=off"
    assert {redirect, "metacopy=off", "index=off"} <= set(mount.options)
