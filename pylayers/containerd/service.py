"""containerd's snapshot service (`containerd.services.snapshots.v1.Snapshots`) over
the pylayers Snapshotter, for containerd's proxy snapshotter plugin.

Namespaces: containerd sends its namespace as the `containerd-namespace` gRPC metadata
(none: `default`, as `ctr` has it). A key KEY of namespace NS is the Snapshotter's key
`NS/KEY` (a namespace holds no "/"), so namespaces never see each other's snapshots;
answers translate the keys back.

Lifetime: containerd decides when its snapshots go (its garbage collector removes what
its metadata no longer references), so every snapshot made through this service
carries the `pylayers.gc.root` label: `pylayers gc` never collects them. The label is
not shown to containerd.

Errors: pylayers' error kinds become the gRPC codes containerd's proxy client turns back
into its errdefs (NotFound, AlreadyExists, FailedPrecondition, InvalidArgument;
Unavailable for a store that cannot be opened; Unimplemented for a rebase on commit,
containerd 2.2's parallel unpack, which pylayers does not declare); anything else is
Unknown with a one-line message. Every failed call is one line in the log, never a
traceback (a bug's traceback only with PYLAYERS_DEBUG=1).

Each call opens the store (shared lock) and closes it after, so a `pylayers` command
(even `gc`, which takes the lock exclusively) can run between calls, and a restart of
the service loses nothing. Calls are served one at a time.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from google.protobuf import empty_pb2

from ..display import one_line
from ..errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PylayersError,
    StoreError,
    UsageError,
)
from ..layers.repo import Layers
from ..mounts import Info, Kind, Mount, Snapshotter, is_mounted
from ..mounts.snapshotter import GC_ROOT_LABEL
from ..store import Store
from . import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from .filters import parse_filters

log = logging.getLogger("pylayers.containerd")

NAMESPACE_HEADER = "containerd-namespace"
DEFAULT_NAMESPACE = "default"
# containerd's identifiers (pkg/identifiers): alphanumerics joined by single . _ -
_IDENTIFIER = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")
_MAX_IDENTIFIER = 76
_MAX_LABEL = 4096  # containerd's limit on a label's key and value together

KIND_TO_PB = {Kind.VIEW: snapshots_pb2.VIEW, Kind.ACTIVE: snapshots_pb2.ACTIVE,
              Kind.COMMITTED: snapshots_pb2.COMMITTED}
HIDDEN_LABELS = {GC_ROOT_LABEL}
CONTAINERD_ROOT = {GC_ROOT_LABEL: "containerd"}

CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (UsageError, grpc.StatusCode.INVALID_ARGUMENT),
    (StoreError, grpc.StatusCode.UNAVAILABLE),
]


class Unimplemented(PylayersError):
    """What this snapshotter does not do (containerd's errdefs.ErrNotImplemented)."""


def status_of(err: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and one-line message an exception is answered with."""
    if isinstance(err, Unimplemented):
        return grpc.StatusCode.UNIMPLEMENTED, one_line(str(err))
    if isinstance(err, PylayersError):
        for kind, code in CODES:
            if isinstance(err, kind):
                return code, one_line(str(err))
        return grpc.StatusCode.UNKNOWN, one_line(str(err))
    if isinstance(err, OSError):
        name = os.fsdecode(err.filename) if err.filename is not None else ""
        what = f"{name}: " if name else ""
        if err.errno == errno.ENOSPC:
            return grpc.StatusCode.RESOURCE_EXHAUSTED, one_line(f"{what}no space left on device")
        return grpc.StatusCode.UNKNOWN, one_line(what + str(err.strerror or err))
    return grpc.StatusCode.UNKNOWN, one_line(f"internal error: {type(err).__name__}: {err}")


class Namespace:
    """One containerd namespace's view of the Snapshotter's keys."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.prefix = name + "/"

    def key(self, key: str, what: str = "key") -> str:
        if not key:
            raise InvalidArgument(f"a snapshot {what} must not be empty")
        return self.prefix + key

    def own(self, key: str | None) -> bool:
        return key is not None and key.startswith(self.prefix)

    def strip(self, key: str | None) -> str:
        return key[len(self.prefix):] if self.own(key) else ""


def namespace_of(context: grpc.ServicerContext) -> Namespace:
    values = [v for k, v in context.invocation_metadata() or () if k == NAMESPACE_HEADER]
    name = values[0] if values else DEFAULT_NAMESPACE
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    if not name:
        name = DEFAULT_NAMESPACE
    if len(name) > _MAX_IDENTIFIER or not _IDENTIFIER.fullmatch(name):
        raise InvalidArgument(f"invalid containerd namespace {name!r}")
    return Namespace(name)


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    for k, v in labels.items():
        if len(k.encode()) + len(v.encode()) > _MAX_LABEL:
            raise InvalidArgument(f"label {k[:40]!r}: key and value exceed {_MAX_LABEL} bytes")
        if k in HIDDEN_LABELS:
            raise InvalidArgument(f"label {k!r} is reserved by pylayers")
    return dict(labels)


def mounts_pb(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options))
            for m in mounts]


