"""Tree fingerprints: has a directory changed at all since it was last snapshotted?

The C walk (csrc/walk.h) lstats every entry in canonical order; the fingerprint is the
BLAKE3 of those records. Any change to a file's content, metadata or xattrs moves its
ctime, and adding, removing or renaming entries changes the records, so an equal
fingerprint means an equal tree, as long as no ctime was within the racy window of the
walk (then the fingerprint is not recorded). This is git's index trick for a whole
tree: a no-change re-snapshot costs one walk and no Python object per file.

Recorded in the `fingerprints` table under `path_key(directory)`: the fingerprint and
the id of the layer whose tree the directory held (docs/format.md, "The index").
"""

from __future__ import annotations

import os

import blake3

from .._native import walk
from ..store.tables import Tables

DOMAIN = b"pylayers tree fingerprint v1\x00"


def tree_fingerprint(root: str | os.PathLike) -> tuple[bytes, int]:
    """(fingerprint, newest ctime in ns) of the tree under `root`."""
    with walk(os.fspath(root)) as (records, max_ctime):
        return of_records(records), max_ctime


def of_records(records: memoryview | bytes) -> bytes:
    """The fingerprint of a native walk's records (`_native.walk`)."""
    h = blake3.blake3(DOMAIN)
    h.update(records)
    return h.digest()


def path_key(root: str | os.PathLike) -> bytes:
    """The `fingerprints` table's key for the directory `root`: BLAKE3 of its real path."""
    return blake3.blake3(os.fsencode(os.path.realpath(root))).digest()


def prune(t: Tables) -> int:
    """Delete the fingerprints and walk caches whose layer is gone (in gc's
    transaction); how many."""
    dead = [k for k, _fp, lid in t.fingerprints.items() if not t.layers.has(lid)]
    for k in dead:
        t.fingerprints.delete(k)
    stale = [k for k, lid in t.walkcache.layer_ids() if not t.layers.has(lid)]
    for k in stale:
        t.walkcache.delete(k)
    return len(dead) + len(stale)
