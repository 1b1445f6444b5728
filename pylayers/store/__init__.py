"""The chunk store.

Terms: a *chunk* is a run of bytes named by its BLAKE3-256 digest (its *id*). Chunks
are appended to *pack* files in *frames*: a frame holds one or more chunks, compressed
together with zstd (or kept raw when they do not compress). LMDB maps each chunk id to
its frame. See docs/format.md for every byte.
"""

from .config import FORMAT_VERSION, StoreConfig
from .repository import Store, default_store_path

__all__ = ["FORMAT_VERSION", "Store", "StoreConfig", "default_store_path"]
