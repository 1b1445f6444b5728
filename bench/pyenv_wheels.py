"""The realistic linear chain: a Python environment across versions, built by pip from
real wheels fetched once into a local cache (full mode only; quick mode never
downloads).

    python -m bench.pyenv_wheels fetch [--cache DIR]    # once, about 0.5 GB from PyPI

`install_version(cache, site, v)` builds version `v` in place the way an environment
evolves: version 0 is a fresh `pip install --target`, each later version upgrades only
the packages whose pins changed (`pip install --upgrade --no-deps`), and the old
versions' dist-info directories are removed as pip would in a virtualenv.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) \
    / "pylayers-bench" / "wheels"

_V0 = {
    "numpy": "1.26.0", "scipy": "1.11.2", "pandas": "2.1.0", "matplotlib": "3.8.0",
    "scikit-learn": "1.3.0", "pillow": "10.0.0", "sqlalchemy": "2.0.20",
    "requests": "2.31.0", "urllib3": "2.0.4", "certifi": "2023.7.22", "idna": "3.4",
    "charset-normalizer": "3.2.0", "python-dateutil": "2.8.2", "pytz": "2023.3",
    "tzdata": "2023.3", "six": "1.16.0", "packaging": "23.1", "pyparsing": "3.0.9",
    "kiwisolver": "1.4.5", "fonttools": "4.42.1", "cycler": "0.11.0", "contourpy": "1.1.0",
    "joblib": "1.3.2", "threadpoolctl": "3.2.0",
}
# Each version upgrades a few packages, in the order they were released.
_UPGRADES = [
    {"numpy": "1.26.1", "urllib3": "2.0.5", "fonttools": "4.43.0"},
    {"pandas": "2.1.1", "scipy": "1.11.3", "certifi": "2023.11.17", "packaging": "23.2"},
    {"matplotlib": "3.8.1", "scikit-learn": "1.3.1", "pillow": "10.1.0", "contourpy": "1.1.1"},
    {"numpy": "1.26.2", "pandas": "2.1.3", "sqlalchemy": "2.0.23", "urllib3": "2.1.0"},
    {"scipy": "1.11.4", "matplotlib": "3.8.2", "scikit-learn": "1.3.2", "pillow": "10.2.0",
     "fonttools": "4.47.0", "numpy": "1.26.3"},
]


def _versions() -> list[dict[str, str]]:
    out = [dict(_V0)]
    for up in _UPGRADES:
        out.append({**out[-1], **up})
    return out


VERSIONS = _versions()


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def pins() -> list[str]:
    return sorted({f"{n}=={v}" for env in VERSIONS for n, v in env.items()})


def fetch(cache: Path) -> None:
    """Download every pinned wheel once (pip skips what the cache has); one call per
    version, as one call cannot hold two pins of a package."""
    cache.mkdir(parents=True, exist_ok=True)
    for env in VERSIONS:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary=:all:", "-d", os.fspath(cache),
                        *[f"{n}=={v}" for n, v in sorted(env.items())]], check=True, cwd="/")


def have_all(cache: Path) -> bool:
    if not cache.is_dir():
        return False
    names = {canon(w.name.split("-")[0]) + "-" + w.name.split("-")[1]
             for w in cache.glob("*.whl")}
    return all(f"{canon(p.split('==')[0])}-{p.split('==')[1]}" in names for p in pins())


def _pip_install(cache: Path, site: Path, reqs: list[str], upgrade: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links",
           os.fspath(cache), "--no-deps", "--target", os.fspath(site)]
    if upgrade:
        cmd.append("--upgrade")
    subprocess.run([*cmd, *reqs], check=True, cwd="/")


def install_version(cache: Path, site: Path, v: int) -> None:
    env = VERSIONS[v]
    if v == 0:
        _pip_install(cache, site, [f"{n}=={x}" for n, x in sorted(env.items())], False)
        return
    prev = VERSIONS[v - 1]
    changed = {n: x for n, x in env.items() if prev.get(n) != x}
    _pip_install(cache, site, [f"{n}=={x}" for n, x in sorted(changed.items())], True)
    for d in site.glob("*.dist-info"):
        name, _, ver = d.name[: -len(".dist-info")].rpartition("-")
        for n, x in changed.items():
            if canon(name) == canon(n) and ver != x:
                shutil.rmtree(d)


def main() -> None:
    ap = argparse.ArgumentParser(description="fetch the wheels of the realistic chain")
    ap.add_argument("command", choices=["fetch", "check"])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = ap.parse_args()
    if args.command == "fetch":
        fetch(args.cache)
    print(f"{args.cache}: {'complete' if have_all(args.cache) else 'incomplete'}")


if __name__ == "__main__":
    main()
