"""pylayers: a content-addressed snapshot store for container-style layers.

The public API: chunking (`cut_points`, `Chunker`), the chunk store (`Store`), layers
(`Layers`), store maintenance (`gc`, `fsck`, `du`: what `pylayers gc`, `fsck` and `du`
run), and the error kinds.
"""

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from .chunking import Chunker, ChunkerParams, cut_points
    from .layers.repo import Layers
    from .maintenance import du, fsck, gc
    from .store import Store, StoreConfig

# Imported on first use, so that `import pylayers` (and every CLI command, which
# imports the package first) pays only for what it uses: `pylayers --version` needs
# none of these; gc, fsck and du load the snapshotter and the build cache.
_LAZY = {"gc": "maintenance", "fsck": "maintenance", "du": "maintenance",
         "Chunker": "chunking", "ChunkerParams": "chunking", "cut_points": "chunking",
         "Layers": "layers.repo", "Store": "store", "StoreConfig": "store"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        import importlib
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pylayers' has no attribute {name!r}")


__all__ = [
    "AlreadyExists", "Chunker", "ChunkerParams", "CorruptData", "FailedPrecondition",
    "InvalidArgument", "Layers", "NotFound", "PylayersError", "Store", "StoreConfig",
    "StoreError", "UnsafePath", "UsageError", "cut_points", "du", "fsck", "gc",
]
