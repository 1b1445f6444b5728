"""Build-cache support for image builders: per-instruction cache keys (BuildKit's
rules) and a cache of key -> layer kept in the store (docs/format.md, "Build cache
keys")."""

from .cachekeys import BuildCache, CacheKey, cache_key, checksum_inputs

__all__ = ["BuildCache", "CacheKey", "cache_key", "checksum_inputs"]
