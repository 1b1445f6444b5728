"""The scenarios: each one builds directories and yields, after each change, the layer
to commit (its name, its parent, the directory). The runner commits every competitor
before asking for the next step, so all of them see the same trees.

- chain: a Python environment upgraded package by package, an app edited between
  versions (tar diff layers are strong here: each holds only the upgraded packages);
- mutations: a base tree and versions under every synthetic mutation model;
- rebuild: a Dockerfile rebuilt after its early `apt-get install` line changed: every
  later layer is re-created, mostly with the same files (Docker's everyday cache bust);
- images: several images from different bases installing the same packages and app;
- bigfiles: a SQLite database and a disk image edited in place;
- smallfiles: many small files, a few per cent changing per version.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import datasets as ds
from .profiles import Profile

# Fixed mtimes for trees that stand for pulled images or a build context, so copies of
# them are identical down to their metadata.
EPOCH = 1_700_000_000


@dataclass
class Step:
    name: str
    parent: str | None
    src: Path
    what: str


def pin_mtimes(root: Path, when: int = EPOCH) -> None:
    for dirpath, dirs, files in os.walk(root, topdown=False):
        for n in files + dirs:
            os.utime(os.path.join(dirpath, n), (when, when), follow_symlinks=False)
    os.utime(root, (when, when))


def clone(src: Path, dest: Path) -> None:
    """A copy with new inodes and the same metadata (as an image's layers unpacked for
    a new build)."""
    subprocess.run(["cp", "-a", os.fspath(src), os.fspath(dest)], check=True)


class Scenario:
    key = ""
    title = ""

    def __init__(self, profile: Profile) -> None:
        self.p = profile

    def describe(self) -> str:
        return self.title

    def count(self) -> int:
        """How many steps `steps` yields."""
        raise NotImplementedError

    def checkout_targets(self, n: int) -> list[int]:
        """Indices of the steps to restore: a version in the middle and the last."""
        return sorted({n // 2, n - 1})

    def steps(self, data: Path) -> Iterator[Step]:
        raise NotImplementedError


class Chain(Scenario):
    key = "chain"
    title = "linear chain: a Python env upgraded package by package, app edited"

    def describe(self) -> str:
        return (f"{self.p.env_versions} versions of a synthetic env of {self.p.env_packages} "
                f"packages ({self.p.env_bytes / ds.MiB:.0f} MiB) and an app; each version "
                "upgrades a few packages (pip rewrites every file of each) and edits the app")

    def count(self) -> int:
        return self.p.env_versions

    def steps(self, data: Path) -> Iterator[Step]:
        root = data / "env"
        site = root / "lib/python3.11/site-packages"
        pkgs = ds.py_packages(self.p.env_bytes, self.p.env_packages, seed=21)
        for pkg in pkgs:
            pkg.install(site, stamp=0)
        ds.write_tree(root, ds.app_tree(self.p.app_bytes, seed=22))
        yield Step("v0", None, root, "install every package, add the app")
        n = self.p.env_versions - 1
        for v in range(1, n + 1):
            for i in range(v - 1, len(pkgs), n):
                new = pkgs[i].upgraded(seed=1000 * v + i)
                new.install(site, stamp=v, old=pkgs[i])
                pkgs[i] = new
            ds.edit_app(root, seed=v)
            yield Step(f"v{v}", f"v{v - 1}", root, "upgrade a few packages, edit the app")


class WheelsChain(Scenario):
    """The realistic chain: real wheels, installed by pip (bench.pyenv_wheels)."""

    key = "chain-wheels"
    title = "linear chain: a real Python env (wheels from PyPI) upgraded, app edited"

    def __init__(self, profile: Profile, cache: Path) -> None:
        super().__init__(profile)
        self.cache = cache

    def describe(self) -> str:
        from .pyenv_wheels import VERSIONS
        return (f"{len(VERSIONS)} versions of a Python env built by pip from real wheels "
                "(numpy, scipy, pandas, matplotlib, scikit-learn, ...), an app edited")

    def count(self) -> int:
        from .pyenv_wheels import VERSIONS
        return len(VERSIONS)

    def steps(self, data: Path) -> Iterator[Step]:
        from .pyenv_wheels import VERSIONS, install_version
        root = data / "env"
        ds.write_tree(root, ds.app_tree(self.p.app_bytes, seed=22))
        for v in range(len(VERSIONS)):
            install_version(self.cache, root / "lib/python3.11/site-packages", v)
            if v:
                ds.edit_app(root, seed=v)
            yield Step(f"v{v}", f"v{v - 1}" if v else None, root, "pip install / upgrade")


class Mutations(Scenario):
    key = "mutations"
    title = "synthetic mutation models"

    def __init__(self, profile: Profile, size: int | None = None,
                 versions: int | None = None, key: str | None = None) -> None:
        super().__init__(profile)
        self.size = size or profile.synth_bytes
        self.versions = versions or profile.synth_versions
        if key:
            self.key = key

    def describe(self) -> str:
        return (f"a {self.size / ds.MiB:.0f} MiB tree and {self.versions - 1} later versions, each "
                "with small edits inside large files, appended logs, renames, chmod-only "
                "changes, deleted and added files and directories, duplicated files")

    def count(self) -> int:
        return self.versions

    def checkout_targets(self, n: int) -> list[int]:
        """The first too: restoring 1, n/2 and n layers shows how chains scale."""
        return sorted({0, n // 2, n - 1})

    def steps(self, data: Path) -> Iterator[Step]:
        root = data / "tree"
        ds.synthetic_base(root, self.size, seed=31)
        yield Step("v0", None, root, "base tree")
        for v in range(1, self.versions):
            ds.Mutator(root, seed=v).version()
            yield Step(f"v{v}", f"v{v - 1}", root, "all mutation models")


class LayerChain(Mutations):
    """A long chain of a small tree, restored at several chain lengths."""

    def __init__(self, profile: Profile) -> None:
        super().__init__(profile, size=profile.layers_bytes,
                         versions=max(profile.layer_counts), key="layers")

    def checkout_targets(self, n: int) -> list[int]:
        return [k - 1 for k in self.p.layer_counts]


class Scaling(Scenario):
    """One tree per size (1x, 4x, 16x by default), each snapshotted and changed once,
    all into the same stores; per-size store growth is the size difference."""

    key = "scaling"
    title = "scaling with data size"

    def describe(self) -> str:
        sizes = ", ".join(f"{s * self.p.scale_base_bytes / ds.MiB:.0f}"
                          for s in self.p.scales)
        return (f"synthetic trees of {sizes} MiB, each snapshotted, changed by every "
                "mutation model and snapshotted again")

    def count(self) -> int:
        return 2 * len(self.p.scales)

    def checkout_targets(self, n: int) -> list[int]:
        if not self.p.scale_checkouts:
            return []
        return [2 * i + 1 for i in range(len(self.p.scales))]

    def steps(self, data: Path) -> Iterator[Step]:
        for s in self.p.scales:
            root = data / f"x{s}"
            ds.synthetic_base(root, self.p.scale_base_bytes * s, seed=3100 + s)
            yield Step(f"x{s}-v0", None, root, f"{s}× tree")
            ds.Mutator(root, seed=3200 + s).version()
            yield Step(f"x{s}-v1", f"x{s}-v0", root, "all mutation models")


class Rebuild(Scenario):
    key = "rebuild"
    title = "rebuilds after a cache bust"

    def describe(self) -> str:
        p = self.p
        copy = "; COPY app" if p.app_layer else " and COPY app (one layer)"
        return (f"FROM base ({p.base_bytes / ds.MiB:.0f} MiB); RUN apt-get install "
                f"({p.apt_bytes / ds.MiB:.0f} MiB); RUN pip install "
                f"({p.pip_bytes / ds.MiB:.0f} MiB){copy}; built {p.rebuilds} times, the "
                "apt-get line changed each time so every later layer is re-created")

    def count(self) -> int:
        return 1 + self.p.rebuilds * (3 if self.p.app_layer else 2)

    def steps(self, data: Path) -> Iterator[Step]:
        base = data / "base"
        ds.write_tree(base, ds.os_base(self.p.base_bytes, seed=41))
        pin_mtimes(base)
        yield Step("base", None, base, "the pulled base image")
        pkgs = ds.py_packages(self.p.pip_bytes, 12, seed=42)
        app = data / "context"
        ds.write_tree(app, ds.app_tree(self.p.app_bytes, seed=43))
        pin_mtimes(app)
        for b in range(self.p.rebuilds):
            work = data / f"build{b}"
            clone(base, work)
            ds.write_tree(work, ds.system_packages(self.p.apt_bytes, seed=44, prefix="libx"))
            ds.write_tree(work, ds.system_packages(self.p.apt_bytes // 10, seed=450 + b,
                                                   prefix=f"extra{b}_"))
            with open(work / "var/lib/dpkg/status", "ab") as f:
                f.write(ds.generate(ds.TEXT, 4000, 460 + b))
            yield Step(f"b{b}-apt", "base", work, "RUN apt-get install (changed line)")
            site = work / "usr/local/lib/python3.11/site-packages"
            for pkg in pkgs:
                pkg.install(site, stamp=b)
            if self.p.app_layer:
                yield Step(f"b{b}-pip", f"b{b}-apt", work, "RUN pip install (same packages)")
            if b:
                ds.edit_app(app, seed=470 + b, edits=2)
            subprocess.run(["cp", "-a", f"{app}/.", os.fspath(work)], check=True)
            if self.p.app_layer:
                yield Step(f"b{b}-app", f"b{b}-pip", work, "COPY app")
            else:
                yield Step(f"b{b}-pip", f"b{b}-apt", work, "RUN pip install (same packages), "
                           "COPY app")
            if b < self.p.rebuilds - 1:
                shutil.rmtree(work)


class Images(Scenario):
    key = "images"
    title = "several images from different bases, same packages"

    SHARES = (0.15, 1.0, 0.5, 0.3, 0.8, 0.6, 0.4, 0.2)

    def describe(self) -> str:
        return (f"{self.p.images} images, each FROM a different base (up to "
                f"{self.p.base_bytes / ds.MiB:.0f} MiB), RUN pip install of the same "
                f"{self.p.pip_bytes / ds.MiB:.0f} MiB of packages, COPY the same app"
                + ("" if self.p.app_layer else " (in the pip layer)"))

    def count(self) -> int:
        return self.p.images * (3 if self.p.app_layer else 2)

    def steps(self, data: Path) -> Iterator[Step]:
        pkgs = ds.py_packages(self.p.pip_bytes, 12, seed=42)
        app = data / "context"
        ds.write_tree(app, ds.app_tree(self.p.app_bytes, seed=43))
        pin_mtimes(app)
        for i in range(self.p.images):
            work = data / f"image{i}"
            share = self.SHARES[i % len(self.SHARES)]
            ds.write_tree(work, ds.os_base(int(self.p.base_bytes * share), seed=50 + i))
            pin_mtimes(work, EPOCH + 86400 * i)
            yield Step(f"i{i}-base", None, work, "a different base image")
            prefix = "usr/local/lib" if i % 2 else "usr/lib"
            for pkg in pkgs:
                pkg.install(work / prefix / "python3.11/site-packages", stamp=100 + i)
            if self.p.app_layer:
                yield Step(f"i{i}-pip", f"i{i}-base", work, "RUN pip install (same packages)")
            subprocess.run(["cp", "-a", f"{app}/.", os.fspath(work)], check=True)
            if self.p.app_layer:
                yield Step(f"i{i}-app", f"i{i}-pip", work, "COPY app (same files)")
            else:
                yield Step(f"i{i}-pip", f"i{i}-base", work, "RUN pip install (same packages), "
                           "COPY app (same files)")
            if i < self.p.images - 1:
                shutil.rmtree(work)


class BigFiles(Scenario):
    key = "bigfiles"
    title = "large files edited in place (SQLite database, disk image)"

    def describe(self) -> str:
        return (f"a {self.p.sqlite_bytes / ds.MiB:.0f} MiB SQLite database (0.5% of rows "
                "updated, inserted, a few deleted per version) and a "
                f"{self.p.disk_bytes / ds.MiB:.0f} MiB disk image (32 scattered 4 KiB writes "
                f"and a 256 KiB write per version), {self.p.big_versions} versions")

    def count(self) -> int:
        return self.p.big_versions

    def steps(self, data: Path) -> Iterator[Step]:
        root = data / "vm"
        ds.make_sqlite(root / "db/app.sqlite", self.p.sqlite_bytes, seed=61)
        ds.make_disk_image(root / "images/disk.img", self.p.disk_bytes, seed=62)
        yield Step("v0", None, root, "create")
        for v in range(1, self.p.big_versions):
            ds.update_sqlite(root / "db/app.sqlite", seed=600 + v)
            ds.edit_disk_image(root / "images/disk.img", seed=700 + v)
            yield Step(f"v{v}", f"v{v - 1}", root, "edit in place")


class SmallFiles(Scenario):
    key = "smallfiles"
    title = "many small files (1-8 KiB)"

    def describe(self) -> str:
        return (f"{self.p.small_files} files of 1-8 KiB, {self.p.small_versions} versions "
                "with 1% edited, 0.5% deleted and 0.5% added")

    def count(self) -> int:
        return self.p.small_versions

    def steps(self, data: Path) -> Iterator[Step]:
        root = data / "small"
        ds.small_files(root, self.p.small_files, seed=71)
        yield Step("v0", None, root, "create")
        for v in range(1, self.p.small_versions):
            ds.churn_small_files(root, seed=800 + v)
            yield Step(f"v{v}", f"v{v - 1}", root, "churn")


def main_scenarios(profile: Profile, wheel_cache: Path | None) -> list[Scenario]:
    real: list[Scenario] = [WheelsChain(profile, wheel_cache)] if wheel_cache else []
    every = [*real, Chain(profile), Rebuild(profile), Images(profile), BigFiles(profile),
             Mutations(profile), SmallFiles(profile)]
    return [s for s in every if s.key in profile.scenarios]
