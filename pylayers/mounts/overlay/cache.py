"""The overlay driver's caches under STORE/cache: materialised lower directories
(`layers/<layer id prefix>`) and the file cache they hardlink into
(`files/<xx>/<key>`), one set per mode (root mode's is STORE/cache itself, each user
namespace mapping's STORE/cache/userns/<id>). Both are caches: dropped, they are
rebuilt from the store on the next mount."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def cache_root(store_path: Path) -> Path:
    return store_path / "cache"


def cache_sets(store_path: Path) -> list[Path]:
    """Every mode's cache directory (each holds layers/ and files/)."""
    root = cache_root(store_path)
    sets = [root]
    try:
        sets += sorted(p for p in (root / "userns").iterdir() if p.is_dir())
    except OSError:
        pass
    return sets


def _files(root: Path) -> Iterator[os.stat_result]:
    """lstat of every non-directory under `root` (those that vanish are skipped)."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            try:
                yield os.lstat(os.path.join(dirpath, f))
            except OSError:
                pass


def cache_bytes(store_path: Path) -> int:
    """Bytes the caches occupy on disk, each inode counted once."""
    seen: set[int] = set()
    total = 0
    for st in _files(cache_root(store_path)):
        if st.st_ino not in seen:
            seen.add(st.st_ino)
            total += st.st_blocks * 512
    return total


def drop_caches(store_path: Path) -> int:
    """Delete every materialised layer and the file cache; returns bytes freed."""
    freed = cache_bytes(store_path)
    shutil.rmtree(cache_root(store_path), ignore_errors=True)
    return freed


def collect_caches(store_path: Path, live_layers: set[bytes]) -> int:
    """Delete materialised layers whose layer is gone, then cached files no layer
    directory links to any more. Returns bytes freed (approx.)."""
    freed = 0
    live = {lid.hex()[:16] for lid in live_layers}
    for cache in cache_sets(store_path):
        layers_dir = cache / "layers"
        if layers_dir.exists():
            for d in layers_dir.iterdir():
                if d.name.split(".")[0] not in live or ".tmp" in d.name:
                    shutil.rmtree(d, ignore_errors=True)
        files_dir = cache / "files"
        if files_dir.exists():
            for sub in files_dir.iterdir():
                for f in sub.iterdir():
                    try:
                        st = f.lstat()
                        if st.st_nlink == 1:
                            f.unlink()
                            freed += st.st_blocks * 512
                    except OSError:  # another mode's cache this process may not touch
                        pass
    return freed


def unique() -> str:
    """A temporary name's suffix no other process or thread uses: threads of one
    process share its pid, and would write into (or delete) each other's files."""
    return f"{os.getpid()}-{os.urandom(6).hex()}"
