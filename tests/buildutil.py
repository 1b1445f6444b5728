"""What the build tests need from the machine: root, a static busybox to build images
from, and mount+PID namespaces for RUN. `needs_build` skips a test module with the
reason when something is missing."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

BUSYBOX = Path("/bin/busybox")
# The base image the build tests start from: busybox and its applet links, FROM scratch
# (a test's context holds a copy of BUSYBOX named `busybox`).
BUSYBOX_BASE = ('FROM scratch\nCOPY busybox /bin/busybox\n'
                'RUN ["/bin/busybox", "--install", "-s", "/bin"]\n')


def build_missing() -> str | None:
    """Why builds cannot run here, or None."""
    if os.geteuid() != 0:
        return "build steps mount snapshots: needs root"
    if not BUSYBOX.is_file():
        return "no static busybox at /bin/busybox (Debian: busybox-static)"
    if shutil.which("unshare") is None:
        return "no unshare (util-linux)"
    res = subprocess.run(["unshare", "--mount", "--pid", "--fork", "true"],
                         capture_output=True)
    if res.returncode != 0:
        return f"no mount+PID namespaces here: {res.stderr.decode().strip()}"
    return None


_why = build_missing()
needs_build = pytest.mark.skipif(_why is not None, reason=_why or "")
