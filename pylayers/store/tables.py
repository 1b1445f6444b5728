"""The index's tables and their accessors (docs/format.md, "The index").

Each LMDB table has exactly one accessor class here, the only code that knows its key
layout. Accessors are bytes-level with typed keys: record *values* are encoded and
decoded by the module that owns the record kind (layer records in
`layers/records.py`, snapshot records in `mounts/`, build cache records in
`build/cachekeys.py`, walk caches in `layers/walkcache.py`). Nobody above
`store/` opens an LMDB transaction: `Store.read()` and `Store.write()` hand out a
`Tables`, one transaction shared by every accessor, so a check and the write it guards
are one transaction.
"""

from __future__ import annotations

from collections.abc import Iterator

import lmdb

from .packs import Location

TABLES = ("meta", "chunks", "layers", "tags", "walkcache", "fingerprints", "snapshots",
          "cachekeys", "refs", "image_configs", "layer_configs", "paths")
ID_LEN = 32  # chunk ids, layer ids, build cache keys: BLAKE3-256 digests


class _Table:
    __slots__ = ("_txn", "_db")

    def __init__(self, txn: lmdb.Transaction, db) -> None:
        self._txn = txn
        self._db = db

    def _get(self, key: bytes) -> bytes | None:
        try:
            return self._txn.get(key, db=self._db)
        except lmdb.BadValsizeError:
            return None  # empty, or longer than any key a table can hold

    def count(self) -> int:
        return self._txn.stat(self._db)["entries"]

    def _range(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) whose key starts with `prefix`, by a cursor range."""
        cur = self._txn.cursor(db=self._db)
        if not cur.set_range(prefix):
            return
        for k, v in cur.iternext():
            if not k.startswith(prefix):
                return
            yield k, v

    def _items(self) -> Iterator[tuple[bytes, bytes]]:
        yield from self._txn.cursor(db=self._db).iternext()


class MetaTable(_Table):
    """`meta`: the format version (and nothing else yet)."""

    def format_version(self) -> bytes | None:
        return self._get(b"format_version")

    def set_format_version(self, version: int) -> None:
        self._txn.put(b"format_version", str(version).encode(), db=self._db)


class ChunkTable(_Table):
    """`chunks`: chunk id -> its location in a pack."""

    def get(self, cid: bytes) -> Location | None:
        raw = self._get(cid)
        return Location.decode(raw) if raw is not None else None

    def has(self, cid: bytes) -> bool:
        return self._get(cid) is not None

    def encoded_many(self, cids: list[bytes]) -> list[bytes | None]:
        """The encoded locations (`Location.decode`) of `cids`, in order, None for an
        id not indexed: one call into LMDB for them all (a checkout's lookups)."""
        try:
            found = dict(self._txn.cursor(db=self._db).getmulti(cids))
        except lmdb.BadValsizeError:  # an id no table can hold: one at a time
            return [self._get(cid) for cid in cids]
        return [found.get(cid) for cid in cids]

    def add(self, cid: bytes, loc: Location) -> bool:
        """Index a new chunk; first writer wins (False: it was indexed already)."""
        return self._txn.put(cid, loc.encode(), db=self._db, overwrite=False)

    def move(self, cid: bytes, loc: Location) -> None:
        """Point an indexed chunk at a new copy of it (gc's repack)."""
        self._txn.put(cid, loc.encode(), db=self._db)

    def delete(self, cid: bytes) -> bool:
        return self._txn.delete(cid, db=self._db)

    def ids(self) -> Iterator[bytes]:
        yield from self._txn.cursor(db=self._db).iternext(values=False)

    def items(self) -> Iterator[tuple[bytes, Location]]:
        for cid, raw in self._items():
            yield cid, Location.decode(raw)


class LayerTable(_Table):
    """`layers`: layer id -> layer record (encoded by layers/records.py)."""

    def get(self, layer_id: bytes) -> bytes | None:
        return self._get(layer_id)

    def has(self, layer_id: bytes) -> bool:
        return self._get(layer_id) is not None

    def put(self, layer_id: bytes, record: bytes) -> None:
        self._txn.put(layer_id, record, db=self._db)

    def delete(self, layer_id: bytes) -> bool:
        return self._txn.delete(layer_id, db=self._db)

    def ids(self) -> Iterator[bytes]:
        yield from self._txn.cursor(db=self._db).iternext(values=False)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        return self._items()

    def with_hex_prefix(self, prefix: str, limit: int = 2) -> list[bytes]:
        """Up to `limit` layer ids whose hex form starts with `prefix` (lower-case hex
        digits), by a cursor range over the sorted keys: O(log n), not a scan."""
        n = len(prefix)
        if not 0 < n <= 2 * ID_LEN:
            return []
        low = bytes.fromhex(prefix + "0" * (2 * ID_LEN - n))
        high = bytes.fromhex(prefix + "f" * (2 * ID_LEN - n))
        out: list[bytes] = []
        cur = self._txn.cursor(db=self._db)
        if not cur.set_range(low):
            return out
        for k in cur.iternext(values=False):
            if k > high or len(out) == limit:
                break
            out.append(k)
        return out


class TagTable(_Table):
    """`tags`: tag name (UTF-8) -> layer id (32), then, when the tag names an image (a
    build's, import's or pull's `-t`), the sha256 (32) of that image's config in
    `image_configs`. Any other write of the tag (`tag`, `snapshot -t`) replaces the
    whole value, so a tag never keeps a config that is not its image's."""

    def get(self, name: str) -> bytes | None:
        v = self._get(name.encode(errors="surrogateescape"))
        return v[:ID_LEN] if v is not None else None

    def image(self, name: str) -> tuple[bytes, bytes | None] | None:
        """(layer id, config digest or None) the tag names, None without the tag."""
        v = self._get(name.encode(errors="surrogateescape"))
        if v is None:
            return None
        return v[:ID_LEN], (v[ID_LEN:2 * ID_LEN] if len(v) == 2 * ID_LEN else None)

    def put(self, name: str, layer_id: bytes, config_digest: bytes | None = None) -> None:
        value = layer_id + config_digest if config_digest is not None else layer_id
        self._txn.put(name.encode(errors="surrogateescape"), value, db=self._db)

    def delete(self, name: str) -> bool:
        return self._txn.delete(name.encode(errors="surrogateescape"), db=self._db)

    def items(self) -> Iterator[tuple[str, bytes]]:
        for k, v in self._items():
            yield k.decode(errors="surrogateescape"), v[:ID_LEN]

    def images(self) -> Iterator[tuple[str, bytes, bytes]]:
        """(tag, layer id, config digest) of every tag that names an image's config."""
        for k, v in self._items():
            if len(v) == 2 * ID_LEN:
                yield k.decode(errors="surrogateescape"), v[:ID_LEN], v[ID_LEN:]

    def naming(self, layer_id: bytes) -> list[str]:
        """The tags that name `layer_id`."""
        return [name for name, lid in self.items() if lid == layer_id]


class WalkCacheTable(_Table):
    """`walkcache`: BLAKE3 of a directory's real path -> its walk cache (layer id first,
    layers/walkcache.py)."""

    def get(self, path_key: bytes) -> bytes | None:
        return self._get(path_key)

    def put(self, path_key: bytes, value: bytes) -> None:
        self._txn.put(path_key, value, db=self._db)

    def delete(self, path_key: bytes) -> bool:
        return self._txn.delete(path_key, db=self._db)

    def layer_ids(self) -> Iterator[tuple[bytes, bytes]]:
        """(path key, layer id) of every entry (a value's first 32 bytes)."""
        for k, v in self._items():
            yield bytes(k), bytes(v[:ID_LEN])

    def of_layer(self, layer_id: bytes) -> bytes | None:
        """A walk cache of `layer_id`'s tree kept under any path, or None. Reads each
        value's first 32 bytes only in a transaction opened with `buffers`."""
        for _k, v in self._items():
            if v[:ID_LEN] == layer_id:
                return bytes(v)
        return None


class FingerprintTable(_Table):
    """`fingerprints`: BLAKE3 of a directory's real path -> (tree fingerprint, id of the
    layer whose tree it held)."""

    def get(self, path_key: bytes) -> tuple[bytes, bytes] | None:
        raw = self._get(path_key)
        if raw is None or len(raw) != 2 * ID_LEN:
            return None
        return raw[:ID_LEN], raw[ID_LEN:]

    def put(self, path_key: bytes, fingerprint: bytes, layer_id: bytes) -> None:
        self._txn.put(path_key, fingerprint + layer_id, db=self._db)

    def delete(self, path_key: bytes) -> bool:
        return self._txn.delete(path_key, db=self._db)

    def items(self) -> Iterator[tuple[bytes, bytes, bytes]]:
        """(path key, fingerprint, layer id) of every entry."""
        for k, v in self._items():
            yield k, v[:ID_LEN], v[ID_LEN:]


class SnapshotTable(_Table):
    """`snapshots`: snapshot key (UTF-8) -> snapshot record (encoded by mounts/)."""

    def get(self, key: str) -> bytes | None:
        return self._get(key.encode())

    def put(self, key: str, record: bytes) -> None:
        self._txn.put(key.encode(), record, db=self._db)

    def add(self, key: str, record: bytes) -> bool:
        """Claim a new key; False if it is taken."""
        return self._txn.put(key.encode(), record, db=self._db, overwrite=False)

    def delete(self, key: str) -> bool:
        return self._txn.delete(key.encode(), db=self._db)

    def items(self) -> Iterator[tuple[str, bytes]]:
        for k, v in self._items():
            yield k.decode(), v


class CacheKeyTable(_Table):
    """`cachekeys`: build cache key (32) -> its value (encoded by build/cachekeys.py);
    and an index of the keys recorded on each parent: `b"by-parent:"` + parent ref
    (33) + key (32) -> empty."""

    BY_PARENT = b"by-parent:"
    _INDEX_LEN = len(BY_PARENT) + 1 + ID_LEN + ID_LEN

    def get(self, key: bytes) -> bytes | None:
        return self._get(key)

    def put(self, key: bytes, parent_ref: bytes, value: bytes) -> None:
        self._txn.put(key, value, db=self._db)
        self._txn.put(self.BY_PARENT + parent_ref + key, b"", db=self._db)

    def children(self, parent_prefix: bytes) -> Iterator[bytes]:
        """The keys recorded on parent refs starting with `parent_prefix` (a kind
        byte, optionally followed by the parent's 32 bytes)."""
        for k, _v in self._range(self.BY_PARENT + parent_prefix):
            if len(k) == self._INDEX_LEN:
                yield k[-ID_LEN:]

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) of every key (not the index)."""
        for k, v in self._items():
            if len(k) == ID_LEN:
                yield k, v

    def delete(self, keys: set[bytes]) -> None:
        """Delete `keys` and every index entry of a key that is gone."""
        for k in keys:
            self._txn.delete(k, db=self._db)
        dead = [k for k, _v in self._range(self.BY_PARENT)
                if len(k) != self._INDEX_LEN or k[-ID_LEN:] in keys
                or self._get(k[-ID_LEN:]) is None]
        for k in dead:
            self._txn.delete(k, db=self._db)


class RefTable(_Table):
    """`refs`: which records reference a layer, so that removing the layer can be
    refused without reading anybody else's records. Key: layer id (32) + owner (ASCII
    name of the referring record's kind, e.g. `layer` for a child layer, `snapshot`)
    + NUL + the referring record's key; value empty. Each owner writes its references
    in the transaction that writes its record, and deletes them with it."""

    def add(self, layer_id: bytes, owner: str, key: bytes) -> None:
        self._txn.put(layer_id + owner.encode() + b"\0" + key, b"", db=self._db)

    def remove(self, layer_id: bytes, owner: str, key: bytes) -> None:
        self._txn.delete(layer_id + owner.encode() + b"\0" + key, db=self._db)

    def referrers(self, layer_id: bytes, limit: int | None = None) -> list[tuple[str, bytes]]:
        """(owner, key) of the records that reference `layer_id`, up to `limit`."""
        out = []
        for k, _v in self._range(layer_id):
            owner, _, key = k[ID_LEN:].partition(b"\0")
            out.append((owner.decode(errors="replace"), key))
            if limit is not None and len(out) >= limit:
                break
        return out

    def items(self) -> Iterator[tuple[bytes, str, bytes]]:
        """(layer id, owner, key) of every reference."""
        for k, _v in self._items():
            owner, _, key = k[ID_LEN:].partition(b"\0")
            yield k[:ID_LEN], owner.decode(errors="replace"), key


class ImageConfigTable(_Table):
    """`image_configs`: sha256 of an image config (32) -> the config, its exact bytes
    (encoded and read by oci/config.py)."""

    def get(self, digest: bytes) -> bytes | None:
        return self._get(digest)

    def put(self, digest: bytes, config: bytes) -> None:
        self._txn.put(digest, config, db=self._db)

    def delete(self, digest: bytes) -> bool:
        return self._txn.delete(digest, db=self._db)

    def digests(self) -> Iterator[bytes]:
        for k, _v in self._items():
            yield k


class LayerConfigTable(_Table):
    """`layer_configs`: top layer id (32) -> the sha256 (32) of the config of the image
    last stored with that top layer: what a REF naming the layer (not a tag) gets."""

    def get(self, layer_id: bytes) -> bytes | None:
        return self._get(layer_id)

    def put(self, layer_id: bytes, digest: bytes) -> None:
        self._txn.put(layer_id, digest, db=self._db)

    def delete(self, layer_id: bytes) -> bool:
        return self._txn.delete(layer_id, db=self._db)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        return self._items()


class PathTable(_Table):
    """`paths`: a file's path key (`store/ingest.path_key`: its normalised name, its
    normalised directory, its name, its path) -> the chunk ids of the last version of a file at
    that path stored without deltas: the base a new version's delta is tried against
    (store/ingest.py; docs/format.md, "Delta frames")."""

    KEY_LEN = 16
    # key prefixes (store/ingest.path_key), nearest first: the same name in the same
    # normalised directory; the same normalised name there. (Looking for the name in any
    # directory, prefix 6, cost a first snapshot 15-30% more CPU, in trials against
    # other packages' __init__.py and LICENSE, for 0.3% of its size: not taken.)
    NEAR = (13, 10)

    def get(self, key: bytes) -> list[bytes] | None:
        return _ids(self._get(key))

    def near(self, key: bytes) -> Iterator[tuple[list[bytes], bool]]:
        """(chunk ids, whether they are the path's own) of the entries nearest `key`, the
        closest first: the path's own; files of the same name in the same normalised
        directory (`pkg-1.2.dist-info/RECORD` for `pkg-1.3.dist-info/RECORD`); then of
        the same normalised name there (`libz-<hash>.so.1.2` for `libz-<hash>.so.1.3`).
        Each group in key order."""
        ids = self.get(key)
        if ids is not None:
            yield ids, True
        seen = {key}
        for n in self.NEAR:
            for k, raw in self._range(key[:n]):
                if k not in seen and (ids := _ids(raw)) is not None:
                    seen.add(k)
                    yield ids, False

    def put(self, key: bytes, ids: list[bytes]) -> None:
        self._txn.put(key, b"".join(ids), db=self._db)

    def delete(self, key: bytes) -> bool:
        return self._txn.delete(key, db=self._db)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        return self._items()


def _ids(raw: bytes | None) -> list[bytes] | None:
    if raw is None or not raw or len(raw) % ID_LEN:
        return None  # not an entry: the next version of the file replaces it
    return [raw[i : i + ID_LEN] for i in range(0, len(raw), ID_LEN)]


class Tables:
    """One LMDB transaction, and an accessor per table on it. Obtained only from
    `Store.read()` / `Store.write()`; valid inside that `with` block."""

    __slots__ = ("writable", "meta", "chunks", "layers", "tags", "walkcache",
                 "fingerprints", "snapshots", "cachekeys", "refs", "image_configs",
                 "layer_configs", "paths")

    def __init__(self, txn: lmdb.Transaction, dbs: dict, writable: bool) -> None:
        self.writable = writable
        self.meta = MetaTable(txn, dbs["meta"])
        self.chunks = ChunkTable(txn, dbs["chunks"])
        self.layers = LayerTable(txn, dbs["layers"])
        self.tags = TagTable(txn, dbs["tags"])
        self.walkcache = WalkCacheTable(txn, dbs["walkcache"])
        self.fingerprints = FingerprintTable(txn, dbs["fingerprints"])
        self.snapshots = SnapshotTable(txn, dbs["snapshots"])
        self.cachekeys = CacheKeyTable(txn, dbs["cachekeys"])
        self.refs = RefTable(txn, dbs["refs"])
        self.image_configs = ImageConfigTable(txn, dbs["image_configs"])
        self.layer_configs = LayerConfigTable(txn, dbs["layer_configs"])
        self.paths = PathTable(txn, dbs["paths"])
