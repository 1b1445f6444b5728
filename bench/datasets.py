"""Dataset generators and mutation models, all reproducible from seeds.

Trees are written from `Spec`s (bench.content), so the same seed gives the same bytes.
What is here:

- `PyPackage`: a synthetic installed Python package (modules, .pyc files whose header
  holds the install stamp, extension modules, data, dist-info), with `upgraded()`
  modelling a release (most modules unchanged, some edited, a few added or removed,
  extension modules rebuilt) and `install()` modelling pip (every file rewritten);
- `os_base`, `system_packages`, `app_tree`: an OS base image, apt-style packages and an
  application source tree, as file maps;
- `Mutator`: the synthetic mutation models applied to a tree in place (small edits inside
  large files, appended logs, renames, chmod-only changes, deletions and additions,
  duplicated files);
- `make_sqlite` / `update_sqlite` and `make_disk_image` / `edit_disk_image`: large binary
  files edited in place;
- `small_files` / `churn_small_files`: many small files.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .content import BINARY, RANDOM, TEXT, Spec, apply_edits, generate, render

MiB = 1 << 20


@dataclass(frozen=True)
class FileSpec:
    spec: Spec
    mode: int = 0o644


def write_file(path: Path, f: FileSpec) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(render(f.spec))
    os.chmod(path, f.mode)


def write_tree(root: Path, files: dict[str, FileSpec]) -> None:
    for rel in sorted(files):
        write_file(root / rel, files[rel])


def _sizes(rng: np.random.Generator, total: int, mean: int, lo: int = 64) -> list[int]:
    """Log-normal file sizes adding up to about `total`."""
    out: list[int] = []
    left = total
    while left > 0:
        s = max(lo, int(rng.lognormal(np.log(mean), 0.9)))
        s = min(s, left) if left > lo else left
        out.append(s)
        left -= s
    return out


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(1 << 62))


# -- Python packages -------------------------------------------------------------------

@dataclass
class PyPackage:
    """An installed package: `files` maps paths under site-packages to content specs;
    .pyc files are listed without their stamp, which `install` adds."""

    name: str
    version: int
    files: dict[str, FileSpec] = field(default_factory=dict)

    @property
    def dist_info(self) -> str:
        return f"{self.name}-{self.version}.0.dist-info"

    @classmethod
    def create(cls, name: str, size: int, seed: int) -> PyPackage:
        rng = np.random.default_rng(seed)
        pkg = cls(name, 1)
        py_total = int(size * 0.40)
        for i, s in enumerate(_sizes(rng, py_total, 7000, lo=200)):
            sub = f"sub{i % 7}/" if i > 3 else ""
            mod = f"{name}/{sub}m{i:03}.py"
            pkg.files[mod] = FileSpec(Spec(TEXT, s, _seed(rng)))
            pkg.files[_pyc_of(mod)] = FileSpec(Spec(BINARY, max(64, int(s * 0.6)), _seed(rng)))
        so_total = int(size * 0.45)
        n_so = int(rng.integers(1, 4))
        for k in range(n_so):
            pkg.files[f"{name}/_ext{k}.cpython-311-x86_64-linux-gnu.so"] = FileSpec(
                Spec(BINARY, max(4096, so_total // n_so), _seed(rng)), 0o755)
        data_total = size - py_total - so_total
        for i, s in enumerate(_sizes(rng, data_total, 40000, lo=1000)):
            pkg.files[f"{name}/data/d{i:03}.bin"] = FileSpec(Spec(RANDOM, s, _seed(rng)))
        pkg._dist_info(rng)
        return pkg

    def _dist_info(self, rng: np.random.Generator) -> None:
        for k in [k for k in self.files if ".dist-info/" in k]:
            del self.files[k]
        d = self.dist_info
        self.files[f"{d}/METADATA"] = FileSpec(Spec(TEXT, int(rng.integers(2000, 20000)),
                                                    _seed(rng)))
        self.files[f"{d}/RECORD"] = FileSpec(Spec(TEXT, 90 * len(self.files), _seed(rng)))
        self.files[f"{d}/WHEEL"] = FileSpec(Spec(TEXT, 110, 7))
        self.files[f"{d}/INSTALLER"] = FileSpec(Spec(TEXT, 4, 8))
        self.files[f"{d}/top_level.txt"] = FileSpec(Spec(TEXT, len(self.name) + 1, 9))

    def upgraded(self, seed: int) -> PyPackage:
        """The next release: 70% of modules unchanged, 24% edited, 3% removed, 3% new;
        extension modules rebuilt; 90% of data files unchanged."""
        rng = np.random.default_rng(seed)
        new = PyPackage(self.name, self.version + 1)
        mods = [k for k in self.files if k.endswith(".py")]
        for mod in mods:
            f, r = self.files[mod], rng.random()
            if r < 0.03:
                continue
            if r < 0.27:
                new.files[mod] = FileSpec(f.spec.edited(_seed(rng), int(rng.integers(1, 6))))
                new.files[_pyc_of(mod)] = FileSpec(Spec(BINARY, max(64, int(f.spec.size * 0.6)),
                                                        _seed(rng)))
            else:
                new.files[mod] = f
                new.files[_pyc_of(mod)] = self.files[_pyc_of(mod)]
        for i in range(max(1, len(mods) * 3 // 100)):
            mod = f"{self.name}/sub{i % 7}/n{new.version}_{i:03}.py"
            s = int(rng.lognormal(np.log(7000), 0.9)) + 200
            new.files[mod] = FileSpec(Spec(TEXT, s, _seed(rng)))
            new.files[_pyc_of(mod)] = FileSpec(Spec(BINARY, int(s * 0.6), _seed(rng)))
        for k, f in self.files.items():
            if k.endswith(".so"):
                size = int(f.spec.size * rng.uniform(0.97, 1.05))
                new.files[k] = FileSpec(Spec(BINARY, size, _seed(rng)), f.mode)
            elif "/data/" in k:
                new.files[k] = f if rng.random() < 0.9 else FileSpec(
                    Spec(RANDOM, f.spec.size, _seed(rng)))
        new._dist_info(rng)
        return new

    def install(self, site: Path, stamp: int, old: PyPackage | None = None) -> None:
        """Like pip: remove the old version, write every file anew; .pyc headers carry
        the install stamp (pip compiles them with the source mtime in the header)."""
        if old is not None:
            old.uninstall(site)
        for rel, f in sorted(self.files.items()):
            if rel.endswith(".pyc"):
                f = FileSpec(f.spec.stamped(stamp), f.mode)
            write_file(site / rel, f)

    def uninstall(self, site: Path) -> None:
        shutil.rmtree(site / self.name, ignore_errors=True)
        shutil.rmtree(site / self.dist_info, ignore_errors=True)

    @property
    def size(self) -> int:
        return sum(f.spec.size for f in self.files.values())


def _pyc_of(mod: str) -> str:
    d, _, base = mod.rpartition("/")
    return f"{d}/__pycache__/{base[:-3]}.cpython-311.pyc"


def py_packages(total: int, count: int, seed: int) -> list[PyPackage]:
    """`count` packages of log-normal sizes adding up to about `total` bytes."""
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0, 1.2, count)
    sizes = (weights / weights.sum() * total).astype(int)
    return [PyPackage.create(f"pkg{i:02}", max(20000, int(s)), _seed(rng))
            for i, s in enumerate(sizes)]


# -- OS base, apt packages, application tree -------------------------------------------

def os_base(size: int, seed: int) -> dict[str, FileSpec]:
    """An OS base image: binaries and shared libraries (55%), documentation and locale
    text (35%), config files, the package database."""
    rng = np.random.default_rng(seed)
    files: dict[str, FileSpec] = {}
    for i, s in enumerate(_sizes(rng, int(size * 0.25), 60000, lo=2000)):
        files[f"usr/bin/b{seed % 1000:03}_{i:03}"] = FileSpec(Spec(BINARY, s, _seed(rng)), 0o755)
    for i, s in enumerate(_sizes(rng, int(size * 0.30), 200000, lo=4000)):
        files[f"usr/lib/x86_64-linux-gnu/lib{seed % 1000:03}_{i:03}.so.1"] = FileSpec(
            Spec(BINARY, s, _seed(rng)), 0o755)
    for i, s in enumerate(_sizes(rng, int(size * 0.35), 5000, lo=100)):
        files[f"usr/share/doc/p{i // 8:03}/f{i % 8}"] = FileSpec(Spec(TEXT, s, _seed(rng)))
    for i, s in enumerate(_sizes(rng, int(size * 0.05), 800, lo=20)):
        files[f"etc/c{i:03}.conf"] = FileSpec(Spec(TEXT, s, _seed(rng)))
    files["var/lib/dpkg/status"] = FileSpec(Spec(TEXT, int(size * 0.05), _seed(rng)))
    return files


def system_packages(size: int, seed: int, prefix: str) -> dict[str, FileSpec]:
    """apt-get install: binaries, libraries and docs of a few packages."""
    rng = np.random.default_rng(seed)
    files: dict[str, FileSpec] = {}
    for i, s in enumerate(_sizes(rng, int(size * 0.7), 150000, lo=4000)):
        files[f"usr/lib/x86_64-linux-gnu/{prefix}{i:03}.so"] = FileSpec(
            Spec(BINARY, s, _seed(rng)), 0o755)
    for i, s in enumerate(_sizes(rng, size - int(size * 0.7), 4000, lo=100)):
        files[f"usr/share/doc/{prefix}{i // 6:03}/f{i % 6}"] = FileSpec(Spec(TEXT, s, _seed(rng)))
    return files


def app_tree(size: int, seed: int) -> dict[str, FileSpec]:
    """Application sources (85%) and a few static assets."""
    rng = np.random.default_rng(seed)
    files: dict[str, FileSpec] = {}
    for i, s in enumerate(_sizes(rng, int(size * 0.85), 5000, lo=100)):
        files[f"app/src/mod{i // 20:02}/f{i:04}.py"] = FileSpec(Spec(TEXT, s, _seed(rng)))
    for i, s in enumerate(_sizes(rng, size - int(size * 0.85), 30000, lo=500)):
        files[f"app/static/a{i:03}.png"] = FileSpec(Spec(RANDOM, s, _seed(rng)))
    return files


def edit_app(root: Path, seed: int, edits: int = 5) -> None:
    """A developer's commit: a few files edited, one added, one removed."""
    rng = np.random.default_rng(seed)
    srcs = sorted((root / "app" / "src").rglob("*.py"))
    if not srcs:
        return
    for i in rng.choice(len(srcs), min(edits, len(srcs)), replace=False):
        p = srcs[int(i)]
        p.write_bytes(_edit_bytes(p.read_bytes(), rng))
    victim = srcs[int(rng.integers(len(srcs)))]
    if victim.exists():
        victim.unlink()
    new = root / "app" / "src" / f"mod{int(rng.integers(10)):02}" / f"new{seed % 100000:05}.py"
    write_file(new, FileSpec(Spec(TEXT, int(rng.integers(500, 8000)), _seed(rng))))