def info_pb(ns: Namespace, info: Info) -> snapshots_pb2.Info:
    out = snapshots_pb2.Info(name=ns.strip(info.key), parent=ns.strip(info.parent),
                             kind=KIND_TO_PB[info.kind],
                             labels={k: v for k, v in info.labels.items()
                                     if k not in HIDDEN_LABELS})
    out.created_at.FromNanoseconds(int(info.created * 1e9))
    out.updated_at.FromNanoseconds(int(info.updated * 1e9))
    return out


class SnapshotsService(snapshots_pb2_grpc.SnapshotsServicer):
    """The gRPC servicer: one store, opened per call. `driver`: the Snapshotter's
    driver for new snapshots (None: the best available here)."""

    def __init__(self, store_path: str | os.PathLike[str] | None,
                 driver: str | None = None) -> None:
        self.store_path = Path(store_path) if store_path is not None else None
        self.driver = driver
        self._lock = threading.Lock()

    @contextmanager
    def snapshotter(self) -> Iterator[Snapshotter]:
        with self._lock:
            store = Store.open(self.store_path, create=True)
            try:
                yield Snapshotter(Layers(store), self.driver)
            finally:
                store.close()

    def _call(self, context: grpc.ServicerContext, name: str,
              fn: Callable[[Namespace, Snapshotter], object], default: object) -> object:
        """Run `fn` and answer with its result; on an error, set the call's code and
        details, log one line, and answer `default` (an empty message)."""
        ns: Namespace | None = None
        try:
            ns = namespace_of(context)
            with self.snapshotter() as snaps:
                return fn(ns, snaps)
        except Exception as err:  # every error becomes a status, never a traceback
            if os.environ.get("PYLAYERS_DEBUG") and not isinstance(err, PylayersError):
                log.exception("%s failed", name)
            code, msg = status_of(err)
            if ns is not None:  # the keys as containerd named them
                msg = msg.replace("'" + ns.prefix, "'")
            log.info("%s: %s: %s", name, code.name, msg)
            context.set_code(code)
            context.set_details(msg)
            return default

    # -- lifecycle ---------------------------------------------------------------------
    def _parent(self, ns: Namespace, snaps: Snapshotter, parent: str) -> str | None:
        """The parent's Snapshotter key, checked as containerd does: it exists in this
        namespace (NotFound) and is committed (InvalidArgument)."""
        if not parent:
            return None
        key = ns.key(parent, "parent")
        try:
            info = snaps.stat(key)
        except NotFound:
            raise NotFound(f"parent snapshot {parent!r} does not exist") from None
        if info.kind != Kind.COMMITTED:
            raise InvalidArgument(f"parent {parent!r} is not a committed snapshot "
                                  f"(it is {info.kind.value})")
        return key

    def _create(self, request, context, view: bool):
        def do(ns: Namespace, snaps: Snapshotter):
            key = ns.key(request.key)
            labels = {**check_labels(dict(request.labels)), **CONTAINERD_ROOT}
            parent = self._parent(ns, snaps, request.parent)
            make = snaps.view if view else snaps.prepare
            return mounts_pb(make(key, parent, labels=labels))
        mounts = self._call(context, "View" if view else "Prepare", do, None)
        cls = snapshots_pb2.ViewSnapshotResponse if view else \
            snapshots_pb2.PrepareSnapshotResponse
        return cls(mounts=mounts or [])

    def Prepare(self, request, context):
        return self._create(request, context, view=False)

    def View(self, request, context):
        return self._create(request, context, view=True)

    def Mounts(self, request, context):
        mounts = self._call(context, "Mounts",
                            lambda ns, s: mounts_pb(s.mounts(ns.key(request.key))), None)
        return snapshots_pb2.MountsResponse(mounts=mounts or [])

    def Commit(self, request, context):
        def do(ns: Namespace, snaps: Snapshotter):
            name, key = ns.key(request.name, "name"), ns.key(request.key)
            labels = {**check_labels(dict(request.labels)), **CONTAINERD_ROOT}
            if request.parent:  # containerd 2.2+: rebase on commit (parallel unpack)
                have = snaps.stat(key).parent
                if have != ns.key(request.parent, "parent"):
                    if have:
                        raise InvalidArgument(f"cannot change parent of active snapshot "
                                              f"{request.key!r} on commit")
                    raise Unimplemented(f"cannot rebase snapshot {request.key!r} on "
                                        f"{request.parent!r}: pylayers does not declare "
                                        "containerd's 'rebase' capability")
            snaps.commit(name, key, labels=labels)
        self._call(context, "Commit", do, None)
        return empty_pb2.Empty()

    def Remove(self, request, context):
        self._call(context, "Remove", lambda ns, s: s.remove(ns.key(request.key)), None)
        return empty_pb2.Empty()

    # -- information ---------------------------------------------------------------------
    def Stat(self, request, context):
        info = self._call(context, "Stat",
                          lambda ns, s: info_pb(ns, s.stat(ns.key(request.key))), None)
        return snapshots_pb2.StatSnapshotResponse(info=info)

    def Update(self, request, context):
        def do(ns: Namespace, snaps: Snapshotter):
            key = ns.key(request.info.name, "name")
            current = snaps.stat(key)
            given = check_labels(dict(request.info.labels))
            paths = list(request.update_mask.paths) if request.HasField("update_mask") \
                else []
            old = {k: v for k, v in current.labels.items() if k not in HIDDEN_LABELS}
            new = dict(old)
            if not paths:
                new = given
            for path in paths:
                if path.startswith("labels."):
                    label = path[len("labels."):]
                    if given.get(label, ""):
                        new[label] = given[label]
                    else:
                        new.pop(label, None)
                elif path == "labels":
                    new = given
                else:
                    raise InvalidArgument(f"cannot update field {path!r} of snapshot "
                                          f"{request.info.name!r}")
            changes = {k: "" for k in old if k not in new}
            changes.update({k: v for k, v in new.items() if v != ""})
            return info_pb(ns, snaps.update(key, changes))
        info = self._call(context, "Update", do, None)
        return snapshots_pb2.UpdateSnapshotResponse(info=info)

    def List(self, request, context):
        match = None

        def do(ns: Namespace, snaps: Snapshotter):
            nonlocal match
            match = parse_filters(list(request.filters))
            return [info_pb(ns, i) for i in snaps.walk() if ns.own(i.key)]
        infos = self._call(context, "List", do, None)
        if infos is None:
            return
        infos = [i for i in infos if match is None or match(i)]
        for start in range(0, len(infos), 100):  # containerd sends batches of 100 too
            yield snapshots_pb2.ListSnapshotsResponse(info=infos[start:start + 100])

    def Usage(self, request, context):
        def do(ns: Namespace, snaps: Snapshotter):
            return snaps.usage(ns.key(request.key))
        usage = self._call(context, "Usage", do, None)
        if usage is None:
            return snapshots_pb2.UsageResponse()
        return snapshots_pb2.UsageResponse(size=usage.size, inodes=usage.inodes)

    def Cleanup(self, request, context):
        """containerd's Cleanup (after its garbage collection): remove snapshot
        directories no snapshot record names (left by a process killed between its
        steps). The layer caches' space is `pylayers gc`'s to reclaim."""
        self._call(context, "Cleanup", lambda ns, s: remove_orphan_dirs(s), None)
        return empty_pb2.Empty()


