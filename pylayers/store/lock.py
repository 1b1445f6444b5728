"""The store lock and the transaction locks (docs/format.md, "Locking").

- The store lock: `flock(STORE/lock)`, held shared by every process that has the store
  open and exclusively by gc (and by a closing process that compacts the index), so gc
  never runs beside anything else.
- Byte 0 of the same file, locked with open-file-description locks (independent of the
  flock): a user who may read the store but not write it cannot take a slot in LMDB's
  reader table, so it opens the index without one and holds a read lock on that byte
  around each of its read transactions; every writer holds a write lock on it for each
  write transaction. Write transactions are serial anyway (LMDB), so this costs writers
  nothing until such a reader reads; then the next commit waits for it, and no page it
  may be reading is reused meanwhile.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import StoreError

LOCK_FILE = "lock"
_READONLY_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


class StoreLock:
    """The store lock of the store at `path`, held from construction to `close()`.
    `readonly`: this user cannot write the lock file or LMDB's lock file, so may only
    read the store (and must use `reading()` around read transactions)."""

    def __init__(self, path: Path, exclusive: bool,
                 on_wait: Callable[[], None] | None = None) -> None:
        lock = path / LOCK_FILE
        self.exclusive = exclusive
        self.readonly = False
        try:
            self._fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno not in _READONLY_ERRNOS or exclusive:
                raise StoreError(f"cannot open {lock}: {e.strerror}") from None
            try:
                self._fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e2:
                raise StoreError(f"cannot open {lock}: {e2.strerror}") from None
            self.readonly = True
        mdb_lock = path / "index" / "lock.mdb"
        if not self.readonly and mdb_lock.exists() and not os.access(mdb_lock, os.W_OK):
            self.readonly = True
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(self._fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(self._fd, mode)
        self._write_lock = threading.Lock()
        self._readers = 0  # read transactions open (read-only mode: holding byte 0)
        self._readers_lock = threading.Lock()

    def try_exclusive(self) -> bool:
        """Take the store lock exclusively if nobody else holds it, never waiting."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # another process uses the store (our shared lock may be gone)
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Around a write transaction: one at a time in this process, byte 0 locked
        for writing."""
        with self._write_lock:
            self._byte_lock(fcntl.F_WRLCK)
            try:
                yield
            finally:
                self._byte_lock(fcntl.F_UNLCK)

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Around a read transaction: in read-only mode, byte 0 locked for reading
        while any read transaction of this process is open; otherwise nothing (LMDB's
        reader table protects the reader)."""
        if not self.readonly:
            yield
            return
        with self._readers_lock:
            if self._readers == 0:
                self._byte_lock(fcntl.F_RDLCK)
            self._readers += 1
        try:
            yield
        finally:
            with self._readers_lock:
                self._readers -= 1
                if self._readers == 0:
                    self._byte_lock(fcntl.F_UNLCK)

    def _byte_lock(self, kind: int) -> None:
        arg = struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 1, 0)  # struct flock
        fcntl.fcntl(self._fd, fcntl.F_OFD_SETLKW, arg)
