"""The stores compared, as small adapters with one interface.

Each adapter owns a directory (`root`) holding its repository (`root/repo`, the only
thing sized) and any client-side cache; it returns the commands to time, so the runner
times every tool the same way (a separate process, wall clock and peak RSS). Settings are
each tool's defaults unless the issue states otherwise, and `settings` records them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .proc import PY, Cmd, Run, check, tree_bytes

TARLAYERS = os.fspath(Path(__file__).with_name("tarlayers.py"))
TAR_C = "tar --xattrs -cf -"
TAR_X = "tar --xattrs --xattrs-include='*' --numeric-owner -xf -"


@dataclass
class Commit:
    name: str
    parent: str | None
    src: Path
    upper: Path | None = None  # the staged diff against the parent (tar diff layers)


def q(p: str | Path) -> str:
    return "'" + os.fspath(p).replace("'", "'\\''") + "'"


class Competitor:
    key = ""
    label = ""
    settings = ""
    needs: tuple[str, ...] = ()
    version_cmd: list[str] = []

    def __init__(self, root: Path) -> None:
        self.root = root
        self.repo = root / "repo"
        self.env: dict[str, str] = {}

    @classmethod
    def missing(cls) -> list[str]:
        return [t for t in cls.needs if shutil.which(t) is None]

    @classmethod
    def version(cls) -> str:
        if not cls.version_cmd:
            return ""
        try:
            p = subprocess.run(cls.version_cmd, capture_output=True, text=True, timeout=30,
                               cwd="/")
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"
        text = p.stdout or p.stderr or ""
        m = re.search(r"\d+\.\d+(?:\.\d+)?", text) or re.search(r"\b\d+\b", text)
        return m.group(0) if p.returncode == 0 and m else "unknown"

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.repo.mkdir()

    def commit(self, c: Commit) -> Cmd:
        raise NotImplementedError

    def committed(self, c: Commit, r: Run) -> None:
        """Called after a timed commit (to note ids)."""

    def checkout(self, name: str, dest: Path) -> Cmd:
        """A command restoring layer `name` into `dest` (which does not exist)."""
        raise NotImplementedError

    def size(self) -> tuple[int, int]:
        return tree_bytes(self.repo)

    def cmd(self, argv: list[str] | str, cwd: str | Path = "/") -> Cmd:
        return Cmd(argv, cwd, self.env)


class Pylayers(Competitor):
    key, label = "pylayers", "pylayers"
    settings = ("defaults: FastCDC 16/64/256 KiB, 4 MiB zstd level 3 frames (x86 frames "
                "through the call filter), patch and zstd deltas; snapshot --parent")
    version_cmd = [PY, "-m", "pylayers", "--version"]

    def _pl(self, *args: str) -> list[str]:
        return [PY, "-m", "pylayers", "--store", os.fspath(self.repo), *args]

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        check(self._pl("init"))

    def commit(self, c: Commit) -> Cmd:
        parent = ["--parent", c.parent] if c.parent else []
        return self.cmd(self._pl("snapshot", os.fspath(c.src), "--tag", c.name, *parent))

    def checkout(self, name: str, dest: Path) -> Cmd:
        return self.cmd(self._pl("checkout", name, os.fspath(dest)))

    def self_reported(self) -> dict:
        """`pylayers du --json`, and the store's bytes split into packs and index."""
        import json
        usage = json.loads(check(self._pl("du", "--json")))
        usage["packs_bytes"] = tree_bytes(self.repo / "packs")[0]
        usage["index_bytes"] = tree_bytes(self.repo / "index")[0]
        return usage


class TarDiff(Competitor):
    """Docker's layer layout: one compressed tar of each layer's diff, whiteouts as
    `.wh.NAME` files, no sharing between layers; a restore applies the whole chain."""

    codec = ""
    compress = ""
    ext = ""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.parents: dict[str, str | None] = {}

    def commit(self, c: Commit) -> Cmd:
        assert c.upper is not None
        self.parents[c.name] = c.parent
        out = self.repo / f"{c.name}.tar.{self.ext}"
        return self.cmd(f"{TAR_C} -C {q(c.upper)} . | {self.compress} > {q(out)}")

    def checkout(self, name: str, dest: Path) -> Cmd:
        chain: list[str] = []
        n: str | None = name
        while n is not None:
            chain.append(os.fspath(self.repo / f"{n}.tar.{self.ext}"))
            n = self.parents[n]
        return self.cmd([PY, TARLAYERS, "apply", os.fspath(dest), self.codec,
                         *reversed(chain)])


class TarDiffGzip(TarDiff):
    key, label = "tar-diff-gzip", "tar diff + gzip (Docker)"
    settings = "gzip -6 (Docker's default level), one thread"
    needs = ("tar", "gzip")
    codec, compress, ext = "gzip", "gzip -c", "gz"
    version_cmd = ["gzip", "--version"]


