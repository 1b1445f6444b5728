"""The store: config, LMDB index and packs under one directory (docs/format.md).

Crash safety: chunk data is fsynced in its pack before any index entry points at it,
and a layer record is written in the same LMDB transaction as the index entries of
the chunks it needs. Concurrency: LMDB serialises writers; every process writes its
own packs; `gc` holds the store lock exclusively while readers and writers hold it
shared, so gc never deletes what a running snapshot is about to reference.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import lmdb

from ..errors import CorruptData, StoreError
from .config import CONFIG_FILE, FORMAT_VERSION, StoreConfig, fsync_dir, write_atomically
from .packs import Location, PackReader, PackWriter, frame_raw_len, pack_path

DB_NAMES = ("meta", "chunks", "layers", "tags", "statcache", "snapshots", "cachekeys")
MAP_SIZE = 1 << 40
COMMIT_EVERY = 256 << 20  # bytes of new chunk data between index commits
# LMDB never shrinks its file: every commit copies the pages it changes, and the old
# copies stay in the file as free pages. A process closing the store rewrites the index
# (Store.compact_index) when free pages are at least this share of the file and this
# many bytes, and it can take the store lock exclusively without waiting; gc always does.
COMPACT_FREE_SHARE = 0.25
COMPACT_MIN_BYTES = 64 << 10
COMPACT_DIR = "index.compact"  # the rewritten index, before it replaces index/data.mdb

_envs: dict[str, tuple[lmdb.Environment, int]] = {}
_envs_lock = threading.Lock()


def default_store_path() -> Path:
    env = os.environ.get("PYLAYERS_STORE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local/share")
    return Path(xdg) / "pylayers"


def chunk_id(data) -> bytes:
    return blake3.blake3(data).digest()


def _open_env(path: Path) -> lmdb.Environment:
    # LMDB must not be opened twice by one process: share one Environment per path.
    key = os.path.realpath(path)
    with _envs_lock:
        if key in _envs:
            env, n = _envs[key]
            _envs[key] = (env, n + 1)
            return env
        try:
            env = lmdb.open(key, map_size=MAP_SIZE, max_dbs=len(DB_NAMES) + 2,
                            max_readers=1024, subdir=True, meminit=False)
        except lmdb.Error as e:
            raise StoreError(f"cannot open index {path}: {e}") from None
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


def _close_env(path: Path) -> None:
    key = os.path.realpath(path)
    with _envs_lock:
        env, n = _envs[key]
        if n == 1:
            del _envs[key]
            env.close()
        else:
            _envs[key] = (env, n - 1)


def _index_error(path: Path, e: lmdb.Error) -> StoreError:
    """An LMDB failure (a full disk, an I/O error) as one line; nothing was committed."""
    reason = str(e).split(": ", 1)[-1] or type(e).__name__
    reason = reason[:1].lower() + reason[1:]
    if reason == "input/output error":
        # LMDB reports a short write (the disk filled up mid-write) as EIO
        try:
            st = os.statvfs(path)
            if st.f_bavail * st.f_frsize < (1 << 20):
                reason = "no space left on device"
        except OSError:
            pass
    return StoreError(f"cannot update the index of the store at {path}: {reason}")


@dataclass
class SweepResult:
    chunks_removed: int = 0
    packs_removed: int = 0
    packs_rewritten: int = 0
    bytes_freed: int = 0


@dataclass
class VerifyResult:
    chunks_checked: int = 0
    damaged: list[str] = field(default_factory=list)
    bad_chunks: set[bytes] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)


class Store:
    """A chunk store in a directory. Open with `Store.open(path)`; use as a context
    manager or call `close()`."""

    def __init__(self, path: Path, config: StoreConfig, env: lmdb.Environment,
                 lock_fd: int, exclusive: bool = False) -> None:
        self.path = path
        self.config = config
        self.env = env
        self._lock_fd = lock_fd
        self._exclusive = exclusive
        self.db = {name: env.open_db(name.encode()) for name in DB_NAMES}
        self.packs_root = path / "packs"
        self.reader = PackReader(self.packs_root)

    # -- opening ---------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike | None = None, *, create: bool = True,
             exclusive: bool = False, config: StoreConfig | None = None) -> Store:
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
        lock_fd = cls._lock(path, exclusive)
        try:
            env = _open_env(path / "index")
        except BaseException:
            os.close(lock_fd)
            raise
        store = cls(path, config, env, lock_fd, exclusive)
        with env.begin(db=store.db["meta"]) as txn:
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
            env = _open_env(path / "index")
            try:
                with env.begin(write=True) as txn:
                    meta = env.open_db(b"meta", txn=txn)
                    txn.put(b"format_version", str(FORMAT_VERSION).encode(), db=meta,
                            overwrite=False)
                    for name in DB_NAMES:
                        env.open_db(name.encode(), txn=txn)
            finally:
                _close_env(path / "index")
            # config.json last: a store without it is not yet a store.
            write_atomically(path / CONFIG_FILE, config.encode())
        except OSError as e:
            raise StoreError(f"cannot create store at {path}: {e.strerror or e}") from None
        finally:
            os.close(fd)

    @staticmethod
    def _lock(path: Path, exclusive: bool) -> int:
        try:
            fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(f"cannot open {path / 'lock'}: {e.strerror}") from None
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            print("pylayers: waiting for other processes using the store...", file=sys.stderr)
            fcntl.flock(fd, mode)
        return fd

    def close(self) -> None:
        """Close the store; first rewrite the index if it is mostly free pages and no
        other process uses the store (see `compact_index`)."""
        if self._lock_fd < 0:
            return
        self.reader.close()
        try:
            compact = self._compaction_due()
            if compact and self._exclusive:
                self.compact_index()
                compact = False
        except (OSError, lmdb.Error, StoreError):
            compact = False  # an optimisation only: the index is as it was
        _close_env(self.path / "index")
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
            self.env = _open_env(self.path / "index")
        except StoreError:
            return
        try:
            self.db = {name: self.env.open_db(name.encode()) for name in DB_NAMES}
            self.compact_index()
        except (OSError, lmdb.Error, StoreError):
            pass
        finally:
            _close_env(self.path / "index")

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- chunks ------------------------------------------------------------------
    def location(self, cid: bytes, txn: lmdb.Transaction | None = None) -> Location | None:
        if txn is None:
            with self.env.begin(db=self.db["chunks"]) as t:
                raw = t.get(cid)
        else:
            raw = txn.get(cid, db=self.db["chunks"])
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

    def verify_chunks(self) -> VerifyResult:
        """Read every indexed chunk and check it against its id, frame by frame."""
        result = VerifyResult()
        by_frame: dict[tuple[str, int], list[tuple[bytes, Location]]] = {}
        for cid, loc in self.iter_chunk_locations():
            by_frame.setdefault((loc.pack, loc.offset), []).append((cid, loc))
        reader = PackReader(self.packs_root, cache_frames=1)
        try:
            for (pack, offset), items in sorted(by_frame.items()):
                try:
                    raw = reader.frame_raw(items[0][1])
                except CorruptData as e:
                    result.damaged.append(f"pack {pack} frame at {offset}: {e}")
                    result.bad_chunks.update(cid for cid, _ in items)
                    continue
                for cid, loc in items:
                    result.chunks_checked += 1
                    if chunk_id(raw[loc.start : loc.start + loc.length]) != cid:
                        result.damaged.append(f"chunk {cid.hex()}: content does not match its "
                                              f"id (pack {pack}, frame at {offset})")
                        result.bad_chunks.add(cid)
        finally:
            reader.close()
        indexed = {p for p, _ in by_frame}
        for path in self.pack_files():
            if path.stem not in indexed:
                result.notes.append(f"pack {path.stem} holds no indexed chunk (gc removes it)")
        return result

    def sweep(self, live: set[bytes], repack_below: float = 0.5) -> SweepResult:
        """Drop every chunk not in `live`, delete packs left empty and rewrite packs
        mostly dead. Call with the store opened exclusive."""
        res = SweepResult()
        with self.env.begin(write=True, db=self.db["chunks"]) as txn:
            dead = [bytes(cid) for cid in txn.cursor().iternext(values=False)
                    if bytes(cid) not in live]
            for cid in dead:
                txn.delete(cid)
            txn.drop(self.db["statcache"], delete=False)
        res.chunks_removed = len(dead)
        # per pack, per live frame: (frame length, raw bytes of its live chunks)
        used: dict[str, dict[int, list[int]]] = {}
        for _cid, loc in self.iter_chunk_locations():
            frame = used.setdefault(loc.pack, {}).setdefault(loc.offset, [loc.frame_len, 0])
            frame[1] += loc.length
        self.reader.close()
        for path in self.pack_files():
            pack = path.stem
            size = path.stat().st_size
            frames = used.get(pack)
            if not frames:
                path.unlink()
                res.packs_removed += 1
                res.bytes_freed += size
            elif self._live_bytes(path, frames) < repack_below * size:
                res.bytes_freed += size - self._rewrite_pack(pack)
                res.packs_rewritten += 1
        return res

    @staticmethod
    def _live_bytes(path: Path, frames: dict[int, list[int]]) -> float:
        """The stored bytes of a pack that live chunks account for. A frame whose chunks
        are mostly dead counts only for its live share (of its raw length, read from its
        header): small files share frames, and a pack whose frames each keep one live
        chunk is still mostly dead."""
        live = 0.0
        with open(path, "rb") as f:
            for offset, (frame_len, live_raw) in frames.items():
                raw_len = frame_raw_len(f, offset)
                if raw_len and live_raw < raw_len:
                    live += frame_len * live_raw / raw_len
                else:
                    live += frame_len
        return live

    def _rewrite_pack(self, pack: str) -> int:
        moving = [(cid, loc) for cid, loc in self.iter_chunk_locations() if loc.pack == pack]
        w = PackWriter(self.packs_root, self.config.compression_level)
        try:
            for cid, _ in moving:
                w.add(cid, self.read_chunk(cid))
            written = w.flush()
            try:
                with self.env.begin(write=True, db=self.db["chunks"]) as txn:
                    for cid, loc in written:
                        txn.put(cid, loc.encode())
            except lmdb.Error as e:
                raise _index_error(self.path, e) from None
            w.keep(written)
        finally:
            w.close()  # on failure, removes the new pack: the old one is still indexed
        self.reader.close()
        pack_path(self.packs_root, pack).unlink()
        return w.bytes_written

    # -- index compaction ------------------------------------------------------------
    def index_pages(self) -> tuple[int, int, int]:
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

    def _compaction_due(self) -> bool:
        key = os.path.realpath(self.path / "index")
        with _envs_lock:
            if _envs[key][1] != 1:
                return False  # another Store of this process has the index open
        if (self.path / COMPACT_DIR).exists():
            return True  # a compaction was interrupted: finish cleaning up
        psize, total, used = self.index_pages()
        free = (total - used) * psize
        return free >= COMPACT_MIN_BYTES and free >= COMPACT_FREE_SHARE * total * psize

    def compact_index(self, min_free: int = 0) -> int:
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
        index = self.path / "index"
        tmp = self.path / COMPACT_DIR
        key = os.path.realpath(index)
        with _envs_lock:
            if _envs[key][1] != 1:
                return 0
        shutil.rmtree(tmp, ignore_errors=True)
        psize, total, used = self.index_pages()
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
            fd = os.open(data, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(tmp)
            before = (index / "data.mdb").stat().st_size
            after = data.stat().st_size
            self.reader.close()
            _close_env(index)
            try:
                os.rename(data, index / "data.mdb")
                fsync_dir(index)
            finally:
                self.env = _open_env(index)
                self.db = {n: self.env.open_db(n.encode()) for n in DB_NAMES}
        except lmdb.Error as e:
            raise _index_error(self.path, e) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return before - after

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


class ChunkWriter:
    """Adds chunks to the store for one writing job (a snapshot, an import).

    `put` returns whether the chunk was new. Nothing is visible to other processes until
    `commit`, which makes the data durable first and then indexes it in one LMDB
    transaction, together with whatever `extra(txn)` writes (a layer record, a tag).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.pack = PackWriter(store.packs_root, store.config.compression_level)
        self._pending: set[bytes] = set()
        self._uncommitted = 0
        self.new_chunks = 0
        self.new_bytes = 0
        self._txn = store.env.begin(db=store.db["chunks"])

    def has(self, cid: bytes) -> bool:
        return cid in self._pending or self._txn.get(cid) is not None

    def put(self, cid: bytes, data) -> bool:
        if self.has(cid):
            return False
        self.pack.add(cid, data)
        self._pending.add(cid)
        self.new_chunks += 1
        self.new_bytes += len(data)
        self._uncommitted += len(data)
        if self._uncommitted >= COMMIT_EVERY:
            self.commit()
        return True

    def commit(self, extra=None) -> None:
        written = self.pack.flush()
        self._txn.abort()
        try:
            with self.store.env.begin(write=True) as txn:
                chunks = self.store.db["chunks"]
                for cid, loc in written:
                    txn.put(cid, loc.encode(), db=chunks, overwrite=False)
                if extra is not None:
                    extra(txn)
        except lmdb.MapFullError:
            raise StoreError("the store index is full") from None
        except lmdb.Error as e:
            raise _index_error(self.store.path, e) from None
        # The index points at these now; anything else this writer wrote is dead data
        # that close() removes.
        self.pack.keep(written)
        self._uncommitted = 0
        self._txn = self.store.env.begin(db=self.store.db["chunks"])
        # Chunks committed by this writer are now in the index, seen by the new txn.
        self._pending.clear()

    def close(self) -> None:
        self._txn.abort()
        self.pack.close()

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
