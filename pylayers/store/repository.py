"""The store: config, LMDB index and packs under one directory (docs/format.md).

Crash safety: chunk data is fsynced in its pack before any index entry points at it,
and a layer record is written in the same LMDB transaction as the index entries of
the chunks it needs. Concurrency: LMDB serialises writers; every process writes its
own packs; `gc` holds the store lock exclusively while readers and writers hold it
shared, so gc never deletes what a running snapshot is about to reference.

The jobs on a store live beside it: `index` (LMDB), `tables` (one accessor per
table), `ingest` (adding chunks), `gc` (sweep and repack), `check` (verifying chunks).
Above `store/`, the index is reached only through `Store.read()` and `Store.write()`.

Locking (store/lock.py, docs/format.md "Locking"): every process holds the store lock
shared, gc holds it exclusive; a user who may only read the store reads without LMDB's
reader table, guarded by byte-range locks every write transaction respects.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb

from ..errors import AlreadyExists, CorruptData, StoreError
from .config import CONFIG_FILE, FORMAT_VERSION, OLDEST_VERSION, StoreConfig
from .fsutil import bytes_on_disk, write_atomically
from .index import Index, create_index, index_error
from .ingest import ChunkWriter, chunk_id
from .lock import StoreLock
from .packs import Location, PackReader
from .tables import Tables


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
                 lock: StoreLock) -> None:
        self.path = path
        self.config = config
        self._index = index
        self._lock = lock
        self.packs_root = path / "packs"
        self.reader = PackReader(self.packs_root, base_reader=self.read_base)

    @property
    def exclusive(self) -> bool:
        """Opened holding the store lock exclusively (gc)."""
        return self._lock.exclusive

    @property
    def readonly(self) -> bool:
        """Opened by a user who may read the store but not write it."""
        return self._index.readonly

    # -- transactions ------------------------------------------------------------
    @contextmanager
    def read(self, buffers: bool = False) -> Iterator[Tables]:
        """A read transaction: a consistent view of every table. `buffers`: values
        are memoryviews into the index, valid until the next operation (to look at
        parts of large values without copying them)."""
        with self._lock.reading():
            txn, tables = self._index.begin(buffers=buffers)
            try:
                yield tables
            finally:
                txn.abort()

    @contextmanager
    def write(self) -> Iterator[Tables]:
        """A write transaction, committed when the block ends without an exception
        (then aborted). LMDB runs one at a time; failures are one-line StoreErrors."""
        self._check_writable()
        with self._lock.writing():
            try:
                txn, tables = self._index.begin(write=True)
            except lmdb.Error as e:
                raise index_error(self.path, e) from None
            try:
                yield tables
                txn.commit()
            except lmdb.MapFullError:
                txn.abort()
                raise StoreError("the store index is full") from None
            except lmdb.Error as e:
                txn.abort()
                raise index_error(self.path, e) from None
            except BaseException:
                txn.abort()
                raise

    def _check_writable(self) -> None:
        if self.readonly:
            raise StoreError(f"cannot write to the store at {self.path}: permission denied "
                             "(this user may only read it)")

    def max_key_size(self) -> int:
        """The longest key any table can hold, in bytes."""
        return self._index.max_key_size()

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
            # (config.json may appear meanwhile: another process creating the store
            # writes it last, and a third may already be storing packs in it)
            if path.is_dir() and not cls._empty_or_initialising(path) \
                    and not cfg_path.exists():
                raise StoreError(f"{path} is not a pylayers store (no {CONFIG_FILE})")
            if not create:
                raise StoreError(f"no store at {path} (run `pylayers init`)")
            cls._init(path, config or StoreConfig())
        try:
            config = StoreConfig.decode(cfg_path.read_bytes(), path)
        except OSError as e:
            raise StoreError(f"cannot read {cfg_path}: {e.strerror}") from None
        lock = StoreLock(path, exclusive, on_wait)
        try:
            index = Index(path, lock.readonly)
        except BaseException:
            lock.close()
            raise
        try:
            raw = index.format_version()
            try:
                version = int(raw) if raw is not None else None
            except ValueError:
                version = None
            if version != config.version:
                shown = version if version is not None else \
                    (raw or b"none").decode(errors="replace")
                hint = ""
                if version is not None and version > FORMAT_VERSION:
                    hint = " (upgrade pylayers)"
                elif version is not None and 1 <= version < OLDEST_VERSION:
                    hint = " (an earlier pylayers made it: make a new store and snapshot again)"
                raise StoreError(f"{path}: index has format version {shown}; this pylayers "
                                 f"reads version {FORMAT_VERSION}{hint}")
            index.open_tables()
        except BaseException:
            index.close()
            lock.close()
            raise
        return cls(path, config, index, lock)

    @classmethod
    def init(cls, path: str | os.PathLike | None = None,
             config: StoreConfig | None = None) -> None:
        """Create a store at `path`; AlreadyExists if there is one."""
        path = Path(path) if path is not None else default_store_path()
        if path.exists() and not path.is_dir():
            raise StoreError(f"{path} is not a directory")
        if (path / CONFIG_FILE).exists():
            raise AlreadyExists(f"a store exists at {path}")
        if path.is_dir() and not cls._empty_or_initialising(path):
            if (path / CONFIG_FILE).exists():  # made meanwhile (see `open`)
                raise AlreadyExists(f"a store exists at {path}")
            raise StoreError(f"{path} is not a pylayers store (no {CONFIG_FILE})")
        if not cls._init(path, config or StoreConfig()):
            raise AlreadyExists(f"a store exists at {path}")

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
    def _init(cls, path: Path, config: StoreConfig) -> bool:
        """Create the store; False if another process did first. Several processes may
        try at once (the first use of a store path by concurrent commands): they
        serialise on the lock file, and whoever comes second finds config.json written
        and keeps it."""
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(f"cannot create store at {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if (path / CONFIG_FILE).exists():
                return False
            if not cls._empty_or_initialising(path):
                raise StoreError(f"{path} is not a pylayers store (no {CONFIG_FILE})")
            (path / "packs").mkdir(exist_ok=True)
            create_index(path, config.version)
            # config.json last: a store without it is not yet a store.
            write_atomically(path / CONFIG_FILE, config.encode())
            return True
        except OSError as e:
            raise StoreError(f"cannot create store at {path}: {e.strerror or e}") from None
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close the store; first rewrite the index if it is mostly free pages and no
        other process uses the store (see `compact_index`)."""
        if self._lock.closed:
            return
        self.reader.close()
        try:
            compact = not self.readonly and self._index.compaction_due()
            if compact and self.exclusive:
                self.compact_index()
                compact = False
        except (OSError, lmdb.Error, StoreError):
            compact = False  # an optimisation only: the index is as it was
        self._index.close()
        if compact:
            self._compact_if_alone()
        self._lock.close()

    def _compact_if_alone(self) -> None:
        """With this store's index closed: take the store lock exclusively if nobody else
        holds it (never waiting), reopen the index and compact it. The index must not be
        open while the lock is not held: gc could replace its file meanwhile."""
        if not self._lock.try_exclusive():
            return
        try:
            index = Index(self.path)
        except StoreError:
            return
        try:
            index.open_tables()
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
        with self.read() as t:
            return t.chunks.get(cid)

    def has_chunk(self, cid: bytes) -> bool:
        with self.read() as t:
            return t.chunks.has(cid)

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

    def read_base(self, ids: list[bytes], where: list[Location] | None = None) -> bytes:
        """The bytes of a delta frame's base: the chunks `ids`, each verified against
        its id, concatenated. A base is never itself a delta (docs/format.md, "Delta
        frames"); a missing, damaged or delta base is a CorruptData naming it. `where`:
        the chunks' locations when the caller has looked them up already (a writer
        choosing the base: a second read transaction and lookups a base were a fifth of
        reading it)."""
        if where is not None:
            locs = list(zip(ids, where, strict=True))
        else:
            with self.read() as t:
                locs = [(cid, t.chunks.get(cid)) for cid in ids]
        parts = []
        for cid, loc in locs:
            if loc is None:
                raise CorruptData(f"chunk {cid.hex()}, the base of a delta, is missing "
                                  "from the store")
            try:
                data = self.reader.read(loc, delta_ok=False)
            except CorruptData as e:
                raise CorruptData(f"chunk {cid.hex()}, the base of a delta, cannot be "
                                  f"read: {e}") from None
            if chunk_id(data) != cid:
                raise CorruptData(f"chunk {cid.hex()}, the base of a delta, is damaged "
                                  f"(pack {loc.pack}, offset {loc.offset}): its bytes do "
                                  "not match its id")
            parts.append(data)
        return b"".join(parts)

    def writer(self) -> ChunkWriter:
        self._check_writable()
        return ChunkWriter(self)

    def chunk_count(self) -> int:
        with self.read() as t:
            return t.chunks.count()

    def iter_chunk_locations(self) -> Iterator[tuple[bytes, Location]]:
        with self.read() as t:
            yield from t.chunks.items()

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
        """Bytes the whole store directory occupies on disk."""
        return bytes_on_disk(self.path)
