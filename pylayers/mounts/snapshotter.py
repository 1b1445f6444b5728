"""The snapshotter: containerd's `snapshots.Snapshotter`, over pylayers layers.

State lives in the store's LMDB `snapshots` table and survives restarts. A committed
snapshot is a layer: `commit(name, key)` stores the active snapshot's changes as a new
layer on its parent and records `name` -> layer id. A parent may be given as the name
of a committed snapshot or as any layer reference (id, prefix, tag).

Crash safety: an active snapshot is recorded before its directory is filled, so a crash
in `prepare` leaves a snapshot that `remove` cleans up; `commit` writes the layer (one
LMDB transaction, see docs/format.md) and then replaces the active record with the
committed one, so a crash between leaves the active snapshot, which can be committed
again (the layer id is the same) or removed.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ..layers.manifest import REG
from ..layers.repo import Layers, check_tag
from .drivers import Driver
from .registry import DRIVERS, DriverTable, get_driver
from .types import Info, Kind, Mount, Usage

GC_ROOT_LABEL = "pylayers.gc.root"


class Snapshotter:
    def __init__(self, layers: Layers, driver: str | None = None,
                 drivers: DriverTable = DRIVERS) -> None:
        """`driver`: the default driver's name (None: the best available here);
        `drivers`: the drivers by name (the registry's, unless given)."""
        self.layers = layers
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
        limit = self.store.env.max_key_size()
        if size > limit:
            raise InvalidArgument(f"a snapshot key must be at most {limit} bytes")

    def _get(self, key: str) -> Info | None:
        try:
            self._check_key(key)
        except InvalidArgument:
            return None  # no such snapshot can exist
        raw = self.store.get("snapshots", key.encode())
        return Info.decode(raw) if raw is not None else None

    def _put(self, info: Info) -> None:
        self.store.put("snapshots", info.key.encode(), info.encode())

    def stat(self, key: str) -> Info:
        info = self._get(key)
        if info is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return info

    def walk(self, kind: Kind | None = None, parent: str | None = None,
             labels: dict[str, str] | None = None) -> Iterator[Info]:
        """Every snapshot, optionally only those of a kind, on a parent, or carrying all
        the given labels (a value of "*" matches any value)."""
        for _k, raw in self.store.items("snapshots"):
            info = Info.decode(raw)
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
        info = self.stat(key)
        for k, v in labels.items():
            if v == "":
                info.labels.pop(k, None)
            else:
                info.labels[k] = v
        info.updated = time.time()
        self._put(info)
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
        # prepares of one key only one wins, and none builds on a parent just removed.
        parent_is_snapshot = parent is not None and self._get(parent) is not None
        with self.store.transaction(write=True) as txn:
            db = self.store.db["snapshots"]
            if parent_is_snapshot:
                raw = txn.get(parent.encode(), db=db)
                now_parent = Info.decode(raw) if raw is not None else None
                if now_parent is None or now_parent.kind != Kind.COMMITTED \
                        or now_parent.layer != info.parent_layer:
                    raise FailedPrecondition(f"parent {parent!r} changed meanwhile")
            if not txn.put(key.encode(), info.encode(), db=db, overwrite=False):
                raise AlreadyExists(f"cannot create snapshot {key!r}: it already exists")
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

    def commit(self, name: str, key: str, labels: dict[str, str] | None = None,
               message: str = "", tag: str | None = None) -> bytes:
        """Store the active snapshot `key` as a layer named `name`; `key` is removed."""
        info = self.stat(key)
        if info.kind != Kind.ACTIVE:
            raise FailedPrecondition(f"cannot commit snapshot {key!r}: it is a "
                                     f"{info.kind.value} snapshot, not an active one")
        self._check_key(name)
        if tag is not None:
            check_tag(tag)  # before the work (Layers._commit checks it again)
        existing = self._get(name)
        if existing is not None and name != key:
            raise AlreadyExists(f"cannot commit as {name!r}: a snapshot of that name "
                                "already exists")
        drv = self._driver(info.driver)
        parent = bytes.fromhex(info.parent_layer) if info.parent_layer else None
        layer_id = drv.commit(self.root / info.dir_id, parent, message=message, tag=tag)
        now = time.time()
        committed = Info(name, Kind.COMMITTED, info.parent, info.parent_layer,
                         layer=layer_id.hex(), driver=info.driver,
                         labels={**info.labels, **(labels or {})}, created=now, updated=now)
        with self.store.transaction(write=True) as txn:
            db = self.store.db["snapshots"]
            current = txn.get(key.encode(), db=db)
            if current is None or Info.decode(current).dir_id != info.dir_id:
                raise NotFound(f"snapshot {key!r} was removed or committed meanwhile")
            if name != key and txn.get(name.encode(), db=db) is not None:
                raise AlreadyExists(f"cannot commit as {name!r}: a snapshot of that name "
                                    "already exists")
            txn.delete(key.encode(), db=db)
            txn.put(name.encode(), committed.encode(), db=db)
        drv.remove(self.root / info.dir_id)
        return layer_id

    def remove(self, key: str) -> None:
        """Remove a snapshot; refused while another snapshot has it as parent."""
        info = self.stat(key)
        if info.kind == Kind.COMMITTED:
            # committed snapshots have no directory: check and delete in one transaction,
            # so that no prepare on this parent slips in between
            with self.store.transaction(write=True) as txn:
                db = self.store.db["snapshots"]
                for _k, raw in txn.cursor(db=db):
                    kid = Info.decode(raw)
                    if kid.parent == key:
                        raise FailedPrecondition(
                            f"cannot remove snapshot {key!r}: it is the parent of "
                            f"{kid.key!r}")
                txn.delete(key.encode(), db=db)
            return
        self._discard(info)

    def _discard(self, info: Info) -> None:
        if info.kind != Kind.COMMITTED and info.dir_id:
            self._driver(info.driver).remove(self.root / info.dir_id)
        self.store.delete("snapshots", info.key.encode())

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
        their layer neither tagged nor the parent of another layer. Their layers go too,
        unless `snapshot` made the same layer (its record says `kept`).
        Repeats until nothing changes (removing one may free its parent). Returns the
        removed keys."""
        removed: list[str] = []
        while True:
            infos = list(self.walk())
            parents = {i.parent for i in infos if i.parent}
            parent_layers = {i.parent_layer for i in infos if i.parent_layer}
            tagged = {lid.hex() for lid in self.layers.tags().values()}
            layer_kids = {p.hex() for p in self.layers.children()}
            victims = [i for i in infos if i.kind == Kind.COMMITTED
                       and GC_ROOT_LABEL not in i.labels and i.key not in parents
                       and i.layer not in tagged and i.layer not in layer_kids
                       and i.layer not in parent_layers]
            if not victims:
                return removed
            for info in victims:
                self.store.delete("snapshots", info.key.encode())
                others = [i for i in self.walk() if i.layer == info.layer]
                lid = bytes.fromhex(info.layer)
                if not others and not self.layers.record(lid).kept:
                    self.store.delete("layers", lid)
                removed.append(info.key)

    def protected_layers(self) -> set[bytes]:
        """Layers gc and rm must keep: parents of active snapshots and views, and
        committed snapshots (by their layer)."""
        out = set()
        for info in self.walk():
            if info.parent_layer:
                out.add(bytes.fromhex(info.parent_layer))
            if info.layer:
                out.add(bytes.fromhex(info.layer))
        return out


def remove_tree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