class TarDiffPigz(TarDiff):
    key, label = "tar-diff-pigz", "tar diff + pigz"
    settings = "pigz -6, all cores"
    needs = ("tar", "pigz")
    codec, compress, ext = "pigz", "pigz -c", "gz"
    version_cmd = ["pigz", "--version"]


class TarDiffZstd(TarDiff):
    key, label = "tar-diff-zstd", "tar diff + zstd -3"
    settings = "zstd -3, one thread (the CLI's default)"
    needs = ("tar", "zstd")
    codec, compress, ext = "zstd", "zstd -3 -q -c", "zst"
    version_cmd = ["zstd", "--version"]


class TarFullZstd(Competitor):
    key, label = "tar-full-zstd", "full image tar + zstd -3"
    settings = "a full tarball of every version, zstd -3"
    needs = ("tar", "zstd")
    version_cmd = ["tar", "--version"]

    def commit(self, c: Commit) -> Cmd:
        out = self.repo / f"{c.name}.tar.zst"
        return self.cmd(f"{TAR_C} -C {q(c.src)} . | zstd -3 -q -c > {q(out)}")

    def checkout(self, name: str, dest: Path) -> Cmd:
        f = self.repo / f"{name}.tar.zst"
        return self.cmd(f"mkdir -p {q(dest)} && zstd -dcq {q(f)} | {TAR_X} -C {q(dest)}")


class OSTree(Competitor):
    mode = ""
    needs = ("ostree",)
    version_cmd = ["ostree", "--version"]

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        check(["ostree", "init", f"--repo={self.repo}", f"--mode={self.mode}"])

    def commit(self, c: Commit) -> Cmd:
        return self.cmd(["ostree", "commit", f"--repo={self.repo}", f"--branch={c.name}",
                         f"--tree=dir={c.src}"])

    def checkout(self, name: str, dest: Path) -> Cmd:
        return self.cmd(["ostree", "checkout", f"--repo={self.repo}", name, os.fspath(dest)])


class OSTreeBare(OSTree):
    key, label, mode = "ostree-bare", "OSTree bare", "bare"
    settings = "mode=bare (one uncompressed file per object); checkout hardlinks (default)"


class OSTreeArchive(OSTree):
    key, label, mode = "ostree-archive", "OSTree archive", "archive"
    settings = "mode=archive (one zlib-compressed file per object)"


class Casync(Competitor):
    key, label = "casync", "casync"
    settings = "defaults: 64 KiB average chunks, zstd, sha512-256"
    needs = ("casync",)
    version_cmd = ["casync", "--version"]

    @property
    def store(self) -> str:
        return f"--store={self.repo / 'default.castr'}"

    def commit(self, c: Commit) -> Cmd:
        return self.cmd(["casync", "make", self.store, os.fspath(self.repo / f"{c.name}.caidx"),
                         os.fspath(c.src)])

    def checkout(self, name: str, dest: Path) -> Cmd:
        return self.cmd(["casync", "extract", self.store,
                         os.fspath(self.repo / f"{name}.caidx"), os.fspath(dest)])


class Borg(Competitor):
    key, label = "borg", "borg"
    settings = "--encryption none, --compression zstd,3; client cache not counted"
    needs = ("borg",)
    version_cmd = ["borg", "--version"]

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.env = {"BORG_BASE_DIR": os.fspath(root / "home"), "BORG_PASSPHRASE": "",
                    "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                    "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        check(["borg", "init", "--encryption", "none", os.fspath(self.repo)], env=self.env)

    def commit(self, c: Commit) -> Cmd:
        return self.cmd(["borg", "create", "--compression", "zstd,3",
                         f"{self.repo}::{c.name}", "."], cwd=c.src)

    def checkout(self, name: str, dest: Path) -> Cmd:
        return self.cmd(f"mkdir -p {q(dest)} && cd {q(dest)} && "
                        f"borg extract {q(f'{self.repo}::{name}')}")


class Restic(Competitor):
    key, label = "restic", "restic"
    settings = "repository v2, compression auto (zstd); client cache not counted"
    needs = ("restic",)
    version_cmd = ["restic", "version"]

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.env = {"RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": os.fspath(root / "cache")}

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        check(["restic", "init", "-q", "-r", os.fspath(self.repo)], env=self.env)

    def commit(self, c: Commit) -> Cmd:
        return self.cmd(["restic", "-r", os.fspath(self.repo), "backup", "-q", "--host",
                         "bench", "--tag", c.name, "."], cwd=c.src)

    def checkout(self, name: str, dest: Path) -> Cmd:
        return self.cmd(["restic", "-r", os.fspath(self.repo), "restore", "-q", "latest",
                         "--host", "bench", "--tag", name, "--target", os.fspath(dest)])


ALL: list[type[Competitor]] = [Pylayers, TarDiffGzip, TarDiffPigz, TarDiffZstd, TarFullZstd,
                               OSTreeBare, OSTreeArchive, Casync, Borg, Restic]
BY_KEY = {c.key: c for c in ALL}
TAR_DIFF = (TarDiffGzip, TarDiffPigz, TarDiffZstd)
