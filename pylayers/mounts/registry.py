"""The drivers by name, and the default choice: the CLI's `--driver` choices and the
Snapshotter read this. A Snapshotter can also be given its own mapping."""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import InvalidArgument
from ..layers.repo import Layers
from .copy import CopyDriver
from .drivers import Driver
from .overlay import OverlayDriver

DriverTable = Mapping[str, type[Driver]]

# in order of preference: the default is the first one available here
DRIVERS: DriverTable = {"overlay": OverlayDriver, "copy": CopyDriver}


def driver_names(drivers: DriverTable = DRIVERS) -> list[str]:
    return list(drivers)


def default_driver(drivers: DriverTable = DRIVERS) -> str:
    """The first driver that works here (overlay where this process can mount
    overlayfs, else copy)."""
    for name, cls in drivers.items():
        if cls.unavailable() is None:
            return name
    raise InvalidArgument("no snapshot driver works here: " + "; ".join(
        f"{name}: {cls.unavailable()}" for name, cls in drivers.items()))


def get_driver(name: str | None, layers: Layers, drivers: DriverTable = DRIVERS) -> Driver:
    """The driver `name` (None: the default) for `layers`; InvalidArgument if it is
    unknown or does not work here (saying why)."""
    if name is None:
        name = default_driver(drivers)
    cls = drivers.get(name)
    if cls is None:
        raise InvalidArgument(f"unknown driver {name!r} (known: {', '.join(drivers)})")
    reason = cls.unavailable()
    if reason is not None:
        raise InvalidArgument(f"driver {name} is not available here: {reason}")
    return cls(layers)


def collect_driver_caches(layers: Layers, live_layers: set[bytes],
                          drivers: DriverTable = DRIVERS) -> int:
    """Every driver's `collect(live_layers)` (available here or not: a store may hold
    caches made elsewhere); returns the bytes freed."""
    return sum(cls(layers).collect(live_layers) for cls in drivers.values())


def driver_cache_bytes(layers: Layers, drivers: DriverTable = DRIVERS) -> int:
    """Bytes every driver's caches occupy."""
    return sum(cls(layers).cache_bytes() for cls in drivers.values())
