"""Layers: snapshot a directory into a layer, resolve references, read trees back.

A layer is a manifest (its own entries: what differs from its parent, with whiteouts)
stored as chunks in the chunk store, plus a record in the `layers` table. Its id is
the BLAKE3 of the canonical manifest, which includes the parent id, so the same tree
snapshotted twice onto the same parent gets the same id.

This module owns the `layers` and `tags` tables' records (and writes the walk caches'
and fingerprints' entries with the layer that needs them). A layer's child layers
reference it in the store's `refs` table (owner `layer`), written with the child's
record; other owners (snapshots) add their own references, so `remove` refuses a layer
something still uses without reading anybody else's records, in one transaction.
"""

from __future__ import annotations

import bisect
import json
import os
import stat
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3

from .._native import walk
from ..chunking import cut_points
from ..errors import CorruptData, FailedPrecondition, NotFound
from ..store.ingest import CHUNK_REF, ChunkWriter
from ..store.repository import Store
from ..store.tables import Tables
from . import fingerprint, refs, walkcache
from .ignore import Exclusions
from .manifest import (
    DIR,
    HARDLINK,
    REG,
    WHITEOUT,
    Entry,
    ManifestEncoder,
    decode_manifest,
    manifest_parent,
)
from .refs import check_tag
from .scan import RACY_NS, Scanner, ScanStats, XattrProbe
from .tree import chain_tree, diff_layer, validate_tree

if TYPE_CHECKING:
    from .walkahead import WalkAhead

LAYER_REF = "layer"  # the `refs` owner name of a child layer referencing its parent
_OLD = struct.Struct("<IIIIQQq")  # a walk record's mode, uid, gid, reserved, nlink, size, mtime
_U16 = struct.Struct("<H")


class _Fallback(Exception):
    """The walk cache's fast path met what only a whole-tree scan handles."""


def _old_path(old: bytes, off: int) -> bytes:
    (plen,) = _U16.unpack_from(old, off)
    return old[off + 2 : off + 2 + plen]


def _differs(e: Entry, old: bytes, off: int) -> bool:
    """Whether `e` surely differs from the parent's entry at its path, known from the
    walk cache's record of that entry (at `off` of `old`): a trusted record's mode,
    owner, mtime and (one link) size are the entry's. False: not known."""
    (plen,) = _U16.unpack_from(old, off)
    mode, uid, gid, untrusted, nlink, size, mtime = _OLD.unpack_from(old, off + 2 + plen)
    if untrusted:
        return False
    if (stat.S_IMODE(mode), uid, gid, mtime) != (e.mode, e.uid, e.gid, e.mtime_ns):
        return True
    if stat.S_ISDIR(mode) != (e.kind == DIR):
        return True
    return e.kind == REG and stat.S_ISREG(mode) and nlink == 1 and size != e.size


@dataclass
class LayerRecord:
    """The `layers` table's value (docs/format.md, "Layer records")."""

    parent: bytes | None
    manifest: list[tuple[bytes, int]]
    created: float
    message: str
    entries: int
    file_bytes: int  # bytes of regular-file content in this layer's own entries
    new_bytes: int  # chunk bytes this layer added to the store
    kept: bool = False  # made (or made again) by `snapshot`: the snapshotter never collects it
    inline_bytes: int = 0  # of file_bytes, those of small files held in the manifest

    def encode(self) -> bytes:
        d = {
            "parent": self.parent.hex() if self.parent else None,
            "manifest": [[cid.hex(), n] for cid, n in self.manifest],
            "created": self.created, "message": self.message, "entries": self.entries,
            "file_bytes": self.file_bytes, "new_bytes": self.new_bytes,
        }
        if self.kept:
            d["kept"] = True
        if self.inline_bytes:
            d["inline_bytes"] = self.inline_bytes
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> LayerRecord:
        try:
            d = json.loads(data)
            return cls(bytes.fromhex(d["parent"]) if d["parent"] else None,
                       [(bytes.fromhex(c), n) for c, n in d["manifest"]], d["created"],
                       d["message"], d["entries"], d["file_bytes"], d["new_bytes"],
                       d.get("kept") is True, int(d.get("inline_bytes", 0)))
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptData(f"layer record is malformed: {e}") from None


