"""pylayers: a content-addressed snapshot store for container-style layers.

The public API: chunking (`cut_points`, `Chunker`), the chunk store (`Store`), layers
(`Layers`), store maintenance (`gc`, `fsck`, `du`: what `pylayers gc`, `fsck` and `du`
run), and the error kinds.
"""

from typing import TYPE_CHECKING, Any

from .chunking import Chunker, ChunkerParams, cut_points
from .errors import (
                     AlreadyExists,
                     CorruptData,
                     FailedPrecondition,
                     InvalidArgument,
                     NotFound,
                     PylayersError,
                     StoreError,
                     UnsafePath,
                     UsageError,
)
from .layers.repo import Layers
from .store import Store, StoreConfig

if TYPE_CHECKING:
    from .maintenance import du, fsck, gc

# gc, fsck and du load the snapshotter and the build cache: imported on first use, so
# that `import pylayers` (and every CLI command) does not pay for them.
_LAZY = {"gc", "fsck", "du"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import maintenance
        return getattr(maintenance, name)
    raise AttributeError(f"module 'pylayers' has no attribute {name!r}")


__all__ = [
    "AlreadyExists", "Chunker", "ChunkerParams", "CorruptData", "FailedPrecondition",
    "InvalidArgument", "Layers", "NotFound", "PylayersError", "Store", "StoreConfig",
    "StoreError", "UnsafePath", "UsageError", "cut_points", "du", "fsck", "gc",
]
