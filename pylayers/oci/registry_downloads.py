"""The download area of `pull` (STORE/registry/downloads/, docs/format.md): blobs as
they arrive, so that an interrupted pull resumes where it stopped.

`<hex>.partial` holds the bytes of a blob received so far (locked with flock while a
pull writes it); once the whole blob has passed its digest check it is renamed
`<hex>` (verified, kept until the pull that needs it has committed its layers, then
removed). A later pull reads a verified blob from here instead of the network, and
asks the registry only for the rest of a partial one (an HTTP Range request; a
registry that sends the whole blob instead is read from the start). A blob that fails
its check is deleted. Everything read from here goes through the same digest check
again, so a damaged file here is refused like a damaged download.

Downloads overlap the import: a thread reads the network into the partial file and a
small queue, the importer reads from the queue as blocks arrive. A connection that
breaks mid-blob is reopened at the offset reached (twice at most)."""

from __future__ import annotations

import fcntl
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .registry import BlobStream, RegistryClient, RegistryError
from .streams import BLOCK, parse_digest

RETRIES = 2
_QUEUE_BLOCKS = 16
# partial downloads nobody has touched for this long are removed by the next pull
STALE_SECONDS = 7 * 24 * 3600


class DownloadArea:
    def __init__(self, store_path: Path) -> None:
        self.root = store_path / "registry" / "downloads"

    def _paths(self, digest: str) -> tuple[Path, Path]:
        algo, hexpart = parse_digest(digest)
        name = hexpart if algo == "sha256" else f"{algo}-{hexpart}"
        return self.root / name, self.root / f"{name}.partial"

    def has(self, digest: str) -> bool:
        return self._paths(digest)[0].is_file()

    def open(self, client: RegistryClient, digest: str, size: int,
             progress: Callable[[int], None] | None = None) -> Download:
        self.root.mkdir(parents=True, exist_ok=True)
        return Download(self, client, digest, size, progress)

    def remove(self, digest: str) -> None:
        for p in self._paths(digest):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def prune_stale(self) -> None:
        try:
            entries = list(self.root.iterdir())
        except FileNotFoundError:
            return
        now = time.time()
        for p in entries:
            try:
                if now - p.stat().st_mtime > STALE_SECONDS:
                    p.unlink()
            except OSError:
                pass


class Download:
    """One blob's bytes as a stream: from the verified file, else the partial file's
    bytes then the network's. Call `verified()` once the caller's digest check passed,
    `discard()` if it failed, `close()` in every case."""

    def __init__(self, area: DownloadArea, client: RegistryClient, digest: str, size: int,
                 progress: Callable[[int], None] | None) -> None:
        self.area = area
        self.client = client
        self.digest = digest
        self.size = size
        self.progress = progress
        self.done_path, self.partial_path = area._paths(digest)
        self.resumed_from = 0  # bytes of the partial file used
        self.from_disk = False
        self._file = None  # the verified file being read
        self._partial = None  # the partial file (append), locked
        self._head = 0  # bytes of the partial file still to read from disk
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue(_QUEUE_BLOCKS)
        self._stop = threading.Event()
        self._buf = b""
        self._eof = False
        self._start()

    # -- setting up --------------------------------------------------------------------
    def _start(self) -> None:
        if self._open_done():
            return
        fd = os.open(self.partial_path, os.O_RDWR | os.O_CREAT, 0o644)
        f = os.fdopen(fd, "r+b")
        fcntl.flock(f, fcntl.LOCK_EX)  # a concurrent pull of the same blob waits here
        if self._open_done():  # it finished meanwhile
            f.close()
            return
        self._partial = f
        have = os.fstat(f.fileno()).st_size
        if have > self.size:
            f.truncate(0)
            have = 0
        stream = self._connect(have)
        if have and not (stream.partial and stream.start == have):
            f.truncate(0)  # the registry sent the whole blob: start again
            have = 0
        f.seek(have)
        self._head = self.resumed_from = have
        self._reader = open(self.partial_path, "rb")  # noqa: SIM115 (closed in close())
        self._stream = stream
        self._thread = threading.Thread(target=self._fetch, args=(stream, have),
                                        name="pylayers-download", daemon=True)
        self._thread.start()

    def _open_done(self) -> bool:
        try:
            self._file = open(self.done_path, "rb")  # noqa: SIM115 (closed in close())
        except FileNotFoundError:
            return False
        self.from_disk = True
        return True

    def _connect(self, offset: int) -> BlobStream:
        if offset >= self.size:
            offset = 0
        if offset:
            return self.client.open_blob(self.digest, (offset, None))
        return self.client.open_blob(self.digest)

    # -- the network thread ------------------------------------------------------------
    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _fetch(self, stream: BlobStream, offset: int) -> None:
        retries = RETRIES
        assert self._partial is not None
        try:
            while not self._stop.is_set():
                try:
                    data = stream.read(BLOCK)
                except RegistryError:
                    stream.close()
                    if retries <= 0 or offset >= self.size:
                        raise
                    retries -= 1
                    self._partial.flush()
                    stream = self._stream = self.client.open_blob(self.digest,
                                                                  (offset, None))
                    if not (stream.partial and stream.start == offset):
                        stream.close()
                        raise RegistryError(f"blob {self.digest}: the registry did not "
                                            "resume the broken download") from None
                    continue
                if not data:
                    break
                self._partial.write(data)
                offset += len(data)
                if not self._put(data):
                    break
            self._partial.flush()
            self._put(None)
        except BaseException as e:  # handed to the reading thread
            try:
                self._partial.flush()
            except OSError:
                pass
            self._put(e)
        finally:
            stream.close()

    # -- reading -----------------------------------------------------------------------
    def read(self, n: int = -1) -> bytes:
        n = BLOCK if n is None or n < 0 else n
        if self._file is not None:
            data = self._file.read(n)
        elif self._head:
            data = self._reader.read(min(n, self._head))
            self._head -= len(data)
            if not data:
                raise RegistryError(f"{self.partial_path}: shorter than it was")
        else:
            while not self._buf and not self._eof:
                item = self._queue.get()
                if item is None:
                    self._eof = True
                elif isinstance(item, BaseException):
                    self._eof = True
                    raise item
                else:
                    self._buf = item
            data, self._buf = self._buf[:n], self._buf[n:]
        if data and self.progress is not None:
            self.progress(len(data))
        return data

    def verified(self) -> None:
        """The whole blob passed the digest check: keep it as a verified download."""
        if self._partial is not None and not self.from_disk:
            self._join()
            self._partial.flush()
            os.fsync(self._partial.fileno())
            os.replace(self.partial_path, self.done_path)

    def discard(self) -> None:
        """It failed the check: nothing of it is kept."""
        self._join()
        self.area.remove(self.digest)

    def _join(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(0.5)
            if self._thread.is_alive():  # blocked on the network: break its connection
                self._stream.interrupt()
                self._thread.join()
            self._thread = None

    def close(self) -> None:
        self._join()
        for f in (self._file, self._partial, getattr(self, "_reader", None)):
            if f is not None:
                f.close()
        self._file = self._partial = self._reader = None
