"""The index: the store's LMDB environment, its tables and their compaction.

LMDB must not be opened twice by one process, so environments are shared per path in a
process-wide registry, refcounted. `Index` is one user's handle on it: the tables
(store/tables.py), transactions, the page counts and the rewrite that drops free pages.

A user who may read the store but not write it cannot take a slot in LMDB's reader
table (index/lock.mdb); the index is then opened read-only without it, and the store
lock keeps writers from reusing pages under such a reader (docs/format.md, "Locking").
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import lmdb

from ..errors import StoreError
from .fsutil import fsync_dir, fsync_file
from .tables import TABLES, Tables

DB_NAMES = TABLES
MAP_SIZE = 1 << 40
# LMDB never shrinks its file: every commit copies the pages it changes, and the old
# copies stay in the file as free pages. A process closing the store rewrites the index
# (Index.compact) when free pages are at least this share of the file and this many
# bytes, and it can take the store lock exclusively without waiting; gc always does.
COMPACT_FREE_SHARE = 0.25
COMPACT_MIN_BYTES = 64 << 10
COMPACT_DIR = "index.compact"  # the rewritten index, before it replaces index/data.mdb

_envs: dict[str, tuple[lmdb.Environment, int]] = {}
_envs_lock = threading.Lock()


def _open_env(path: Path, readonly: bool = False) -> lmdb.Environment:
    # LMDB must not be opened twice by one process: share one Environment per path.
    key = os.path.realpath(path)
    with _envs_lock:
        if key in _envs:
            env, n = _envs[key]
            _envs[key] = (env, n + 1)
            return env
        try:
            if readonly:
                # the writers' map size: the index may grow while this reader has it
                env = lmdb.open(key, map_size=MAP_SIZE, max_dbs=len(DB_NAMES) + 2,
                                subdir=True, readonly=True, lock=False)
            else:
                env = lmdb.open(key, map_size=MAP_SIZE, max_dbs=len(DB_NAMES) + 2,
                                max_readers=1024, subdir=True, meminit=False)
        except lmdb.Error as e:
            raise StoreError(f"cannot open index {path}: {e}") from None
        if readonly:
            _envs[key] = (env, 1)
            return env
        # Free the reader slots of processes that died holding a read transaction (a
        # snapshot killed mid-way). LMDB resets the table only when no other process has
        # the index open; while such a slot lingers, pages freed after its snapshot are
        # never reused and the index file grows with every commit.
        try:
            env.reader_check()
        except lmdb.Error:
            pass
        _envs[key] = (env, 1)
        return env


def forget_environments() -> None:
    """In a forked child: close the environments inherited from the parent, unused (an
    environment must not cross a fork: its reader slot is the parent's), so that
    opening a store opens its index afresh. Closing one in the child frees only the
    child's reader slots (none) and its own mappings: the parent's are untouched."""
    global _envs_lock
    _envs_lock = threading.Lock()  # another thread of the parent may have held it
    for env, _n in _envs.values():
        try:
            env.close()
        except lmdb.Error:
            pass
    _envs.clear()


def _close_env(path: Path) -> None:
    key = os.path.realpath(path)
    with _envs_lock:
        env, n = _envs[key]
        if n == 1:
            del _envs[key]
            env.close()
        else:
            _envs[key] = (env, n - 1)


def _sole_user(path: Path) -> bool:
    """No other handle of this process has the index at `path` open."""
    with _envs_lock:
        return _envs[os.path.realpath(path)][1] == 1


def index_error(store_path: Path, e: lmdb.Error) -> StoreError:
    """An LMDB failure (a full disk, an I/O error) as one line; nothing was committed."""
    reason = str(e).split(": ", 1)[-1] or type(e).__name__
    reason = reason[:1].lower() + reason[1:]
    if reason == "input/output error":
        # LMDB reports a short write (the disk filled up mid-write) as EIO
        try:
            st = os.statvfs(store_path)
            if st.f_bavail * st.f_frsize < (1 << 20):
                reason = "no space left on device"
        except OSError:
            pass
    return StoreError(f"cannot update the index of the store at {store_path}: {reason}")


def create_index(store_path: Path, format_version: int) -> None:
    """Create the index's tables and record the format version (a new store)."""
    path = store_path / "index"
    env = _open_env(path)
    try:
        with env.begin(write=True) as txn:
            dbs = {name: env.open_db(name.encode(), txn=txn) for name in DB_NAMES}
            Tables(txn, dbs, True).meta.set_format_version(format_version)
    finally:
        _close_env(path)


class Index:
    """One handle on the index of the store at `store_path`; `close()` releases it.
    `open_tables()` after checking `format_version()`: an index of another version may
    lack tables, and must not get them."""

    def __init__(self, store_path: Path, readonly: bool = False) -> None:
        self.store_path = store_path
        self.path = store_path / "index"
        self.readonly = readonly
        self.env = _open_env(self.path, readonly)
        self.db: dict = {}

    def _open_dbs(self, names: tuple[str, ...]) -> dict:
        """Handles on existing tables, opened in one transaction. py-lmdb keeps a handle
        only when it is opened in a write transaction (or the environment is
        read-only): one write transaction, which writes nothing, instead of one per
        table."""
        if self.readonly:
            return {n: self.env.open_db(n.encode(), create=False) for n in names}
        with self.env.begin(write=True) as txn:
            return {n: self.env.open_db(n.encode(), txn=txn, create=False) for n in names}

    def format_version(self) -> bytes | None:
        try:
            meta = self._open_dbs(("meta",))["meta"]
        except lmdb.Error:
            return None
        with self.env.begin(db=meta) as txn:
            return txn.get(b"format_version")

    def open_tables(self) -> None:
        try:
            self.db = self._open_dbs(DB_NAMES)
        except lmdb.Error as e:
            raise StoreError(f"{self.store_path}: the index is missing a table ({e})") from None

    def close(self) -> None:
        _close_env(self.path)

    def begin(self, write: bool = False, buffers: bool = False
              ) -> tuple[lmdb.Transaction, Tables]:
        txn = self.env.begin(write=write, buffers=buffers)
        return txn, Tables(txn, self.db, write)

    def max_key_size(self) -> int:
        return self.env.max_key_size()

    # -- compaction ------------------------------------------------------------------
    def pages(self) -> tuple[int, int, int]:
        """(page size, pages in index/data.mdb, pages holding data). The difference is
        LMDB's free pages (and the pages of its list of them)."""
        stat = self.env.stat()

        def pages(s: dict) -> int:
            return s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]

        used = 2 + pages(stat)  # two meta pages, the main table (naming the others)
        with self.env.begin() as txn:
            for db in self.db.values():
                used += pages(txn.stat(db))
        return stat["psize"], self.env.info()["last_pgno"] + 1, used

    def compaction_due(self) -> bool:
        if not _sole_user(self.path):
            return False  # another Store of this process has the index open
        if (self.store_path / COMPACT_DIR).exists():
            return True  # a compaction was interrupted: finish cleaning up
        psize, total, used = self.pages()
        free = (total - used) * psize
        return free >= COMPACT_MIN_BYTES and free >= COMPACT_FREE_SHARE * total * psize

    def compact(self, min_free: int = 0) -> int:
        """Rewrite the index into a new file holding only its data, every table written
        in key order so its pages are full, and swap it in; returns the bytes saved.
        Skipped (0) when fewer than `min_free` bytes are free pages.

        The caller holds the store lock exclusively, so no other process has the index
        open (every process opens it only while holding the lock), and has no
        transaction open. Crash safety: the new file is written and fsynced in
        COMPACT_DIR, then renamed over index/data.mdb, which is atomic: a crash leaves
        the old index or the new one, both whole, and at most a stale COMPACT_DIR, which
        the next compaction removes. LMDB resets lock.mdb when the first process opens
        the environment, so the old lock file does not outlive the old data file."""
        index = self.path
        tmp = self.store_path / COMPACT_DIR
        if not _sole_user(index):
            return 0
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        psize, total, used = self.pages()
        if (total - used) * psize < min_free:
            return 0
        counts: dict[bytes, int] = {}
        with self.env.begin() as txn:
            names = [bytes(k) for k in txn.cursor().iternext(values=False)]
            if any(n.decode(errors="replace") not in self.db for n in names):
                return 0  # a table this pylayers does not know: leave it all alone
            for name in names:
                counts[name] = txn.stat(self.db[name.decode()])["entries"]
        tmp.mkdir()
        try:
            new = lmdb.open(os.fspath(tmp), map_size=MAP_SIZE, max_dbs=len(DB_NAMES) + 2,
                            subdir=True, lock=False, meminit=False)
            try:
                with self.env.begin() as src, new.begin(write=True) as dst:
                    for name in names:
                        db = new.open_db(name, txn=dst)
                        rows = src.cursor(self.db[name.decode()]).iternext()
                        dst.cursor(db).putmulti(rows, append=True)
                        if dst.stat(db)["entries"] != counts[name]:
                            raise StoreError(f"index compaction: table {name.decode()} "
                                             "lost entries")
            finally:
                new.close()
            data = tmp / "data.mdb"
            fsync_file(data)
            fsync_dir(tmp)
            before = (index / "data.mdb").stat().st_size
            after = data.stat().st_size
            _close_env(index)
            try:
                os.rename(data, index / "data.mdb")
                fsync_dir(index)
            finally:
                self.env = _open_env(index)
                self.open_tables()
        except lmdb.Error as e:
            raise index_error(self.store_path, e) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return before - after
