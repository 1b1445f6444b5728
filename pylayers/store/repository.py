"""The store: config, LMDB index and packs under one directory (docs/format.md).

Crash safety: chunk data is fsynced in its pack before any index entry points at it,
and a layer record is written in the same LMDB transaction as the index entries of
the chunks it needs. Concurrency: LMDB serialises writers; every process writes its
own packs; `gc` holds the store lock exclusively while readers and writers hold it
shared, so gc never deletes what a running snapshot is about to reference.

The jobs on a store live beside it: `index` (LMDB), `ingest` (adding chunks), `gc`
(sweep and repack), `check` (verifying chunks).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb

from ..errors import CorruptData, StoreError
from .config import CONFIG_FILE, FORMAT_VERSION, StoreConfig
from .fsutil import write_atomically
from .index import Index, create_index
from .ingest import ChunkWriter, chunk_id
from .packs import Location, PackReader


def default_store_path() -> Path:
    env = os.environ.get("PYLAYERS_STORE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local/share")
    return Path(xdg) / "pylayers"


class Store:
    """A chunk store in a directory. Open with `Store.open(path)`; use as a context
    manager or call `close()`."""

    def __init__(self, path: Path, config: StoreConfig, index: Index,
                 lock_fd: int, exclusive: bool = False) -> None:
        self.path = path
        self.config = config
        self._index = index
        self._lock_fd = lock_fd
        self._exclusive = exclusive
        self.packs_root = path / "packs"
        self.reader = PackReader(self.packs_root)

    @property
    def env(self) -> lmdb.Environment:
        return self._index.env

    @property
    def db(self) -> dict:
        return self._index.db

    # -- opening ---------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike | None = None, *, create: bool = True,
             exclusive: bool = False, config: StoreConfig | None = None,
             on_wait: Callable[[], None] | None = None) -> Store:
        """Open (with `create`, first create) the store at `path`. `on_wait` is called
        once if another process holds the store lock in a conflicting mode, before this
        one waits for it (the CLI says so on stderr)."""
        path = Path(path) if path is not None else default_store_path()
        cfg_path = path / CONFIG_FILE
        if path.exists() and not path.is_dir():
            raise StoreError(f"{path} is not a directory")
        if not cfg_path.exists():
            if path.is_dir() and not cls._empty_or_initialising(path):
                raise StoreError(f"{path} is not a pylayers store (no {CONFIG_FILE})")
            if not create:
                raise StoreError(f"no store at {path} (run `pylayers init`)")
            cls._init(path, config or StoreConfig())
        try:
            config = StoreConfig.decode(cfg_path.read_bytes(), path)
        except OSError as e:
            raise StoreError(f"cannot read {cfg_path}: {e.strerror}") from None
        lock_fd = cls._lock(path, exclusive, on_wait)
        try:
            index = Index(path)
        except BaseException:
            os.close(lock_fd)
            raise
        store = cls(path, config, index, lock_fd, exclusive)
        with store.env.begin(db=store.db["meta"]) as txn:
            raw = txn.get(b"format_version")
        try:
            version = int(raw) if raw is not None else None
        except ValueError:
            version = None
        if version is None or not 1 <= version <= FORMAT_VERSION:
            store.close()
            shown = version if version is not None else (raw or b"none").decode(errors="replace")
            raise StoreError(f"{path}: index has format version {shown}; this pylayers "
                             f"reads version {FORMAT_VERSION}"
                             + (" (upgrade pylayers)" if version is not None and
                                version > FORMAT_VERSION else ""))
        return store

    @staticmethod
    def _empty_or_initialising(path: Path) -> bool:
        """An empty directory, or one holding only what `_init` creates before it writes
        config.json (another process creating the store right now, or one killed while
        creating it): no packs, an index of at most the two LMDB files."""
        for entry in os.scandir(path):
            name = entry.name
            if name == "lock" and entry.is_file(follow_symlinks=False):
                continue
            if name.startswith(f".{CONFIG_FILE}.") and name.endswith(".tmp"):
                continue
            if name == "packs" and entry.is_dir(follow_symlinks=False):
                if any(os.scandir(entry.path)):
                    return False
                continue
            if name == "index" and entry.is_dir(follow_symlinks=False):
                if not set(os.listdir(entry.path)) <= {"data.mdb", "lock.mdb"}:
                    return False
                continue
            return False
        return True

    @classmethod
    def _init(cls, path: Path, config: StoreConfig) -> None:
        """Create the store. Several processes may try at once (the first use of a store
        path by concurrent commands): they serialise on the lock file, and whoever comes
        second finds config.json written and keeps it."""
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(f"cannot create store at {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if (path / CONFIG_FILE).exists():
                return
            if not cls._empty_or_initialising(path):
                raise StoreError(f"{path} is not a pylayers store (no {CONFIG_FILE})")
            (path / "packs").mkdir(exist_ok=True)
            create_index(path, FORMAT_VERSION)
            # config.json last: a store without it is not yet a store.
            write_atomically(path / CONFIG_FILE, config.encode())
        except OSError as e:
            raise StoreError(f"cannot create store at {path}: {e.strerror or e}") from None
        finally:
            os.close(fd)

    @staticmethod
    def _lock(path: Path, exclusive: bool, on_wait: Callable[[], None] | None) -> int:
        try:
            fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(f"cannot open {path / 'lock'}: {e.strerror}") from None
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, mode)
        return fd

    def close(self) -> None:
        """Close the store; first rewrite the index if it is mostly free pages and no
        other process uses the store (see `compact_index`)."""
        if self._lock_fd < 0:
            return
        self.reader.close()
        try:
            compact = self._index.compaction_due()
            if compact and self._exclusive:
                self.compact_index()
                compact = False
        except (OSError, lmdb.Error, StoreError):
            compact = False  # an optimisation only: the index is as it was
        self._index.close()
        if compact:
            self._compact_if_alone()
        os.close(self._lock_fd)
        self._lock_fd = -1

    def _compact_if_alone(self) -> None:
        """With this store's index closed: take the store lock exclusively if nobody else
        holds it (never waiting), reopen the index and compact it. The index must not be
        open while the lock is not held: gc could replace its file meanwhile."""
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # another process uses the store (our shared lock may be gone too)
        try:
            index = Index(self.path)
        except StoreError:
            return
        try:
            index.compact()
        except (OSError, lmdb.Error, StoreError):
            pass
        finally:
            index.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- chunks ------------------------------------------------------------------
    def location(self, cid: bytes) -> Location | None:
        with self.env.begin(db=self.db["chunks"]) as t:
            raw = t.get(cid)
        return Location.decode(raw) if raw is not None else None

    def has_chunk(self, cid: bytes) -> bool:
        with self.env.begin(db=self.db["chunks"]) as txn:
            return txn.get(cid) is not None

    def read_chunk(self, cid: bytes) -> bytes:
        """The chunk's bytes, verified against its id."""
        loc = self.location(cid)
        if loc is None:
            raise CorruptData(f"chunk {cid.hex()} is missing from the store")
        data = self.reader.read(loc)
        if chunk_id(data) != cid:
            raise CorruptData(f"chunk {cid.hex()} is damaged (pack {loc.pack}, "
                              f"offset {loc.offset}): its bytes do not match its id")
        return data

    def writer(self) -> ChunkWriter:
        return ChunkWriter(self)

    def chunk_count(self) -> int:
        with self.env.begin() as txn:
            return txn.stat(self.db["chunks"])["entries"]

    def iter_chunk_locations(self) -> Iterator[tuple[bytes, Location]]:
        with self.env.begin(db=self.db["chunks"]) as txn:
            for cid, raw in txn.cursor():
                yield bytes(cid), Location.decode(raw)

    # -- small key/value tables ----------------------------------------------------
    def get(self, table: str, key: bytes) -> bytes | None:
        with self.env.begin(db=self.db[table]) as txn:
            return txn.get(key)

    def put(self, table: str, key: bytes, value: bytes) -> None:
        with self.env.begin(write=True, db=self.db[table]) as txn:
            txn.put(key, value)

    def delete(self, table: str, key: bytes) -> bool:
        with self.env.begin(write=True, db=self.db[table]) as txn:
            return txn.delete(key)

    def items(self, table: str) -> list[tuple[bytes, bytes]]:
        with self.env.begin(db=self.db[table]) as txn:
            return [(bytes(k), bytes(v)) for k, v in txn.cursor()]

    @contextmanager
    def transaction(self, write: bool = False) -> Iterator[lmdb.Transaction]:
        with self.env.begin(write=write) as txn:
            yield txn

    # -- maintenance ---------------------------------------------------------------
    def pack_files(self) -> list[Path]:
        return sorted(self.packs_root.glob("*/*.pack"))

    def index_pages(self) -> tuple[int, int, int]:
        """(page size, pages in index/data.mdb, pages holding data)."""
        return self._index.pages()

    def compact_index(self, min_free: int = 0) -> int:
        """Rewrite the index without its free pages (see `Index.compact`); the caller
        holds the store exclusive. Returns the bytes saved."""
        self.reader.close()
        return self._index.compact(min_free)

    def disk_usage(self) -> int:
        total = 0
        for dirpath, _dirs, files in os.walk(self.path):
            for name in files:
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue
                total += min(st.st_size, st.st_blocks * 512)
        return total