def _edit_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    return apply_edits(data, TEXT, _seed(rng), int(rng.integers(1, 4)))


# -- synthetic mutation models -------------------------------------------------------

def synthetic_base(root: Path, size: int, seed: int) -> None:
    """Large binary files (40%), logs (5%), sources (30%), assets (15%), docs (10%)."""
    rng = np.random.default_rng(seed)
    files: dict[str, FileSpec] = {}
    n_large = 3
    for i in range(n_large):
        files[f"large/blob{i}.dat"] = FileSpec(Spec(BINARY, int(size * 0.40) // n_large,
                                                    _seed(rng)))
    for i in range(4):
        files[f"logs/service{i}.log"] = FileSpec(Spec(TEXT, int(size * 0.05) // 4, _seed(rng)))
    for i, s in enumerate(_sizes(rng, int(size * 0.30), 6000, lo=100)):
        files[f"src/d{i // 40:03}/f{i:05}.txt"] = FileSpec(Spec(TEXT, s, _seed(rng)))
    for i, s in enumerate(_sizes(rng, int(size * 0.15), 120000, lo=2000)):
        files[f"assets/a{i:04}.jpg"] = FileSpec(Spec(RANDOM, s, _seed(rng)))
    for i, s in enumerate(_sizes(rng, int(size * 0.10), 8000, lo=100)):
        files[f"docs/p{i // 25:03}/doc{i:04}.md"] = FileSpec(Spec(TEXT, s, _seed(rng)))
    write_tree(root, files)


class Mutator:
    """The mutation models, applied in place to a tree; one `version()` call applies all
    of them with the rates given at construction."""

    def __init__(self, root: Path, seed: int, rate: float = 0.01) -> None:
        self.root = root
        self.rng = np.random.default_rng(seed)
        self.rate = rate

    def _files(self, under: str = "") -> list[Path]:
        base = self.root / under if under else self.root
        return sorted(p for p in base.rglob("*") if p.is_file() and not p.is_symlink())

    def _pick(self, files: list[Path], n: int) -> list[Path]:
        n = min(n, len(files))
        return [files[int(i)] for i in self.rng.choice(len(files), n, replace=False)]

    def small_edits_in_large_files(self, edits: int = 3) -> None:
        for p in self._files("large"):
            size = p.stat().st_size
            with open(p, "r+b") as f:
                for _ in range(edits):
                    n = int(self.rng.integers(100, 4096))
                    f.seek(int(self.rng.integers(0, max(1, size - n))))
                    f.write(generate(BINARY, n, _seed(self.rng)))

    def append_logs(self, fraction: float = 0.08) -> None:
        for p in self._files("logs"):
            n = max(1000, int(p.stat().st_size * fraction))
            with open(p, "ab") as f:
                f.write(generate(TEXT, n, _seed(self.rng)))

    def rename(self) -> None:
        src = self._files("src")
        for p in self._pick(src, max(1, int(len(src) * self.rate))):
            p.rename(p.with_name("r_" + p.name))

    def chmod_only(self, n: int = 10) -> None:
        for p in self._pick(self._files(), n):
            os.chmod(p, p.stat().st_mode ^ 0o020)

    def delete_and_add(self) -> None:
        src = self._files("src")
        n = max(1, int(len(src) * self.rate))
        for p in self._pick(src, n):
            p.unlink()
        dirs = sorted(d for d in (self.root / "docs").iterdir() if d.is_dir())
        if len(dirs) > 2:
            shutil.rmtree(dirs[int(self.rng.integers(len(dirs)))])
        for i in range(n):
            sub = self.root / "src" / f"d{int(self.rng.integers(0, 50)):03}"
            write_file(sub / f"new_{_seed(self.rng) % 10**9:09}_{i}.txt", FileSpec(
                Spec(TEXT, int(self.rng.lognormal(np.log(6000), 0.9)) + 100, _seed(self.rng))))

    def duplicate(self, n: int = 5) -> None:
        for i, p in enumerate(self._pick(self._files("src") + self._files("assets"), n)):
            shutil.copyfile(p, p.with_name(f"copy{i}_{_seed(self.rng) % 10**6:06}_{p.name}"))
        large = self._files("large")
        if large and self.rng.random() < 0.5:
            p = large[0]
            shutil.copyfile(p, self.root / "large" / f"backup_{_seed(self.rng) % 10**6:06}.dat")

    def version(self) -> None:
        self.small_edits_in_large_files()
        self.append_logs()
        self.rename()
        self.chmod_only()
        self.delete_and_add()
        self.duplicate()


# -- large files edited in place -----------------------------------------------------

def make_sqlite(path: Path, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.executescript("PRAGMA page_size=4096; PRAGMA journal_mode=DELETE;"
                     "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, body TEXT,"
                     " score REAL); CREATE INDEX items_name ON items(name);")
    rows = max(100, size // 330)
    _insert_rows(db, rng, 0, rows)
    db.commit()
    db.close()


def _insert_rows(db: sqlite3.Connection, rng: np.random.Generator, first: int, n: int) -> None:
    lens = rng.integers(100, 400, n)
    blob = generate(TEXT, int(lens.sum()), _seed(rng)).decode("ascii", "replace")
    names = generate(TEXT, 24 * n, _seed(rng)).decode("ascii", "replace")
    scores = rng.random(n)
    rows, off = [], 0
    for i in range(n):
        ln = int(lens[i])
        rows.append((first + i, names[24 * i:24 * i + 24], blob[off:off + ln], float(scores[i])))
        off += ln
    db.executemany("INSERT INTO items VALUES (?, ?, ?, ?)", rows)


def update_sqlite(path: Path, seed: int, fraction: float = 0.005) -> None:
    """Update, insert and delete about `fraction` of the rows each, in one transaction."""
    rng = np.random.default_rng(seed)
    db = sqlite3.connect(path)
    (n,) = db.execute("SELECT max(id) FROM items").fetchone()
    k = max(1, int(n * fraction))
    ids = rng.integers(0, n, k)
    bodies = generate(TEXT, 250 * k, _seed(rng)).decode("ascii", "replace")
    db.executemany("UPDATE items SET body = ?, score = score + 1 WHERE id = ?",
                   [(bodies[250 * i:250 * i + 250], int(x)) for i, x in enumerate(ids)])
    _insert_rows(db, rng, n + 1, k)
    gone = rng.integers(0, n, k // 4)
    db.executemany("DELETE FROM items WHERE id = ?", [(int(x),) for x in gone])
    db.commit()
    db.close()


BLOCK = 64 << 10


def make_disk_image(path: Path, size: int, seed: int) -> None:
    """64 KiB blocks: 30% zeros (free space), 30% binary, 25% text, 15% random."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for _ in range(size // BLOCK):
            r = rng.random()
            if r < 0.30:
                f.write(bytes(BLOCK))
            else:
                kind = BINARY if r < 0.60 else TEXT if r < 0.85 else RANDOM
                f.write(generate(kind, BLOCK, _seed(rng)))


def edit_disk_image(path: Path, seed: int, writes: int = 32) -> None:
    """`writes` scattered 4 KiB block writes and one 256 KiB file write, in place."""
    rng = np.random.default_rng(seed)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        for _ in range(writes):
            f.seek(int(rng.integers(0, size // 4096)) * 4096)
            f.write(generate(BINARY, 4096, _seed(rng)))
        f.seek(int(rng.integers(0, max(1, (size - (256 << 10)) // 4096))) * 4096)
        f.write(generate(TEXT, 256 << 10, _seed(rng)))


# -- many small files ----------------------------------------------------------------

def small_files(root: Path, count: int, seed: int) -> None:
    """`count` files of 1-8 KiB, text and binary, 100 to a directory."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        d = root / f"d{i // 1000:03}" / f"s{(i // 100) % 10}"
        if i % 100 == 0:
            d.mkdir(parents=True, exist_ok=True)
        kind = TEXT if i % 2 else BINARY
        (d / f"f{i % 100:02}").write_bytes(generate(kind, int(rng.integers(1024, 8193)),
                                                    _seed(rng)))


def churn_small_files(root: Path, seed: int, fraction: float = 0.01) -> None:
    """Edit `fraction` of the files, delete half as many, add half as many."""
    rng = np.random.default_rng(seed)
    files = sorted(p for p in root.rglob("f*") if p.is_file())
    k = max(2, int(len(files) * fraction))
    picks = [files[int(i)] for i in rng.choice(len(files), min(len(files), k + k // 2),
                                               replace=False)]
    for p in picks[:k]:
        p.write_bytes(_edit_bytes(p.read_bytes(), rng))
    for p in picks[k:]:
        p.unlink()
    for i in range(k // 2):
        d = files[int(rng.integers(len(files)))].parent
        (d / f"n{seed % 10**6:06}_{i}").write_bytes(generate(TEXT, int(rng.integers(1024, 8193)),
                                                             _seed(rng)))
