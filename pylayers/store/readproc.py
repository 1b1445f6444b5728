"""Reading a known sequence of chunks in a process of its own, ahead of the reader.

A checkout is a two-stage pipeline, like `zstd -dc | tar -x`: reading, decompressing
and verifying chunks (`readahead.verified_chunks`) on one core, creating files on the
other. Threads share one GIL, and on a busy machine handing it back and forth costs
more than the work; so the first stage runs in a forked child process. It opens the
store afresh (an LMDB environment must not be used across fork), verifies every chunk
against its id and copies it into a ring of shared memory; the parent is handed views
of the ring (no copy) in order. Nothing unverified is ever in the ring's readable part.
In the child, two threads decompress the frames next needed ahead of the one that
verifies and copies (`verified_chunks(prefetch=True)`; zstd releases the GIL): the
child is the pipeline's longer stage, above all through a chain of delta frames.

Two pipes carry the control: the child says how many chunks are ready (and, in order,
an error where it met one, or that it is done); the parent says how far it has
consumed, which is when the child may reuse that part of the ring. A chunk longer than
half the ring (a store made with a larger chunk size) goes through the pipe instead.
If the child dies, the parent sees the pipe end and reports it in one line; if the
parent dies, the child's next pipe operation fails (or PR_SET_PDEATHSIG kills it) and
it exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import signal
import struct
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from .. import errors
from ..errors import CorruptData, PylayersError, StoreError
from .malloc import keep_freed_memory

if TYPE_CHECKING:
    from .repository import Store

# Chunk data ready ahead of the parent. Each page of the ring is faulted in by both
# processes the first time round: at 64 MiB that was 3-4% of a checkout's CPU (the
# pip env's v5 from its chain: 0.72 -> 0.70 s wall and 0.45 -> 0.40 s of system time at
# 16 MiB, 15 runs side by side; 8 and 32 MiB no better; three 150 MB text files: 0.46
# -> 0.42 s, 7 runs), and 16 MiB still holds 64 chunks of the default largest size.
RING_BYTES = 16 << 20
_NOTE_BYTES = 1 << 20  # the child says what is ready every so often
_MSG = struct.Struct("<cQ")  # kind, value
_READY, _BIG, _ERROR, _DONE = b"R", b"B", b"E", b"D"
_CREDIT = struct.Struct("<Q")  # ring bytes consumed, counted from the start
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork


def read_in_process(store: Store, chunks: Iterable[tuple[bytes, int]],
                    ring_bytes: int = RING_BYTES) -> Iterator[memoryview | bytes]:
    """The bytes of each (chunk id, length) of `chunks`, in order, each verified
    against its id, read by a child process: views of shared memory, each good until
    the next one is asked for (copy what is kept). `chunks` is iterated once in each
    process (after the fork: it may be a generator over a tree). An error reaches the
    caller at the chunk it concerns, as the kind the child met (CorruptData,
    StoreError...); a child that dies is a StoreError. Closing the iterator early ends
    the child."""
    ring = mmap.mmap(-1, ring_bytes)  # shared with the child: MAP_SHARED | MAP_ANONYMOUS
    data_r, data_w = os.pipe()
    credit_r, credit_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status = 1
        try:
            os.close(data_r)
            os.close(credit_w)
            _child(store, chunks, ring, data_w, credit_r)
            status = 0
        except BaseException:  # noqa: BLE001 - told to the parent already, or it is gone
            pass
        finally:
            os._exit(status)
    os.close(data_w)
    os.close(credit_r)
    return _parent(_Child(pid), chunks, ring, data_r, credit_w)


class _Child:
    """The reader process, reaped once (its id is never signalled after that: it may
    belong to another process by then)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.status: int | None = None
        self._lock = threading.Lock()

    def reap(self) -> int:
        with self._lock:
            while self.status is None:
                try:
                    self.status = os.waitpid(self.pid, 0)[1]
                except InterruptedError:
                    continue
                except ChildProcessError:
                    self.status = 0
            return self.status

    def kill(self) -> None:
        with self._lock:
            if self.status is None:
                os.kill(self.pid, signal.SIGKILL)  # our own child, not yet reaped

    def died(self) -> StoreError:
        status = self.reap()
        how = (f"was killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"exited with status {os.waitstatus_to_exitcode(status)}")
        return StoreError(f"the checkout's reader process {how} before it was done")


def _parent(child: _Child, chunks: Iterable[tuple[bytes, int]], ring: mmap.mmap, data_r: int,
            credit_w: int) -> Iterator[memoryview | bytes]:
    size = len(ring)
    view = memoryview(ring)
    pipe = os.fdopen(data_r, "rb", buffering=1 << 16)
    ready = 0  # chunks the child has made ready
    big: dict[int, bytes] = {}  # chunks too long for the ring, received through the pipe
    error: Exception | None = None  # met by the child at chunk `ready`
    done = False
    pos = 0  # where the next chunk starts in the ring (counted from the start)
    told = 0  # what the child was last told is consumed
    wanted = iter(chunks)
    try:
        for i, (_cid, n) in enumerate(wanted):
            while ready <= i:
                if error is not None:
                    raise error
                if done:
                    raise StoreError("the checkout's reader process ended early")
                if pos > told:  # before waiting: the child may be waiting for room
                    _tell(credit_w, pos)
                    told = pos
                kind, value = _read_msg(pipe, child)
                if kind == _READY:
                    ready = value
                elif kind == _BIG:
                    big[ready] = _read_exact(pipe, value, child)
                    ready += 1
                elif kind == _ERROR:
                    error = _read_error(pipe, child)
                    if value != ready:
                        raise StoreError("the checkout's reader process is out of step")
                elif kind == _DONE:
                    done = True
                else:
                    raise StoreError("the checkout's reader process sent garbage")
            if big:
                data = big.pop(i, None)
                if data is not None:
                    yield data
                    continue
            at = pos % size
            if at + n > size:  # the child skipped the ring's end
                pos += size - at
                at = 0
            yield view[at : at + n]
            pos += n
            if pos - told >= size // 4:
                _tell(credit_w, pos)
                told = pos
    finally:
        view.release()
        pipe.close()
        os.close(credit_w)
        if error is not None or next(wanted, None) is not None:  # it must stop now
            child.kill()
            child.reap()
        else:  # it has made every chunk ready: reaped when it ends, not waited for
            threading.Thread(target=child.reap, name="pylayers-reap", daemon=True).start()
        with contextlib.suppress(BufferError):  # a view still held by the caller
            ring.close()


def _tell(credit_w: int, pos: int) -> None:
    """Tell the child how far the ring is consumed. It may have finished and exited
    meanwhile (it runs up to a ring ahead); if it died, the data pipe says so."""
    with contextlib.suppress(BrokenPipeError):
        _write_all(credit_w, _CREDIT.pack(pos))


def _read_exact(pipe, n: int, child: _Child) -> bytes:
    data = pipe.read(n)
    if data is None or len(data) != n:
        raise child.died()
    return data


def _read_msg(pipe, child: _Child) -> tuple[bytes, int]:
    return _MSG.unpack(_read_exact(pipe, _MSG.size, child))


def _read_error(pipe, child: _Child) -> Exception:
    """The child's error: its kind's name and message."""
    (n,) = _CREDIT.unpack(_read_exact(pipe, _CREDIT.size, child))
    name, _, message = _read_exact(pipe, n, child).decode(errors="replace").partition("\n")
    kind = getattr(errors, name, None)
    if isinstance(kind, type) and issubclass(kind, PylayersError):
        try:
            return kind(message)
        except TypeError:
            pass
    return PylayersError(message)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _child(store: Store, chunks: Iterable[tuple[bytes, int]], ring: mmap.mmap,
           data_w: int, credit_r: int) -> None:
    from .index import forget_environments
    from .readahead import verified_chunks
    from .repository import Store

    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):  # die with the parent
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        return  # it died before the line above
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent reports an interrupt
    # glibc's malloc, in the child: blocks up to 32 MiB from the heap, and freed memory
    # kept (up to 256 MiB) for the next, not handed back to the kernel and faulted in
    # again. A chain's checkout makes a zstd dictionary and context a delta frame, a few
    # thousand of them: about 6% of the child's time went to page faults on the memory
    # they took.
    keep_freed_memory(32 << 20, 256 << 20)
    size = len(ring)
    view = memoryview(ring)
    pos = 0  # where the next chunk goes (counted from the start)
    freed = 0  # how far the parent has consumed
    said = 0  # chunks the parent was told are ready
    noted = 0  # `pos` when it was told
    note = 0  # tell it again past `noted` + this: at once, then 64 KiB... _NOTE_BYTES
    i = 0  # the next chunk to make ready
    try:
        ids: list[bytes] = []
        lengths: list[int] = []
        for cid, n in chunks:
            ids.append(cid)
            lengths.append(n)
        forget_environments()
        own = Store.open(store.path, create=False)
        for data in verified_chunks(own, ids, prefetch=True):
            n = len(data)
            if n != lengths[i]:
                raise CorruptData(f"chunk {ids[i].hex()} holds {n} bytes where its file's "
                                  f"entry says {lengths[i]}")
            if n > size // 2:  # through the pipe
                if i > said:
                    _write_all(data_w, _MSG.pack(_READY, i))
                _write_all(data_w, _MSG.pack(_BIG, n))
                _write_all(data_w, data)
                i += 1
                said = i
                continue
            at = pos % size
            if at + n > size:
                pos += size - at
                at = 0
            while pos + n - freed > size:  # wait for room, having said what is ready
                if i > said:
                    _write_all(data_w, _MSG.pack(_READY, i))
                    said, noted = i, pos
                got = os.read(credit_r, 4096)
                if not got:
                    return  # the parent is gone
                freed = _CREDIT.unpack_from(got, len(got) - _CREDIT.size)[0]
            view[at : at + n] = data
            pos += n
            i += 1
            if pos - noted >= note:  # the parent may be waiting: above all at first
                _write_all(data_w, _MSG.pack(_READY, i))
                said, noted = i, pos
                note = min(max(2 * note, 64 << 10), _NOTE_BYTES)
        if i > said:
            _write_all(data_w, _MSG.pack(_READY, i))
        _write_all(data_w, _MSG.pack(_DONE, 0))
    except BrokenPipeError:
        return  # the parent is gone, or stopped early
    except Exception as e:  # noqa: BLE001 - told to the parent, at chunk i
        if isinstance(e, OSError):
            e = StoreError(f"cannot read the store at {store.path}: {e.strerror or e}")
        try:
            if i > said:
                _write_all(data_w, _MSG.pack(_READY, i))
            text = f"{type(e).__name__}\n{e}".encode(errors="replace")
            _write_all(data_w, _MSG.pack(_ERROR, i) + _CREDIT.pack(len(text)) + text)
        except OSError:
            pass