def read_manifest(store: Store, layer_id: bytes, manifest: list[tuple[bytes, int]]
                  ) -> bytearray:
    """A layer's manifest bytes, its chunks (`LayerRecord.manifest`) read into one
    buffer: a join would hold the list of chunks and their concatenation at once
    (twice a 1M-entry manifest's 200 MB)."""
    data = bytearray(sum(n for _, n in manifest))
    at = 0
    for cid, n in manifest:
        chunk = store.read_chunk(cid)
        if len(chunk) != n:
            raise CorruptData(f"manifest of layer {layer_id.hex()}: chunk {cid.hex()} is "
                              f"{len(chunk)} bytes, its record says {n}")
        data[at : at + n] = chunk
        at += n
    return data


@dataclass
class SnapshotResult:
    layer_id: bytes
    stats: ScanStats
    entries: int
    existed: bool


def _mark_kept(t: Tables, layer_id: bytes, raw: bytes) -> None:
    """Set `kept` in the layer record `raw` of `layer_id`, if it is not set yet."""
    rec = LayerRecord.decode(raw)
    if not rec.kept:
        rec.kept = True
        t.layers.put(layer_id, rec.encode())


def _first_unindexed(t: Tables, enc: ManifestEncoder) -> tuple[bytes, bytes] | None:
    """The path of the first file `enc` encoded that names a chunk the index lacks,
    and that chunk."""
    has, c = t.chunks.has, enc.file_chunks
    for i in range(0, len(c), CHUNK_REF.size):
        if not has(bytes(c[i : i + 32])):
            n = bisect.bisect_right(enc.file_ends, i)
            return enc.file_path(n), bytes(c[i : i + 32])
    return None


def _holds(directory: str | Path, inner: Path) -> bool:
    """Whether `inner` lies inside (or is) `directory`."""
    outer = os.path.realpath(directory)
    return os.path.commonpath([outer, os.path.realpath(inner)]) == outer


# A checkout of this much file data or more may read it in a child process (a fork and
# a store opening: a few milliseconds)
READ_PROCESS_MIN = 16 << 20


