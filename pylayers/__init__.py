"""pylayers: a content-addressed snapshot store for container-style layers.

The public API: chunking (`cut_points`, `Chunker`), the chunk store (`Store`), layers
(`Layers`), and the error kinds.
"""

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

__all__ = [
    "AlreadyExists", "Chunker", "ChunkerParams", "CorruptData", "FailedPrecondition",
    "InvalidArgument", "Layers", "NotFound", "PylayersError", "Store", "StoreConfig",
    "StoreError", "UnsafePath", "UsageError", "cut_points",
]
