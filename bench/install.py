"""Find the peer tools and, only when asked (`python -m bench --install`), install what
is missing: Debian packages with apt-get (as root), Python packages with pip into this
interpreter's environment. Whatever is still missing is reported as "not installed" and
its comparisons are skipped. The Python packages are pyproject.toml's `bench` extra
(`pip install '.[bench]'`); tests/test_bench.py holds the two lists in step."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

# executable -> Debian package
DEBIAN = {"ostree": "ostree", "casync": "casync", "borg": "borgbackup", "restic": "restic",
          "zstd": "zstd", "pigz": "pigz", "b3sum": "b3sum", "git": "git", "tar": "tar",
          "gzip": "gzip", "time": "time"}
# import name -> PyPI distribution
PYPI = {"matplotlib": "matplotlib", "pyfastcdc": "pyfastcdc", "fastcdc": "fastcdc",
        "numpy": "numpy"}


def missing_tools() -> list[str]:
    return [t for t in DEBIAN if shutil.which(t) is None]


def missing_modules() -> list[str]:
    return [m for m in PYPI if importlib.util.find_spec(m) is None]


def ensure(install: bool = False) -> dict[str, str]:
    """Install what is missing if allowed; {name: "not installed"} for what still is."""
    tools, mods = missing_tools(), missing_modules()
    if install and tools and os.geteuid() == 0 and shutil.which("apt-get"):
        pkgs = sorted({DEBIAN[t] for t in tools})
        print(f"installing Debian packages: {' '.join(pkgs)}", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *pkgs],
                       env=env, stdout=subprocess.DEVNULL, check=False)
    if install and mods:
        dists = [PYPI[m] for m in mods]
        print(f"installing from PyPI: {' '.join(dists)}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *dists], check=False)
        importlib.invalidate_caches()
    return {name: "not installed" for name in missing_tools() + missing_modules()}