class Layers:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._trees: dict[bytes, list[Entry]] = {}

    # -- records and references --------------------------------------------------
    def record(self, layer_id: bytes) -> LayerRecord:
        with self.store.read() as t:
            return self.record_in(t, layer_id)

    @staticmethod
    def record_in(t: Tables, layer_id: bytes) -> LayerRecord:
        """The layer's record, read in the transaction `t`."""
        raw = t.layers.get(layer_id)
        if raw is None:
            raise NotFound(f"layer {layer_id.hex()} not found")
        return LayerRecord.decode(raw)

    def exists(self, layer_id: bytes) -> bool:
        with self.store.read() as t:
            return t.layers.has(layer_id)

    def all_ids(self) -> list[bytes]:
        with self.store.read() as t:
            return list(t.layers.ids())

    def records(self) -> list[tuple[bytes, LayerRecord]]:
        """Every layer's id and record, in id order."""
        with self.store.read() as t:
            return [(lid, LayerRecord.decode(raw)) for lid, raw in t.layers.items()]

    def tags(self) -> dict[str, bytes]:
        with self.store.read() as t:
            return dict(t.tags.items())

    def resolve(self, ref: str) -> bytes:
        """The layer a REF names (layers/refs.py: the forms and their order)."""
        with self.store.read() as t:
            return self.resolve_in(t, ref)

    def resolve_in(self, t: Tables, ref: str) -> bytes:
        """`resolve`, in the transaction `t`."""
        return refs.resolve_in(t, ref, lambda lid: self.record_in(t, lid).parent)

    # -- reading -------------------------------------------------------------------
    def entries(self, layer_id: bytes) -> list[Entry]:
        """The layer's own entries (a diff against its parent)."""
        return decode_manifest(self._manifest(layer_id))[1]

    def _manifest(self, layer_id: bytes) -> bytearray:
        """The layer's manifest bytes, checked against its id, naming its record's
        parent."""
        rec = self.record(layer_id)
        data = read_manifest(self.store, layer_id, rec.manifest)
        if blake3.blake3(data).digest() != layer_id:
            raise CorruptData(f"manifest of layer {layer_id.hex()} does not match its id")
        if manifest_parent(data) != rec.parent:  # the record is covered by no id
            raise CorruptData(f"layer {layer_id.hex()[:12]}: its record and its manifest "
                              "name different parents")
        return data

    def chain(self, layer_id: bytes) -> list[bytes]:
        """The layer and its ancestors, newest first."""
        out = [layer_id]
        with self.store.read() as t:
            while (parent := self.record_in(t, out[-1]).parent) is not None:
                if parent in out:
                    raise CorruptData(f"layer {layer_id.hex()} has a cycle in its parents")
                out.append(parent)
        return out

    def tree(self, layer_id: bytes) -> list[Entry]:
        """The full tree of a layer: its chain of diffs applied, oldest first."""
        cached = self._trees.get(layer_id)
        if cached is not None:
            return cached
        chain = self.chain(layer_id)
        tree: list[Entry] = []
        start = len(chain)
        for i, lid in enumerate(chain):
            if lid in self._trees:
                tree, start = self._trees[lid], i
                break
        tree, own = chain_tree(tree, [self._manifest(lid) for lid in reversed(chain[:start])])
        validate_tree(tree, own, f"layer {layer_id.hex()[:12]}")  # what every reader relies on
        self._trees = {layer_id: tree}
        return tree

    def read_file(self, e: Entry) -> bytes:
        if e.inline:
            return e.data
        return b"".join(self.store.read_chunk(cid) for cid, _ in e.chunk_list())

    def checkout(self, layer_id: bytes, dest: Path, progress=None, link: bool = False,
                 reader_process: bool = False) -> None:
        """Write the layer's tree into `dest` (empty or absent). `link`: regular files
        as hardlinks into the store's checkout cache (checkout.py, LinkCache), for
        read-only use; DEST on the store's file system. `reader_process`: read the
        chunks in a forked child process (store/readproc.py) when there are at least
        READ_PROCESS_MIN bytes of them, as the CLI does; a process with threads of its
        own (the containerd service) reads on a thread."""
        # imported here: a snapshot (above all an unchanged one) never writes files
        from .checkout import LinkCache, checkout_tree, link_cache_root
        cache = LinkCache(link_cache_root(self.store.path.absolute())) if link else None
        tree = self.tree(layer_id)
        if reader_process and sum(e.size for e in tree if e.kind == REG) >= READ_PROCESS_MIN:
            from ..store.readproc import read_in_process

            def read(chunks):
                return read_in_process(self.store, chunks)
        else:
            from ..store.readahead import read_ahead

            def read(chunks):
                return read_ahead(self.store, (cid for cid, _n in chunks))
        checkout_tree(tree, dest, read, progress, cache)

    # -- writing -------------------------------------------------------------------
    def snapshot(self, directory: str | Path, parent: bytes | None = None,
                 tag: str | None = None, message: str = "",
                 progress: Callable[[int], None] | None = None,
                 kept: bool = True, allow_changing: bool = False,
                 ephemeral: bool = False,
                 exclude: Exclusions | None = None,
                 ahead: WalkAhead | None = None) -> SnapshotResult:
        """Store `directory` as a layer on `parent`. `kept`: a layer the user asked for
        (False for a snapshotter's commit, which its collection may remove). A file that
        keeps changing while read fails the snapshot with SourceChanged, unless
        `allow_changing`: then its last read is stored and listed in `stats.changed`.
        `ephemeral`: the directory is deleted right after (the copy driver's snapshot
        directories), so record no walk cache and no tree fingerprint for it.
        `exclude`: paths to leave out (ignore.py); the store's own directory is left out
        too. A tree with paths left out takes no fingerprint fast path: the fingerprint
        covers every path, and the same tree with other patterns is another layer.
        `ahead`: the walk of `directory` already started (walkahead.py)."""
        if tag is not None:
            check_tag(tag)
        if ahead is not None and (not ahead.of(directory)
                                  or _holds(directory, self.store.path)):
            # another directory's; or the store is inside the tree and may have
            # been made or grown since the walk: walk again, after it
            if ahead.of(directory):
                ahead.discard()
            ahead = None
        start_ns = ahead.start_ns if ahead is not None else time.time_ns()
        with ExitStack() as stack:
            # One native walk (lstat records, no Python object per file) serves the
            # fingerprint and, when that shows a change, the scan. None if the walk
            # failed: the scan's own walk then reports the problem properly.
            records: memoryview | None = None
            max_ctime = 0
            if os.path.isdir(directory):
                got = stack.enter_context(ahead.records()) if ahead is not None else None
                if got is not None:
                    records, max_ctime = got
                else:
                    try:
                        records, max_ctime = stack.enter_context(walk(os.fspath(directory)))
                    except OSError:
                        records = None
            fp = fp_key = None
            if records is not None and not ephemeral and not exclude \
                    and not _holds(directory, self.store.path):
                fp_key = fingerprint.path_key(directory)
                fp = fingerprint.of_records(records)
            wc_key = None
            if records is not None and not ephemeral:
                wc_key = fp_key or fingerprint.path_key(directory)
            return self._snapshot(directory, parent, tag, message, progress, kept,
                                  allow_changing, ephemeral, exclude, records,
                                  fp, fp_key, fp is not None and max_ctime < start_ns - RACY_NS,
                                  wc_key, start_ns - RACY_NS)

    def _snapshot(self, directory: str | Path, parent: bytes | None, tag: str | None,
                  message: str, progress: Callable[[int], None] | None, kept: bool,
                  allow_changing: bool, ephemeral: bool, exclude: Exclusions | None,
                  records: memoryview | None, fp: bytes | None, fp_key: bytes | None,
                  fp_settled: bool, wc_key: bytes | None = None,
                  settled_before: int = 0) -> SnapshotResult:
        with self.store.writer() as writer:
            res = self._snapshot_into(writer, directory, parent, tag, message, progress, kept,
                                      allow_changing, ephemeral, exclude, records, fp,
                                      fp_key, fp_settled, wc_key, settled_before)
            # what the layer added to the store: file chunks, and the manifest, which
            # holds small files' bytes
            res.stats.new_bytes = writer.new_bytes
            return res

    def _snapshot_into(self, writer: ChunkWriter, directory: str | Path,
                       parent: bytes | None, tag: str | None, message: str,
                       progress: Callable[[int], None] | None, kept: bool,
                       allow_changing: bool, ephemeral: bool, exclude: Exclusions | None,
                       records: memoryview | None, fp: bytes | None, fp_key: bytes | None,
                       fp_settled: bool, wc_key: bytes | None,
                       settled_before: int) -> SnapshotResult:
        same_as = self._unchanged_since(fp, fp_key)
        if same_as is not None:
            # The directory holds exactly the tree of layer `same_as`.
            stats = ScanStats(unchanged_since=same_as)
            rec = self.record(same_as)
            if rec.parent == parent and self._recommit(writer, same_as, tag, kept):
                # That very layer again (layer ids are of the manifest, which a
                # snapshot derives from the tree and the parent alone): nothing to
                # decode, diff or store.
                return SnapshotResult(same_as, stats, rec.entries, True)
            if parent is not None and self._same_tree(parent, same_as):
                own: list[Entry] = []
            else:
                tree = self.tree(same_as)
                own = diff_layer(self.tree(parent), tree) if parent is not None else tree
            # the fingerprint now names the new layer (the same tree): the next
            # snapshot onto it finds it, and takes the `_recommit` path above
            assert fp is not None and fp_key is not None
            rekeyed = self._rekeyed(wc_key, same_as)
            layer_id, count, existed = self._commit(
                writer, parent, own, tag, message, (fp_key, fp), kept=kept,
                walk_cache=(rekeyed[0], lambda: rekeyed[1]) if rekeyed else None)
            return SnapshotResult(layer_id, stats, count, existed)
        cmp = self._walk_comparison(wc_key, records, parent)
        record_fp = fp is not None and fp_key is not None and fp_settled
        tree_fp = (fp_key, fp) if record_fp else None
        root = os.path.realpath(os.fsencode(os.path.abspath(directory)))
        if cmp is not None and records is not None and cmp.layer_id == parent \
                and not exclude and not _holds(directory, self.store.path):
            scanner = self._scanner(writer, progress, allow_changing, exclude,
                                    None, settled_before)
            try:
                own = self._changes(scanner, parent, root, records, cmp)
            except _Fallback:
                pass  # a changed path left out: the whole scan below decides
            else:
                layer_id, count, existed = self._commit(
                    writer, parent, own, tag, message, tree_fp, kept=kept,
                    walk_cache=(wc_key, lambda: scanner.keep_records(records)))  # type: ignore[arg-type]
                return SnapshotResult(layer_id, scanner.stats, count, existed)
        # which entries have xattrs: found in C on another core while the parent's
        # tree is decoded here
        probe = XattrProbe(directory, records) if records is not None else None
        try:
            base = self.tree(parent) if parent is not None else []
        finally:
            if probe is not None:
                probe.marks()  # joined before anything can free the walk's buffer
        reuse = None
        if cmp is not None:
            reuse = (cmp, lambda: self.tree(cmp.layer_id))
        scanner = self._scanner(writer, progress, allow_changing, exclude, reuse,
                                settled_before)
        # the scan goes straight into the diff (only what differs is kept), or with
        # no parent straight into the manifest's encoding (nothing is kept)
        scanned = scanner.iter_scan(directory, records, probe)
        own = diff_layer(base, scanned) if parent is not None else scanned
        keep = None
        if wc_key is not None and records is not None:
            keep = (wc_key, lambda: scanner.keep_records(records))
        layer_id, count, existed = self._commit(writer, parent, own, tag, message,
                                                tree_fp, kept=kept, walk_cache=keep)
        return SnapshotResult(layer_id, scanner.stats, count, existed)

    def _scanner(self, writer: ChunkWriter, progress, allow_changing: bool,
                 exclude: Exclusions | None, reuse, settled_before: int) -> Scanner:
        scanner = Scanner(self.store, self.store.config.chunker, writer.put,
                          progress=progress, allow_changing=allow_changing,
                          exclude=exclude.excluded if exclude else None, reuse=reuse,
                          settled_before=settled_before or None)
        scanner.reader.on_file = writer.file_hint  # deltas against a path's last version
        return scanner

    def _walk_comparison(self, wc_key: bytes | None, records: memoryview | None,
                         parent: bytes | None = None) -> walkcache.Comparison | None:
        """The directory's walk cache against its new walk, or None (no cache, its
        layer is gone, or it is damaged: then every file is read). A directory with
        no cache of its own takes one of `parent`'s tree kept under another path: a
        directory renamed or moved keeps its files' inodes and ctimes, so they match."""
        if wc_key is None or records is None:
            return None
        with self.store.read(buffers=True) as t:
            raw = t.walkcache.get(wc_key)
            if raw is None and parent is not None:
                raw = t.walkcache.of_layer(parent)
            if raw is None or not t.layers.has(bytes(raw[:32])):
                return None
            raw = bytes(raw)
        try:
            return walkcache.compare(walkcache.WalkCache.decode(raw), records)
        except CorruptData:
            return None

    @contextmanager
    def walk_reuse(self, directory: str | bytes | Path
                   ) -> Iterator[tuple[memoryview | None, tuple | None]]:
        """The native walk of `directory` (None if it failed: a scan's own walk then
        reports why) and what a scan of it may take from its walk cache (Scanner's
        `reuse`; None without one), for scans that store nothing (build cache keys, a
        diff against a directory). The records are valid inside the block only."""
        with ExitStack() as stack:
            records = None
            try:
                records = stack.enter_context(walk(os.fspath(directory)))[0]
            except OSError:
                pass
            cmp = self._walk_comparison(fingerprint.path_key(directory), records)
            reuse = (cmp, lambda: self.tree(cmp.layer_id)) if cmp is not None else None
            yield records, reuse

    def _rekeyed(self, wc_key: bytes | None, layer_id: bytes) -> tuple[bytes, bytes] | None:
        """The directory's walk cache records when they describe `layer_id`'s tree (to
        be kept under the layer committed with the same tree), else None."""
        if wc_key is None:
            return None
        with self.store.read() as t:
            raw = t.walkcache.get(wc_key)
            if raw is None or bytes(raw[:32]) != layer_id:
                return None
            raw = bytes(raw)
        try:
            return wc_key, walkcache.WalkCache.decode(raw).records
        except CorruptData:
            return None

    def _changes(self, scanner: Scanner, parent: bytes | None, root: bytes,
                 records: memoryview, cmp: walkcache.Comparison) -> list[Entry]:
        """The new layer's own entries when the walk cache describes the parent's tree:
        only what the cache found changed is scanned; the rest is the parent's. What a
        diff against the parent's tree would give, without decoding that tree unless an
        entry may equal the parent's (a chmod to the same mode, a rewrite of the same
        bytes): then it is decoded, once."""
        assert parent is not None
        parent_entries: dict[bytes, Entry] | None = None
        own: list[Entry] = []
        for _n, old_off, e in scanner.scan_changes(root, records, cmp):
            if e is None:
                if old_off >= 0 and cmp.events[_n][0] >= 0:
                    raise _Fallback  # the parent has it, and it vanished meanwhile
                if cmp.events[_n][0] < 0:
                    own.append(Entry(_old_path(cmp.old, old_off), WHITEOUT))
                continue
            if e.kind == HARDLINK or (old_off >= 0 and not _differs(e, cmp.old, old_off)):
                if parent_entries is None:
                    parent_entries = {x.path: x for x in self.tree(parent)}
                if parent_entries.get(e.path) == e:
                    continue
            own.append(e)
        return own

    def _same_tree(self, layer_id: bytes, other: bytes, limit: int = 64) -> bool:
        """Whether the two layers are known to hold the same tree without decoding it:
        one is the other, or descends from it through layers of no entries of their
        own (an unchanged directory snapshotted again onto its last layer). Each such
        layer's (small) manifest is read to confirm it is empty: its record's entry
        count is covered by no id. False when not known (then the caller diffs)."""
        for a, b in ((layer_id, other), (other, layer_id)):
            lid: bytes | None = a
            for _ in range(limit):
                if lid == b:
                    return True
                if lid is None or self.record(lid).entries != 0 or self.entries(lid):
                    break
                lid = self.record(lid).parent
        return False

    def _unchanged_since(self, fp: bytes | None, fp_key: bytes | None) -> bytes | None:
        if fp is None or fp_key is None:
            return None
        with self.store.read() as t:
            known = t.fingerprints.get(fp_key)
            if known is None or known[0] != fp:
                return None
            return known[1] if t.layers.has(known[1]) else None

    def _recommit(self, writer: ChunkWriter, layer_id: bytes, tag: str | None,
                  kept: bool) -> bool:
        """Tag (and mark kept) the existing layer `layer_id`, as a snapshot that made it
        again would; False if it was removed meanwhile."""
        if tag is not None:
            check_tag(tag)
        found = []

        def extra(t: Tables) -> None:
            old = t.layers.get(layer_id)
            if old is None:
                return
            found.append(True)
            if kept:
                _mark_kept(t, layer_id, old)
            if tag is not None:
                t.tags.put(tag, layer_id)

        writer.commit(extra)
        return bool(found)

    def commit_entries(self, parent: bytes | None, own: list[Entry], writer: ChunkWriter,
                       tag: str | None = None, message: str = "") -> bytes:
        """Store a layer made of `own` entries (whose chunks `writer` holds)."""
        return self._commit(writer, parent, own, tag, message)[0]

    def _commit(self, writer: ChunkWriter, parent: bytes | None, own: Iterable[Entry],
                tag: str | None, message: str,
                tree_fp: tuple[bytes, bytes] | None = None,
                kept: bool = False,
                walk_cache: tuple[bytes, Callable[[], Any]] | None = None
                ) -> tuple[bytes, int, bool]:
        """Store the layer of `own` entries (an iterator is encoded as it goes, never
        held: a first snapshot streams its scan through here); (id, entries, existed).
        `walk_cache`: the directory's key and a function giving the records to keep,
        called once `own` is consumed."""
        if tag is not None:
            check_tag(tag)  # here, where tags are written, whoever the caller
        enc = ManifestEncoder(parent)
        for e in own:
            enc.add(e)
        data = enc.finish()
        layer_id = blake3.blake3(data).digest()
        existed = self.exists(layer_id)
        manifest = []
        start = 0
        p = self.store.config.chunker
        for end in cut_points(data, min_size=p.min_size, avg_size=p.avg_size,
                              max_size=p.max_size):
            piece = data[start:end]
            cid = blake3.blake3(piece).digest()
            writer.put(cid, piece)
            manifest.append((cid, len(piece)))
            start = end
        new_bytes = writer.new_bytes
        del data
        rec = LayerRecord(parent, manifest, time.time(), message, enc.count,
                          enc.file_bytes, new_bytes, kept, enc.inline_bytes)
        cache_value = None
        if walk_cache is not None:
            cache_value = walkcache.WalkCache(layer_id, walk_cache[1]()).encode()

        def extra(t: Tables) -> None:
            if parent is not None and not t.layers.has(parent):
                raise NotFound(f"parent layer {parent.hex()} was removed meanwhile")
            # "A layer record never names an unindexed chunk", whoever made the entries
            bad = _first_unindexed(t, enc)
            if bad is not None:
                path = bad[0].decode(errors="backslashreplace")
                raise CorruptData(f"/{path}: chunk {bad[1].hex()} is not in the store; "
                                  "nothing was committed")
            old = t.layers.get(layer_id)
            if old is None:
                t.layers.put(layer_id, rec.encode())
                if parent is not None:
                    t.refs.add(parent, LAYER_REF, layer_id)
            elif kept:  # a snapshot of a tree a build step committed too: the user's now
                _mark_kept(t, layer_id, old)
            if tag is not None:
                t.tags.put(tag, layer_id)
            if walk_cache is not None:
                t.walkcache.put(walk_cache[0], cache_value)
            if tree_fp is not None:
                t.fingerprints.put(tree_fp[0], tree_fp[1], layer_id)

        writer.commit(extra)
        return layer_id, enc.count, existed

    def set_tag(self, name: str, layer_id: bytes) -> None:
        check_tag(name)
        with self.store.write() as t:
            if not t.layers.has(layer_id):
                raise NotFound(f"layer {layer_id.hex()} not found")
            t.tags.put(name, layer_id)

    @staticmethod
    def set_tag_in(t: Tables, name: str, layer_id: bytes | None) -> None:
        """In the transaction `t`, point the tag `name` at `layer_id`, or delete it
        (None); for undoing a tag a failed job wrote."""
        if layer_id is None:
            t.tags.delete(name)
        else:
            check_tag(name)
            t.tags.put(name, layer_id)

    def children(self) -> dict[bytes, list[bytes]]:
        """Each layer that has children, and its children."""
        out: dict[bytes, list[bytes]] = {}
        with self.store.read() as t:
            for lid, owner, key in t.refs.items():
                if owner == LAYER_REF:
                    out.setdefault(lid, []).append(key)
        return out

    @staticmethod
    def in_use_in(t: Tables, layer_id: bytes, owners: tuple[str, ...] = ()) -> str | None:
        """Why the layer may not be removed, or None: it is tagged, or a record
        references it (a child layer, a snapshot); references by `owners` aside."""
        tagged = t.tags.naming(layer_id)
        if tagged:
            return f"is tagged {', '.join(tagged)}; remove the tag first"
        refs = [(o, k) for o, k in t.refs.referrers(layer_id) if o not in owners]
        kids = [k for o, k in refs if o == LAYER_REF]
        if kids:
            return f"is the parent of {len(kids)} layer(s); remove them first"
        if refs:
            owner, key = refs[0]
            return (f"is used by {owner} {key.decode(errors='replace')!r}; "
                    "remove it first")
        return None

    def remove(self, ref: str) -> tuple[str, bytes]:
        """Remove a tag (if `ref` is one) or else a layer nothing uses: its checks and
        its deletion are one transaction, so no child or snapshot can land on it
        meanwhile."""
        with self.store.write() as t:
            lid = t.tags.get(ref)
            if lid is not None:
                t.tags.delete(ref)
                return "tag", lid
            lid = self.resolve_in(t, ref)
            why = self.in_use_in(t, lid)
            if why is not None:
                raise FailedPrecondition(f"cannot remove layer {lid.hex()[:12]}: it {why}")
            self._delete(t, lid)
        self._trees.pop(lid, None)
        return "layer", lid

    def remove_unused_in(self, t: Tables, layer_id: bytes) -> bool:
        """In the transaction `t`, remove the layer if nothing uses it and no `snapshot`
        made it (its record is not `kept`); whether it was removed. For collectors (the
        snapshotter's), which drop their own references first."""
        raw = t.layers.get(layer_id)
        if raw is None or LayerRecord.decode(raw).kept:
            return False
        if self.in_use_in(t, layer_id) is not None:
            return False
        self._delete(t, layer_id)
        self._trees.pop(layer_id, None)
        return True

    def _delete(self, t: Tables, layer_id: bytes) -> None:
        rec = self.record_in(t, layer_id)
        t.layers.delete(layer_id)
        if rec.parent is not None:
            t.refs.remove(rec.parent, LAYER_REF, layer_id)


__all__ = ["Layers", "LayerRecord", "SnapshotResult", "check_tag"]
