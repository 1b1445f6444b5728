"""Snapshots in containerd's sense, and the drivers that back them with directories.

Terms (as in containerd's `snapshots` package): a snapshot has a *key* and a *kind*.
An *active* snapshot is writable and made by `prepare(key, parent)`; a *view* is a
read-only one made by `view(key, parent)`; a *committed* snapshot is a layer, made by
`commit(name, key)` from an active snapshot, which is then gone. Only committed
snapshots can be parents. Kinds share one key space. `prepare` and `view` return
mounts as plain data; `Mount.mount(target)` or `mount_all(mounts, target)` performs
them and `unmount(target)` undoes them.

Modules: `types` (the value types), `drivers` (the Driver interface), `copy` and
`overlay` (the drivers), `registry` (drivers by name), `mounting` (performing mounts),
`snapshotter` (the Snapshotter), `mountpoints` (snapshots mounted at a directory and
remembered there: what `pylayers mount`, `umount` and `commit` call).
"""

from .mounting import attach, detach, is_mounted, mount_all, unmount
from .mountpoints import mount_ref, mounted_at, release, unmount_at
from .registry import DRIVERS, default_driver, driver_names, get_driver
from .snapshotter import Snapshotter
from .types import Info, Kind, Mount, Usage

__all__ = ["DRIVERS", "Info", "Kind", "Mount", "Snapshotter", "Usage", "attach",
           "default_driver", "detach", "driver_names", "get_driver", "is_mounted",
           "mount_all", "mount_ref", "mounted_at", "release", "unmount", "unmount_at"]