_DIR_ID = re.compile(r"[0-9a-f]{16}")


def remove_orphan_dirs(snaps: Snapshotter) -> list[str]:
    """Remove the directories under STORE/snapshots that no snapshot names, unless
    something is mounted in them; returns their names. A snapshot's record is written
    before its directory is made, so the records are read after the directories: a
    directory made meanwhile has its record in that read."""
    try:
        found = [e.name for e in os.scandir(snaps.root)
                 if _DIR_ID.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []
    live = {i.dir_id for i in snaps.walk() if i.dir_id}
    removed = []
    for name in found:
        path = snaps.root / name
        if name in live or any(is_mounted(p) for p in (path, path / "fs")):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(name)
    if removed:
        log.info("Cleanup: removed %d orphaned snapshot directories", len(removed))
    return removed


def serve(address: str, store_path: str | os.PathLike[str] | None,
          driver: str | None = None, workers: int = 4) -> tuple[grpc.Server, Callable[[], None]]:
    """Start serving on the unix socket `address` (an existing socket file is replaced
    only if nothing answers on it); returns the server and a stop function that stops
    it and removes the socket."""
    path = os.path.abspath(address)
    if os.path.exists(path) or os.path.islink(path):
        _check_stale_socket(path)
    # the store must open here and now: a wrong path is an error at start, not per call
    Store.open(store_path, create=True).close()
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(ThreadPoolExecutor(max_workers=workers),
                         options=[("grpc.so_reuseport", 0)])
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(
        SnapshotsService(store_path, driver), server)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        server.add_insecure_port(f"unix:{path}")
    except RuntimeError as err:
        raise InvalidArgument(f"cannot listen on {path}: {err}") from None
    server.start()
    os.chmod(path, 0o660)

    def stop() -> None:
        server.stop(grace=5).wait()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return server, stop


def _check_stale_socket(path: str) -> None:
    import socket
    import stat

    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode):
        raise FailedPrecondition(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            os.unlink(path)  # nothing listens: a socket left by a killed server
            return
    raise AlreadyExists(f"{path}: another server is listening there")
