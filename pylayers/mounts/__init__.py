"""Snapshots in containerd's sense, and the drivers that back them with directories.

Terms (as in containerd's `snapshots` package): a snapshot has a *key* and a *kind*.
An *active* snapshot is writable and made by `prepare(key, parent)`; a *view* is a
read-only one made by `view(key, parent)`; a *committed* snapshot is a layer, made by
`commit(name, key)` from an active snapshot, which is then gone. Only committed
snapshots can be parents. Kinds share one key space. `prepare` and `view` return
mounts as plain data; the caller mounts them.
"""

from .snapshotter import Info, Kind, Mount, Snapshotter, Usage

__all__ = ["Info", "Kind", "Mount", "Snapshotter", "Usage"]
