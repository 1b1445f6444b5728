"""Hostile manifests for tests: the bytes of docs/format.md's "Manifest" written by
hand, without the checks `encode_manifest` makes (it refuses to write them), and
stored as a layer the way `Layers._commit` stores one: the manifest's bytes as chunks
through the store's chunk writer, then a layer record in the same commit.

This encoder is deliberately independent of pylayers.layers.manifest: a test that a
decoder refuses bytes must not build the bytes with the code under test.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable

import blake3

from pylayers.layers.manifest import BLK, CHR, HARDLINK, REG, SYMLINK, Entry
from pylayers.layers.repo import LayerRecord
from pylayers.store.repository import Store

MAGIC = b"PLYRMAN2"
INLINE_MAX = 1024  # docs/format.md: a file of at most this many bytes is held inline


def raw_entry(e: Entry) -> bytes:
    """One entry's bytes, whatever its fields hold (a file's content id is written as
    given, even if it is not 32 bytes; a small file's data as given, whatever its
    size says)."""
    out = [struct.pack("<HBBIIIqQ", len(e.path), e.kind, e.flags, e.mode, e.uid, e.gid,
                       e.mtime_ns, e.size), e.path]
    if e.kind == REG and e.size <= INLINE_MAX:
        out.append(e.data)
    elif e.kind == REG:
        out += [e.content, struct.pack("<I", len(e.chunks) // 36), e.chunks]
    elif e.kind in (SYMLINK, HARDLINK):
        out += [struct.pack("<H", len(e.target)), e.target]
    elif e.kind in (CHR, BLK):
        out.append(struct.pack("<II", *e.rdev))
    out.append(struct.pack("<H", len(e.xattrs)))
    for name, value in e.xattrs:
        out += [struct.pack("<HI", len(name), len(value)), name, value]
    return b"".join(out)


def raw_manifest(parent: bytes | None, entries: Iterable[Entry | bytes]) -> bytes:
    """A manifest of these entries (an Entry, or an entry's bytes as they are), in the
    order given."""
    body = [e if isinstance(e, bytes) else raw_entry(e) for e in entries]
    return b"".join([MAGIC, parent or bytes(32), struct.pack("<I", len(body)), *body])


def store_manifest(store: Store, data: bytes, parent: bytes | None = None,
                   entries: int = 0, file_bytes: int = 0) -> bytes:
    """Store `data` as the manifest of a layer on `parent` and record the layer, as
    `Layers._commit` does (the manifest as one chunk). Returns the layer id."""
    layer_id = blake3.blake3(data).digest()
    cid = blake3.blake3(data).digest()
    with store.writer() as writer:
        writer.put(cid, data)
        rec = LayerRecord(parent, [(cid, len(data))], time.time(), "hostile", entries,
                          file_bytes, writer.new_bytes)

        def extra(t) -> None:
            t.layers.put(layer_id, rec.encode())
            if parent is not None:
                t.refs.add(parent, "layer", layer_id)

        writer.commit(extra)
    return layer_id


def fill_file(store: Store, e: Entry, data: bytes) -> Entry:
    """Give the file entry `e` the content `data`: in the entry if it is at most
    INLINE_MAX bytes, else as one chunk put into the store."""
    e.size, e.content = len(data), blake3.blake3(data).digest()
    if len(data) <= INLINE_MAX:
        e.data, e.chunks = data, b""
    else:
        e.data = b""
        e.content, e.chunks = store_file(store, data)
    return e


def store_file(store: Store, data: bytes) -> tuple[bytes, bytes]:
    """Put `data` into the store as one chunk: (content id, packed chunk list)."""
    cid = blake3.blake3(data).digest()
    with store.writer() as writer:
        writer.put(cid, data)
        writer.commit()
    return cid, struct.pack("<32sI", cid, len(data)) if data else b""
