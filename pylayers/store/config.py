"""The store's config file (docs/format.md, "config.json"): format name and version,
chunker sizes and compression. Written once at init; the chunker sizes never change."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..chunking import ChunkerParams
from ..errors import StoreError

FORMAT_NAME = "pylayers-store"
FORMAT_VERSION = 8  # docs/format.md, "Versions"
# The earliest version this pylayers still reads and writes: 7 only added patch frames
# and 8 x86 frames, which a store of an earlier version is written without (so the
# pylayers that made it can still read it). New stores are made at FORMAT_VERSION.
OLDEST_VERSION = 6
CHUNKER_ALGORITHM = "fastcdc-gear64-v1"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class StoreConfig:
    chunker: ChunkerParams = field(default_factory=ChunkerParams)
    # zstd level 3 (with 4 MiB frames, store/packs.py): within 0.3% of `tar | zstd -3`
    # on a pip-built env; level 2 was 9% larger (bench/bench_compression.py)
    compression_level: int = 3
    store_id: str = field(default_factory=lambda: os.urandom(16).hex())
    version: int = FORMAT_VERSION  # the store's format version (OLDEST_VERSION or later)

    def encode(self) -> bytes:
        doc = {
            "format": FORMAT_NAME,
            "version": self.version,
            "store_id": self.store_id,
            "chunker": {
                "algorithm": CHUNKER_ALGORITHM,
                "min_size": self.chunker.min_size,
                "avg_size": self.chunker.avg_size,
                "max_size": self.chunker.max_size,
            },
            "compression": {"codec": "zstd", "level": self.compression_level},
        }
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes, where: Path) -> StoreConfig:
        try:
            doc = json.loads(data)
            fmt, version = doc.get("format"), doc.get("version")
        except (ValueError, AttributeError) as e:
            raise StoreError(f"{where}: config.json is not valid JSON: {e}") from None
        if fmt != FORMAT_NAME:
            raise StoreError(f"{where} is not a pylayers store (format {fmt!r})")
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise StoreError(
                f"{where} has store format version {version}; this pylayers reads "
                f"version {FORMAT_VERSION} (upgrade pylayers)"
            )
        if version < OLDEST_VERSION:
            raise StoreError(
                f"{where} has store format version {version}; this pylayers reads "
                f"version {FORMAT_VERSION} (an earlier pylayers made it: make a new store "
                "and snapshot again)"
            )
        try:
            ch = doc["chunker"]
            if ch["algorithm"] != CHUNKER_ALGORITHM:
                raise StoreError(f"{where}: unknown chunker {ch['algorithm']!r}")
            params = ChunkerParams(ch["min_size"], ch["avg_size"], ch["max_size"]).validate()
            level = int(doc["compression"]["level"])
            return cls(chunker=params, compression_level=level, store_id=doc["store_id"],
                       version=version)
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{where}: config.json is malformed ({e})") from None

