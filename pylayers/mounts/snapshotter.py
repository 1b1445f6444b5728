"""The snapshotter: containerd's `snapshots.Snapshotter`, over pylayers layers.

State lives in the store's LMDB `snapshots` table and survives restarts. A committed
snapshot is a layer: `commit(name, key)` stores the active snapshot's changes as a new
layer on its parent and records `name` -> layer id. A parent may be given as the name
of a committed snapshot or as any layer reference (id, prefix, tag).

This module owns the `snapshots` table's records (`Info.encode`/`decode`). A record
references the layers it stands on (its parent layer; a committed snapshot's layer) in
the store's `refs` table, written and deleted with the record, so `Layers.remove`
refuses them without reading these records. Every check and the write it guards are
one transaction.

Crash safety: an active snapshot is recorded before its directory is filled, so a crash
in `prepare` leaves a snapshot that `remove` cleans up; `commit` writes the layer (one
LMDB transaction, see docs/format.md) and then replaces the active record with the
committed one, so a crash between leaves the active snapshot, which can be committed
again (the layer id is the same) or removed. A crash after a record is replaced or
deleted but before its directory is removed leaves an orphan directory: `cleanup`
(which gc runs) removes those.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ..layers.manifest import REG
from ..layers.repo import Layers, check_tag
from ..store.tables import Tables
from .drivers import Driver
from .registry import DRIVERS, DriverTable, get_driver
from .types import Info, Kind, Mount, Usage

GC_ROOT_LABEL = "pylayers.gc.root"
SNAPSHOT_REF = "snapshot"  # the `refs` owner name of a snapshot record


class Snapshotter:
    def __init__(self, layers: Layers, driver: str | None = None,
                 drivers: DriverTable = DRIVERS, *, background_removal: bool = False) -> None:
        """`driver`: the default driver's name (None: the best available here);
        `drivers`: the drivers by name (the registry's, unless given).
        `background_removal`: a committed or removed snapshot's directory is renamed out
        of the way at once and deleted by a background thread (a builder: deleting the
        tens of thousands of files a large COPY left in an upper directory is slow, and
        need not hold up the next step); `wait_removals()` waits for those. A crash
        leaves the renamed directory to `cleanup`, as any orphan."""
        self.layers = layers
        self.background_removal = background_removal
        self._removals: list[threading.Thread] = []
        self.drivers = drivers
        self.store = layers.store
        # absolute: mounts are data, performed wherever their user runs
        self.root = self.store.path.absolute() / "snapshots"
        self.default_driver = driver

    # -- records -------------------------------------------------------------------
    def _check_key(self, key: str) -> None:
        """A key the index can hold: non-empty, no NUL, at most LMDB's key size."""
        if not key or "\x00" in key:
            raise InvalidArgument("a snapshot key must be a non-empty string without NUL")
        try:
            size = len(key.encode())
        except UnicodeEncodeError:
            raise InvalidArgument("a snapshot key must be valid Unicode text") from None
        limit = self.store.max_key_size()
        if size > limit:
            raise InvalidArgument(f"a snapshot key must be at most {limit} bytes")

    def _get(self, key: str) -> Info | None:
        try:
            self._check_key(key)
        except InvalidArgument:
            return None  # no such snapshot can exist
        with self.store.read() as t:
            return _get_in(t, key)

    def stat(self, key: str) -> Info:
        info = self._get(key)
        if info is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return info

    def walk(self, kind: Kind | None = None, parent: str | None = None,
             labels: dict[str, str] | None = None) -> Iterator[Info]:
        """Every snapshot, optionally only those of a kind, on a parent, or carrying all
        the given labels (a value of "*" matches any value)."""
        with self.store.read() as t:
            infos = [Info.decode(raw) for _k, raw in t.snapshots.items()]
        for info in infos:
            if kind is not None and info.kind != kind:
                continue
            if parent is not None and info.parent != parent:
                continue
            if labels and any(info.labels.get(k) != v and not (v == "*" and k in info.labels)
                              for k, v in labels.items()):
                continue
            yield info

    def update(self, key: str, labels: dict[str, str]) -> Info:
        """Set (or, with an empty value, delete) labels."""
        self.stat(key)
        with self.store.write() as t:
            info = _get_in(t, key)
            if info is None:
                raise NotFound(f"snapshot {key!r} does not exist")
            for k, v in labels.items():
                if v == "":
                    info.labels.pop(k, None)
                else:
                    info.labels[k] = v
            info.updated = time.time()
            t.snapshots.put(key, info.encode())  # the same layers: the same references
        return info

    # -- lifecycle -------------------------------------------------------------------
    def _parent_layer(self, parent: str | None) -> bytes | None:
        if parent is None:
            return None
        info = self._get(parent)
        if info is not None:
            if info.kind != Kind.COMMITTED:
                raise FailedPrecondition(f"cannot use snapshot {parent!r} as a parent: it "
                                         f"is {info.kind.value}; only "
                                         "committed snapshots can be parents")
            return bytes.fromhex(info.layer)
        return self.layers.resolve(parent)

    def _driver(self, name: str | None) -> Driver:
        return get_driver(name or self.default_driver, self.layers, self.drivers)

    def _create(self, key: str, parent: str | None, kind: Kind,
                labels: dict[str, str] | None, driver: str | None) -> list[Mount]:
        self._check_key(key)
        if self._get(key) is not None:
            raise AlreadyExists(f"cannot create snapshot {key!r}: it already exists")
        parent_layer = self._parent_layer(parent)
        drv = self._driver(driver)
        now = time.time()
        info = Info(key, kind, parent, parent_layer.hex() if parent_layer else None,
                    driver=drv.name, dir_id=os.urandom(8).hex(), labels=dict(labels or {}),
                    created=now, updated=now)
        # First, so a crash below leaves something `remove` can clean. One transaction
        # checks and claims the key, and checks the parent again: of concurrent
        # prepares of one key only one wins, and none builds on a parent just removed
        # (its reference to the parent layer keeps the layer from `rm` from then on).
        parent_is_snapshot = parent is not None and self._get(parent) is not None
        with self.store.write() as t:
            if parent_is_snapshot:
                now_parent = _get_in(t, parent)
                if now_parent is None or now_parent.kind != Kind.COMMITTED \
                        or now_parent.layer != info.parent_layer:
                    raise FailedPrecondition(f"parent {parent!r} changed meanwhile")
            if parent_layer is not None and not t.layers.has(parent_layer):
                raise NotFound(f"parent layer {parent_layer.hex()} was removed meanwhile")
            if not t.snapshots.add(key, info.encode()):
                raise AlreadyExists(f"cannot create snapshot {key!r}: it already exists")
            _add_refs(t, info)
        sdir = self.root / info.dir_id
        try:
            drv.create(sdir, parent_layer, readonly=(kind == Kind.VIEW))
        except BaseException:
            self._discard(info)
            raise
        return drv.mounts(sdir, parent_layer, readonly=(kind == Kind.VIEW))

    def prepare(self, key: str, parent: str | None = None,
                labels: dict[str, str] | None = None, driver: str | None = None) -> list[Mount]:
        """A writable snapshot on `parent`; returns its mounts."""
        return self._create(key, parent, Kind.ACTIVE, labels, driver)

    def view(self, key: str, parent: str | None = None,
             labels: dict[str, str] | None = None, driver: str | None = None) -> list[Mount]:
        """A read-only snapshot of `parent`; returns its mounts."""
        return self._create(key, parent, Kind.VIEW, labels, driver)

    def mounts(self, key: str) -> list[Mount]:
        info = self.stat(key)
        if info.kind == Kind.COMMITTED:
            raise FailedPrecondition(f"cannot mount snapshot {key!r}: it is committed; "
                                     "make a view of it")
        drv = self._driver(info.driver)
        parent = bytes.fromhex(info.parent_layer) if info.parent_layer else None
        return drv.mounts(self.root / info.dir_id, parent, readonly=(info.kind == Kind.VIEW))

    def content_dir(self, key: str) -> Path:
        """The directory holding snapshot `key`'s own content (the overlay driver's
        upper directory, the copy driver's whole tree): what a commit reads."""
        return self.root / self.stat(key).dir_id / "fs"

    def commit(self, name: str | None, key: str, labels: dict[str, str] | None = None,
               message: str = "", tag: str | None = None,
               progress: Callable[[int], None] | None = None) -> bytes:
        """Store the active snapshot `key` as a layer, recorded as the committed snapshot
        `name` (None: named by the layer's id, in hex; if a committed snapshot of that
        layer already has that name, it is kept and gets `labels`); `key` is removed.
        Returns the layer id; `progress` is called with the bytes read as it goes."""
        info = self.stat(key)
        if info.kind != Kind.ACTIVE:
            raise FailedPrecondition(f"cannot commit snapshot {key!r}: it is a "
                                     f"{info.kind.value} snapshot, not an active one")
        if name is not None:
            self._check_key(name)
        if tag is not None:
            check_tag(tag)  # before the work (Layers._commit checks it again)
        if name is not None and name != key and self._get(name) is not None:
            raise AlreadyExists(f"cannot commit as {name!r}: a snapshot of that name "
                                "already exists")
        drv = self._driver(info.driver)
        parent = bytes.fromhex(info.parent_layer) if info.parent_layer else None
        layer_id = drv.commit(self.root / info.dir_id, parent, message=message, tag=tag,
                              progress=progress)
        final = name if name is not None else layer_id.hex()
        now = time.time()
        committed = Info(final, Kind.COMMITTED, info.parent, info.parent_layer,
                         layer=layer_id.hex(), driver=info.driver,
                         labels={**info.labels, **(labels or {})}, created=now, updated=now)
        with self.store.write() as t:
            current = _get_in(t, key)
            if current is None or current.dir_id != info.dir_id:
                raise NotFound(f"snapshot {key!r} was removed or committed meanwhile")
            if not t.layers.has(layer_id):
                raise NotFound(f"layer {layer_id.hex()} was removed meanwhile")
            existing = _get_in(t, final) if final != key else None
            if existing is not None:
                if name is not None or existing.kind != Kind.COMMITTED \
                        or existing.layer != committed.layer:
                    raise AlreadyExists(f"cannot commit as {final!r}: a snapshot of that name "
                                        "already exists")
                existing.labels.update(labels or {})
                existing.updated = now
                committed = existing
            _delete_in(t, current)
            t.snapshots.put(final, committed.encode())
            _add_refs(t, committed)
        self._remove_dir(drv, info.dir_id)
        return layer_id

    def remove(self, key: str) -> None:
        """Remove a snapshot; refused while another snapshot has it as parent."""
        info = self.stat(key)
        if info.kind == Kind.COMMITTED:
            # committed snapshots have no directory: check and delete in one transaction,
            # so that no prepare on this parent slips in between
            with self.store.write() as t:
                for _k, raw in t.snapshots.items():
                    kid = Info.decode(raw)
                    if kid.parent == key:
                        raise FailedPrecondition(
                            f"cannot remove snapshot {key!r}: it is the parent of "
                            f"{kid.key!r}")
                current = _get_in(t, key)
                if current is not None:
                    _delete_in(t, current)
            return
        self._discard(info)

    def _discard(self, info: Info) -> None:
        """Remove an active snapshot or view: its record, then its directory (a crash
        between leaves an orphan directory, which `cleanup` removes)."""
        with self.store.write() as t:
            current = _get_in(t, info.key)
            if current is not None and current.dir_id == info.dir_id:
                _delete_in(t, current)
        if info.kind != Kind.COMMITTED and info.dir_id:
            self._remove_dir(self._driver(info.driver), info.dir_id)

    def _remove_dir(self, drv: Driver, dir_id: str) -> None:
        """Remove a snapshot directory whose record is gone: at once, or (with
        `background_removal`) renamed to `.removing-<dir_id>` (an orphan name no record
        can hold) and deleted by a thread."""
        sdir = self.root / dir_id
        if not self.background_removal:
            drv.remove(sdir)
            return
        gone = self.root / f".removing-{dir_id}"
        try:
            os.rename(sdir, gone)
        except FileNotFoundError:
            return
        except OSError:
            drv.remove(sdir)
            return
        self._removals = [t for t in self._removals if t.is_alive()]
        thread = threading.Thread(target=_delete, args=(drv, gone),
                                  name=f"pylayers-remove-{dir_id}")
        thread.start()
        self._removals.append(thread)

    def wait_removals(self) -> None:
        """Wait until the directories being deleted in the background are gone."""
        while self._removals:
            self._removals.pop().join()

    def usage(self, key: str) -> Usage:
        info = self.stat(key)
        if info.kind == Kind.COMMITTED:
            entries = self.layers.entries(bytes.fromhex(info.layer))
            files = [e for e in entries if e.kind == REG]
            return Usage(sum(e.size for e in files), len(entries),
                         self.layers.record(bytes.fromhex(info.layer)).new_bytes)
        drv = self._driver(info.driver)
        parent = bytes.fromhex(info.parent_layer) if info.parent_layer else None
        return drv.usage(self.root / info.dir_id, parent)

    def collect(self) -> list[str]:
        """containerd's gc rule for committed snapshots: remove those that nothing
        references: no `pylayers.gc.root` label, not the parent of another snapshot,
        their layer neither tagged nor the parent of another layer or snapshot. Their
        layers go too (asked of `Layers`), unless another snapshot stands on them or
        `snapshot` made the same layer (its record says `kept`). Repeats until nothing
        changes (removing one may free its parent), all in one transaction. Returns the
        removed keys."""
        removed: list[str] = []
        with self.store.write() as t:
            while True:
                infos = [Info.decode(raw) for _k, raw in t.snapshots.items()]
                parents = {i.parent for i in infos if i.parent}
                parent_layers = {i.parent_layer for i in infos if i.parent_layer}
                victims = [i for i in infos if i.kind == Kind.COMMITTED
                           and GC_ROOT_LABEL not in i.labels and i.key not in parents
                           and i.layer not in parent_layers
                           and self.layers.in_use_in(t, bytes.fromhex(i.layer),
                                                     owners=(SNAPSHOT_REF,)) is None]
                if not victims:
                    return removed
                for info in victims:
                    _delete_in(t, info)
                    self.layers.remove_unused_in(t, bytes.fromhex(info.layer))
                    removed.append(info.key)

    def cleanup(self) -> list[str]:
        """Remove the directories under STORE/snapshots/ that no snapshot record names
        (containerd's `Cleanup`): a crash between a record's removal or replacement and
        its directory's removal leaves one. The directories are listed before the
        records are read: `prepare` records a snapshot before it makes its directory, so
        a directory listed then is named by a record read after, or is an orphan.
        Returns the names removed."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        with self.store.read() as t:
            named = {Info.decode(raw).dir_id for _k, raw in t.snapshots.items()}
        removed = []
        for name in sorted(set(names) - named):
            path = self.root / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(name)
        return removed


def _delete(drv: Driver, path: Path) -> None:
    """A background removal: the driver's, and what is left of it if that fails (gc's
    `cleanup` may be deleting the same orphan)."""
    try:
        drv.remove(path)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def _get_in(t: Tables, key: str) -> Info | None:
    raw = t.snapshots.get(key)
    return Info.decode(raw) if raw is not None else None


def _layers_of(info: Info) -> set[bytes]:
    """The layers a snapshot record stands on."""
    return {bytes.fromhex(h) for h in (info.parent_layer, info.layer) if h}


def _add_refs(t: Tables, info: Info) -> None:
    for lid in _layers_of(info):
        t.refs.add(lid, SNAPSHOT_REF, info.key.encode())


def _delete_in(t: Tables, info: Info) -> None:
    """Delete the record `info` (as stored) and its references."""
    t.snapshots.delete(info.key)
    for lid in _layers_of(info):
        t.refs.remove(lid, SNAPSHOT_REF, info.key.encode())
