"""The `overlay` driver (kernel overlayfs), split by job: `mode` (root or userxattr,
and which one a snapshot was made in), `cache` (the cache layout under STORE/cache and
its collection), `lower` (lower directories and the file cache), `upper` (reading an
upper directory back as a layer), `driver` (the Driver itself)."""

from .cache import cache_bytes, cache_root, cache_sets, collect_caches, drop_caches
from .driver import OverlayDriver
from .mode import ROOT, USERXATTR, Flavour, current_flavour, overlay_mode

__all__ = ["ROOT", "USERXATTR", "Flavour", "OverlayDriver", "cache_bytes", "cache_root",
           "cache_sets", "collect_caches", "current_flavour", "drop_caches", "overlay_mode"]
