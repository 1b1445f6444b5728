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

Downloads overlap the import, and run ahead of it: one thread fetches the image's
blobs in order into their partial files, as fast as the network gives them, while the
importer reads each file up to where the thread has written (so the next layer is
downloading while this one is still being unpacked; nothing but the files holds
the bytes). A connection that breaks mid-blob is reopened at the offset reached
(twice at most)."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .registry import BlobStream, RegistryClient, RegistryError
from .streams import BLOCK, parse_digest

RETRIES = 2
# partial downloads nobody has touched for this long are removed by the next pull
STALE_SECONDS = 7 * 24 * 3600


class DownloadArea:
    def __init__(self, store_path: Path) -> None:
        self.root = store_path / "registry" / "downloads"

    def paths(self, digest: str) -> tuple[Path, Path]:
        """(verified file, partial file) of `digest`."""
        algo, hexpart = parse_digest(digest)
        name = hexpart if algo == "sha256" else f"{algo}-{hexpart}"
        return self.root / name, self.root / f"{name}.partial"

    def has(self, digest: str) -> bool:
        return self.paths(digest)[0].is_file()

    def remove(self, digest: str) -> None:
        for p in self.paths(digest):
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
    """One blob's bytes as a stream (`read`), fetched by a `Downloads` thread. Call
    `verified()` once the caller's digest check passed, `discard()` if it failed."""

    def __init__(self, area: DownloadArea, client: RegistryClient, digest: str, size: int,
                 stop: threading.Event) -> None:
        self.area = area
        self.client = client
        self.digest = digest
        self.size = size
        self.done_path, self.partial_path = area.paths(digest)
        self.resumed_from = 0  # bytes of an earlier pull's partial file used
        self.from_disk = False  # a verified file of an earlier pull
        self.progress: Callable[[int], None] | None = None
        self._stop = stop
        self._cond = threading.Condition()
        self._started = False
        self._finished = False
        self._error: BaseException | None = None
        self._fd: int | None = None  # the partial file (written by the thread)
        self._file = None  # the verified file, when it is read from disk
        self._written = 0
        self._pos = 0
        self._stream: BlobStream | None = None

    # -- the downloading thread --------------------------------------------------------
    def fetch(self) -> None:
        """Run by the thread: the whole blob into the partial file (or nothing, when it
        is here verified already). Errors are kept for the reader."""
        try:
            self._fetch()
        except BaseException as e:  # handed to the reading thread
            with self._cond:
                self._error = e
        finally:
            if self._stream is not None:
                self._stream.close()
            with self._cond:
                self._started = self._finished = True
                self._cond.notify_all()

    def _fetch(self) -> None:
        if self.done_path.is_file():
            self.from_disk = True
            return
        fd = os.open(self.partial_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        with self._cond:
            self._fd = fd
        while True:  # a concurrent pull of the same blob: wait for it
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if self._stop.wait(0.1):
                    return
        if self.done_path.is_file():  # it finished meanwhile
            self.from_disk = True
            return
        have = os.fstat(fd).st_size
        if have > self.size:
            os.ftruncate(fd, 0)
            have = 0
        offset = have
        if have < self.size or not have:
            stream = self._open(have)
            if have and not (stream.partial and stream.start == have):
                os.ftruncate(fd, 0)  # the registry sent the whole blob: start again
                have = offset = 0
        with self._cond:
            self.resumed_from = self._written = have
            self._started = True
            self._cond.notify_all()
        if have >= self.size and have:
            return
        retries = RETRIES
        while not self._stop.is_set():
            assert self._stream is not None
            try:
                data = self._stream.read(BLOCK)
            except RegistryError:
                self._stream.close()
                if retries <= 0:
                    raise
                retries -= 1
                stream = self._open(offset)
                if not (stream.partial and stream.start == offset):
                    raise RegistryError(f"blob {self.digest}: the registry did not resume "
                                        "the broken download") from None
                continue
            if not data:
                break
            view = memoryview(data)
            while view:
                n = os.pwrite(fd, view, offset)
                offset += n
                view = view[n:]
            with self._cond:
                self._written = offset
                self._cond.notify_all()

    def _open(self, offset: int) -> BlobStream:
        self._stream = self.client.open_blob(
            self.digest, (offset, None) if 0 < offset < self.size else None)
        return self._stream

    def interrupt(self) -> None:
        stream = self._stream
        if stream is not None:
            stream.interrupt()

    # -- reading -----------------------------------------------------------------------
    def read(self, n: int = -1) -> bytes:
        n = BLOCK if n is None or n < 0 else n
        if self._file is None:
            with self._cond:
                while True:
                    if self._error is not None:
                        raise self._error
                    if self.from_disk and self._finished:
                        break
                    if self._written > self._pos or self._finished:
                        break
                    self._cond.wait()
                avail = self._written - self._pos
                fd = self._fd
            if self.from_disk:
                self._file = open(self.done_path, "rb")  # noqa: SIM115 (closed in close())
            else:
                if avail <= 0:
                    return b""
                data = os.pread(fd, min(n, avail), self._pos)
                self._pos += len(data)
                self._report(len(data))
                return data
        data = self._file.read(n)
        self._report(len(data))
        return data

    def _report(self, n: int) -> None:
        if n and self.progress is not None:
            self.progress(n)

    def verified(self) -> None:
        """The whole blob passed the digest check: keep it as a verified download."""
        if self.from_disk or self._fd is None:
            return
        os.fsync(self._fd)
        os.replace(self.partial_path, self.done_path)
        self.close()  # and unlocked: the same blob later in the image is read from disk

    def discard(self) -> None:
        """It failed the check: nothing of it is kept."""
        self.area.remove(self.digest)
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        with self._cond:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class Downloads:
    """The blobs of one pull, fetched in order by one thread, each into its partial
    file, while the caller reads them (`items[i].read`) in the same order. Use as a
    context manager: leaving it stops the thread and closes the files."""

    def __init__(self, area: DownloadArea, client: RegistryClient,
                 blobs: list[tuple[str, int]]) -> None:
        area.root.mkdir(parents=True, exist_ok=True)
        self.stop = threading.Event()
        self.items = [Download(area, client, d, size, self.stop) for d, size in blobs]
        self._current: Download | None = None
        self._thread = threading.Thread(target=self._run, name="pylayers-download",
                                        daemon=True)

    def _run(self) -> None:
        for item in self.items:
            if self.stop.is_set():
                break
            self._current = item
            item.fetch()
            if item._error is not None:  # the reader sees it; later blobs wait
                break
        self._current = None
        for item in self.items:  # never started: their readers must not wait
            with item._cond:
                if not item._finished:
                    item._error = item._error or RegistryError(
                        f"blob {item.digest}: the download stopped before it")
                    item._finished = True
                    item._cond.notify_all()

    def __enter__(self) -> Downloads:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self._thread.join(0.5)
        while self._thread.is_alive():  # blocked on the network: break its connection
            cur = self._current
            if cur is not None:
                cur.interrupt()
            self._thread.join(0.5)
        for item in self.items:
            item.close()
