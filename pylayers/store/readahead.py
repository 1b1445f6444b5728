"""Reading a known sequence of chunks with a thread working ahead of the reader.

A checkout knows every chunk it will read, in order, before it writes the first file.
`read_ahead` looks them up, reads and decompresses their frames and verifies each chunk
against its id on a background thread (zstd, BLAKE3 and pread release the GIL), while
the caller writes what is already done. The thread stays at most `ahead_bytes` of
chunk data in front; an error (a missing or damaged chunk) reaches the caller at the
chunk it concerns, in order, never earlier.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .repository import Store

_BATCH_BYTES = 4 << 20  # chunks handed over together, to keep queue operations few
_DONE = object()


def read_ahead(store: Store, cids: Iterable[bytes],
               ahead_bytes: int = 64 << 20) -> Iterator[bytes]:
    """The bytes of each chunk of `cids`, in order, each verified against its id.
    Closing the iterator early stops the thread."""
    batches: queue.Queue = queue.Queue(maxsize=max(1, ahead_bytes // _BATCH_BYTES))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                batches.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        batch: list[bytes] = []
        size = 0
        try:
            for cid in cids:
                batch.append(store.read_chunk(cid))
                size += len(batch[-1])
                if size >= _BATCH_BYTES:
                    if not put(batch):
                        return
                    batch, size = [], 0
            if batch and not put(batch):
                return
            put(_DONE)
        except Exception as e:  # handed to the reader at this point of the sequence
            if batch and not put(batch):
                return
            put(e)

    thread = threading.Thread(target=work, name="pylayers-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = batches.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield from item
    finally:
        stop.set()
        thread.join()
