"""Tree fingerprints: has a directory changed at all since it was last snapshotted?

The C walk (csrc/walk.h) lstats every entry in canonical order; the fingerprint is the
BLAKE3 of those records. Any change to a file's content, metadata or xattrs moves its
ctime, and adding, removing or renaming entries changes the records, so an equal
fingerprint means an equal tree, as long as no ctime was within the racy window of the
walk (then the fingerprint is not recorded). This is git's index trick for a whole
tree: a no-change re-snapshot costs one walk and no Python object per file.

Recorded in the `statcache` table under key "tree:" + BLAKE3(real path); value:
fingerprint (32) + layer id (32) of the layer whose tree the directory held.
"""

from __future__ import annotations

import os

import blake3

from .._native import walk_records

DOMAIN = b"pylayers tree fingerprint v1\x00"
KEY_PREFIX = b"tree:"


def tree_fingerprint(root: str | os.PathLike) -> tuple[bytes, int]:
    """(fingerprint, newest ctime in ns) of the tree under `root`."""
    records, max_ctime = walk_records(os.fspath(root))
    return blake3.blake3(DOMAIN + records).digest(), max_ctime


def cache_key(root: str | os.PathLike) -> bytes:
    return KEY_PREFIX + blake3.blake3(os.fsencode(os.path.realpath(root))).digest()
