"""Scanning a directory into a tree of entries, storing file content as it goes.

The walk lstats every entry in component order and reads xattrs; regular files go to
a `ContentReader` (store/ingest.py), which chunks, hashes and stores them. A walk
cache (walkcache.py) gives back, without reading or even looking at it, each entry
whose lstat record is unchanged since the directory was last snapshotted (ctime
catches `touch -d`, xattr and content changes).
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field

from .._native import WALK_RECORD_FIXED, walk_keep, xattr_marks
from ..chunking import ChunkerParams
from ..errors import InvalidArgument, NotFound, SourceChanged, os_error_reason, short_path
from ..store.ingest import ContentReader, IngestStats
from ..store.repository import Store
from .manifest import BLK, CHR, DIR, FIFO, HARDLINK, INLINE_MAX, REG, SYMLINK, Entry
from .walkcache import Comparison

# An entry is trusted by the next snapshot's walk cache only if its ctime is this much
# older than the moment the walk began: timestamps are coarse, so a write in the same
# tick as our lstat could otherwise leave size, mtime and ctime unchanged (git's
# "racy" case).
RACY_NS = 1_000_000_000


@dataclass
class ScanStats(IngestStats):
    bytes_total: int = 0
    cache_hits: int = 0
    warnings: list[str] = field(default_factory=list)
    # files that kept changing while read, stored as last read (allow_changing only)
    changed: list[bytes] = field(default_factory=list)
    # set when a tree fingerprint showed the directory unchanged since this layer
    unchanged_since: bytes | None = None


# A file that changes while it is read is read again, up to this many times in all.
READ_ATTEMPTS = 3

# One record of the native walk (csrc/walk.h) after its u16 path length and the path:
# mode, uid, gid, reserved, nlink, size, mtime_ns, ctime_ns, ino, dev, rdev.
_RECORD = struct.Struct("<IIIIQQqqQQQ")
_U16 = struct.Struct("<H")


class XattrProbe:
    """Which entries of a native walk have xattrs (`_native.xattr_marks`), found on a
    thread of its own: the C loop runs without the GIL, so it overlaps what the caller
    does meanwhile (decoding the parent layer's tree)."""

    def __init__(self, root: str | bytes, records: memoryview) -> None:
        self.root = os.path.realpath(os.fsencode(os.path.abspath(root)))
        self._marks: bytes | None = None
        self._thread = threading.Thread(target=self._run, args=(records,),
                                        name="pylayers-xattr-probe", daemon=True)
        self._thread.start()

    def _run(self, records: memoryview) -> None:
        try:
            self._marks = xattr_marks(self.root, records)
        except OSError:
            self._marks = None  # the scan looks at every entry itself

    def marks(self) -> bytes | None:
        self._thread.join()
        return self._marks


def _record_at(buf: memoryview, off: int, u16=_U16.unpack_from) -> bytes:
    """The whole walk record at offset `off` of `buf`."""
    (plen,) = u16(buf, off)
    return bytes(buf[off : off + 2 + plen + _RECORD.size])


class WalkStat:
    """The fields of an lstat the scan uses, from a native walk record (no
    os.stat_result to build: a tree of 100k files has 100k of these)."""

    __slots__ = ("st_mode", "st_uid", "st_gid", "st_nlink", "st_size", "st_mtime_ns",
                 "st_ctime_ns", "st_ino", "st_dev", "st_rdev")

    def __init__(self, mode: int, uid: int, gid: int, nlink: int, size: int, mtime_ns: int,
                 ctime_ns: int, ino: int, dev: int, rdev: int) -> None:
        self.st_mode, self.st_uid, self.st_gid, self.st_nlink = mode, uid, gid, nlink
        self.st_size, self.st_mtime_ns, self.st_ctime_ns = size, mtime_ns, ctime_ns
        self.st_ino, self.st_dev, self.st_rdev = ino, dev, rdev


def _changed(before: os.stat_result, after: os.stat_result) -> bool:
    return (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (
        before.st_size, before.st_mtime_ns, before.st_ctime_ns)


def _dir_id(path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def read_xattrs(path: bytes) -> tuple[tuple[bytes, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.ENODATA, errno.EPERM):
            return ()
        raise
    if not names:
        return ()
    out = []
    for name in sorted(names, key=lambda n: n.encode("utf-8", "surrogateescape")):
        try:
            out.append((name.encode("utf-8", "surrogateescape"),
                        os.getxattr(path, name, follow_symlinks=False)))
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise
    return tuple(out)


class Scanner:
    """Turns a directory into a tree (entries in component order).

    With `reuse` (a walk cache's comparison with the walk's records, and the tree of
    the layer it names), each entry whose record the cache holds unchanged and trusted
    is that layer's entry, not read again. `flags` then says, per record, what the
    next walk cache may keep: 0 nothing (not in the tree), 1 the record, trusted (the
    entry is exactly what the record shows, and its ctime settled), 2 the record,
    untrusted (`keep_records`)."""

    def __init__(self, store: Store | None, params: ChunkerParams,
                 sink: Callable[[bytes, bytes], bool] | None,
                 progress=None, allow_changing: bool = False,
                 exclude: Callable[[bytes], bool] | None = None,
                 reuse: tuple[Comparison, Callable[[], list[Entry]]] | None = None,
                 settled_before: int | None = None) -> None:
        """`exclude(rel_path)`: leave that path out, and all under it (ignore.py). The
        store's own directory, if the tree holds it, is always left out. `reuse`: the
        comparison and a function giving the tree of its layer (called only if an
        entry is reused). `settled_before`: a ctime below this (ns) is out of the racy
        window (default: a second before the scan starts)."""
        self.store = store
        self.exclude = exclude
        self._store_dir = _dir_id(store.path) if store is not None else None
        self.stats = ScanStats()
        self.reader = ContentReader(params, sink, self.stats)
        self.progress = progress
        # a file still changing after READ_ATTEMPTS reads: store the last read (and
        # list it in stats.changed) instead of failing with SourceChanged
        self.allow_changing = allow_changing
        self._links: dict[tuple[int, int], bytes] = {}
        self.reuse = reuse
        self.settled_before = settled_before
        self.flags = bytearray()  # per walk record: 0 dropped, 1 trusted, 2 untrusted
        self._consistent = False  # the last file read matched its walk record
        self._root = b""
        self._vanished_paths: list[bytes] = []
        self._probe: XattrProbe | None = None

    def _vanished(self, path: bytes) -> bytes:
        """Note that `path` vanished while the walk was at it; returns the highest
        directory gone with it (or `path`), so a walk can stop listing a deleted one."""
        self._vanished_paths.append(path)
        return self._highest_gone(path)

    def _highest_gone(self, path: bytes) -> bytes:
        top, parent = path, os.path.dirname(path)
        while (len(parent) > len(self._root) and parent != os.path.dirname(parent)
               and not os.path.lexists(parent)):
            top, parent = parent, os.path.dirname(parent)
        return top

    def _report_vanished(self) -> None:
        """One warning per vanished top directory (as things stand once the walk is
        done), not one per entry a concurrent `rm -r` took from under the walk."""
        tops: list[bytes] = []
        for path in self._vanished_paths:
            top = self._highest_gone(path)
            # the walk is in component order: what one deleted directory took is consecutive
            if not tops or (top != tops[-1] and not top.startswith(tops[-1] + b"/")):
                tops.append(top)
        self._vanished_paths.clear()
        self.stats.warnings.extend(f"{os.fsdecode(t)}: vanished during scan" for t in tops)

    def scan(self, root: str | bytes, records: memoryview | None = None,
             probe: XattrProbe | None = None) -> list[Entry]:
        """The tree of the directory `root`. `records`: the native walk's records of
        it (`_native.walk`), taken a moment ago, to scan without listing and lstat-ing
        it again (what changed since is caught as it is read, as always); `probe`: an
        XattrProbe of them already started."""
        return list(self.iter_scan(root, records, probe))

    def iter_scan(self, root: str | bytes, records: memoryview | None = None,
                  probe: XattrProbe | None = None) -> Iterator[Entry]:
        """`scan`, entry by entry as the walk goes (with `records`), so a caller that
        keeps only some of them (a diff against the parent) never holds the whole tree.
        Errors about `root` itself are raised at the first `next`."""
        self._probe = probe
        root_b = os.fsencode(os.path.abspath(root))
        try:
            st = os.stat(root_b)
        except FileNotFoundError:
            raise NotFound(f"{os.fsdecode(root_b)}: no such directory") from None
        except OSError as e:
            raise InvalidArgument(f"{short_path(root_b)}: {os_error_reason(e, root_b)}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"{os.fsdecode(root_b)} is not a directory")
        yield from self._scan(os.path.realpath(root_b), st, walk=True, records=records)

    def scan_path(self, path: str | bytes) -> list[Entry]:
        """The entries of `path`, a directory (as `scan`) or any other file: then one
        entry, with an empty path. A symlink given as `path` is followed (as COPY
        does); symlinks below a directory are entries."""
        real = os.path.realpath(os.fsencode(path))
        try:
            st = os.lstat(real)
        except FileNotFoundError:
            raise NotFound(f"{os.fsdecode(path)}: no such file or directory") from None
        except OSError as e:
            raise InvalidArgument(f"{os.fsdecode(path)}: {e.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            return self.scan(real)
        entries = list(self._scan(real, st, walk=False))
        if not entries:
            raise NotFound(f"{os.fsdecode(path)}: vanished, or a socket")
        return entries

    def _scan(self, real: bytes, st: os.stat_result, walk: bool,
              records: memoryview | None = None) -> Iterator[Entry]:
        if self.settled_before is None:
            self.settled_before = time.time_ns() - RACY_NS
        with ExitStack():
            try:
                entries: list[Entry] = []
                if walk:
                    self._root = real
                if records is not None:
                    yield from self._walk_records(real, records, entries)
                else:
                    self._entry(real, b"", st, entries)
                    if walk:
                        self._walk(real, b"", entries)
                    yield from entries
                self._report_vanished()
            finally:
                self.reader.close()

    def _walk(self, abs_dir: bytes, rel_dir: bytes, entries: list[Entry]) -> None:
        try:
            with os.scandir(abs_dir) as it:
                children = sorted(it, key=lambda d: d.name)
        except FileNotFoundError:
            self._vanished(abs_dir)
            return
        except OSError as e:
            raise InvalidArgument(f"cannot list {short_path(abs_dir)}: "
                                  f"{os_error_reason(e, abs_dir)}") from None
        for d in children:
            rel = rel_dir + b"/" + d.name if rel_dir else d.name
            try:
                st = d.stat(follow_symlinks=False)
            except FileNotFoundError:
                if self._vanished(d.path) != d.path:
                    return  # this directory went with it: no use listing the rest
                continue
            except OSError as e:  # ENAMETOOLONG past PATH_MAX, EIO...
                raise InvalidArgument(f"cannot stat {short_path(d.path)}: "
                                      f"{os_error_reason(e, d.path)}") from None
            if self._left_out(d.path, rel, st):
                continue
            if self._entry(d.path, rel, st, entries) and stat.S_ISDIR(st.st_mode):
                self._walk(d.path, rel, entries)

    def _walk_records(self, root: bytes, buf: memoryview,
                      entries: list[Entry]) -> Iterator[Entry]:
        """`_entry` for each record of a native walk of `root` (root first, component
        order), skipping the subtrees of directories left out or gone. An entry the
        walk cache holds unchanged (`reuse`) is its layer's entry: no stat object, no
        call."""
        unpack, u16, rec_size = _RECORD.unpack_from, _U16.unpack_from, _RECORD.size
        isdir, isreg = stat.S_ISDIR, stat.S_ISREG
        entry, left_out = self._entry, self._left_out
        exclude = self.exclude
        progress, stats = self.progress, self.stats
        settled = self.settled_before
        files = hits = total = 0
        prefix = root + b"/"
        skip: bytes | None = None  # rel + b"/" of a subtree left out
        match: bytes | None = None
        old_tree: list[Entry] = []
        k = 0  # position in old_tree (a merge by path)
        if self.reuse is not None:
            match = self.reuse[0].match
            if any(match):
                old_tree = self.reuse[1]()
        probe = self._probe if self._probe is not None and self._probe.root == root \
            else XattrProbe(root, buf)
        marks = probe.marks()  # which entries have xattrs: one C loop
        if marks is None:
            marks = b"\x01" * (len(buf) // WALK_RECORD_FIXED + 1)  # look at each
        flags = self.flags = bytearray(len(buf) // WALK_RECORD_FIXED + 1)
        i = -1
        pos, end = 0, len(buf)
        while pos < end:
            i += 1
            (plen,) = u16(buf, pos)
            rel = bytes(buf[pos + 2 : pos + 2 + plen])
            pos += 2 + plen
            mode, uid, gid, _r, nlink, size, mtime, ctime, ino, dev, rdev = unpack(buf, pos)
            pos += rec_size
            if skip is not None:
                if rel.startswith(skip):
                    continue
                skip = None
            if match is not None and match[i] and (exclude is None or not rel
                                                   or not exclude(rel)):
                key = rel.replace(b"/", b"\x00")
                n = len(old_tree)
                while k < n and old_tree[k].key < key:
                    k += 1
                if k < n and old_tree[k].key == key:
                    old = old_tree[k]
                    flags[i] = 1
                    if isreg(mode):
                        files += 1
                        hits += 1
                        total += size
                        if progress is not None:
                            progress(size)
                    yield old
                    continue
            st = WalkStat(mode, uid, gid, nlink, size, mtime, ctime, ino, dev, rdev)
            self._consistent = True
            if not rel:
                kept = entry(root, rel, st, entries, marks[i])  # type: ignore[arg-type]
            else:
                path = prefix + rel
                kept = not left_out(path, rel, st) and entry(
                    path, rel, st, entries, marks[i])  # type: ignore[arg-type]
                if not kept and isdir(mode):
                    skip = rel + b"/"
            if kept:
                flags[i] = 1 if self._consistent and ctime < settled else 2
            if entries:
                yield from entries
                entries.clear()
        del flags[i + 1:]
        stats.files += files
        stats.cache_hits += hits
        stats.bytes_total += total

    def scan_changes(self, root: bytes, buf: memoryview, cmp: Comparison
                     ) -> Iterator[tuple[int, int, Entry | None]]:
        """The entries of the records `cmp` found changed or added, as (event index,
        old record offset or -1, entry or None when left out: vanished, a socket, a
        path `exclude` names); an old path that is gone is (index, offset, None) too,
        its new offset -1 (`cmp.events[index]`). The subtree of a new directory left
        out is skipped. What the cache matched is not looked at: `flags` starts as
        `cmp.match`, the caller keeps those entries of the layer `cmp` names."""
        self.settled_before = self.settled_before or time.time_ns() - RACY_NS
        self._root = root
        unpack, u16 = _RECORD.unpack_from, _U16.unpack_from
        flags = self.flags = bytearray(cmp.match)
        settled, prefix = self.settled_before, root + b"/"
        stats = self.stats
        stats.files += cmp.hits
        stats.cache_hits += cmp.hits
        stats.bytes_total += cmp.hit_bytes
        if self.progress is not None and cmp.hit_bytes:
            self.progress(cmp.hit_bytes)
        changed = [i for i, _o, _j, _p in cmp.events if i >= 0]
        marks = b""
        if changed:  # xattrs looked up for what changed only: a ctime moves with them
            sub = b"".join(_record_at(buf, cmp.events[n][1], u16)
                           for n in range(len(cmp.events)) if cmp.events[n][0] >= 0)
            marks = xattr_marks(root, sub) if sub else b""
        m = 0
        skip: bytes | None = None
        entries: list[Entry] = []
        try:
            for n, (i, off, _j, old_off) in enumerate(cmp.events):
                if i < 0:
                    yield n, old_off, None
                    continue
                look = marks[m] if m < len(marks) else 1
                m += 1
                (plen,) = u16(buf, off)
                rel = bytes(buf[off + 2 : off + 2 + plen])
                if skip is not None:
                    if rel.startswith(skip):
                        continue
                    skip = None
                mode, uid, gid, _r, nlink, size, mtime, ctime, ino, dev, rdev = unpack(
                    buf, off + 2 + plen)
                st = WalkStat(mode, uid, gid, nlink, size, mtime, ctime, ino, dev, rdev)
                self._consistent = True
                path = prefix + rel if rel else root
                kept = (not rel or not self._left_out(path, rel, st)) and self._entry(
                    path, rel, st, entries, look)  # type: ignore[arg-type]
                if not kept:
                    if stat.S_ISDIR(mode):
                        skip = rel + b"/"
                    yield n, old_off, None
                    continue
                flags[i] = 1 if self._consistent and ctime < settled else 2
                assert len(entries) == 1
                yield n, old_off, entries.pop()
            self._report_vanished()
        finally:
            self.reader.close()

    def keep_records(self, buf: memoryview | bytes) -> memoryview:
        """The records of the walk `buf` this scan put in its tree, as a walk cache
        keeps them (`flags`); after the whole scan."""
        return walk_keep(buf, self.flags)

    def _left_out(self, path: bytes, rel: bytes, st: os.stat_result) -> bool:
        if stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) == self._store_dir:
            self.stats.warnings.append(f"{os.fsdecode(path)}: the store itself, left out")
            return True
        return self.exclude is not None and self.exclude(rel)

    def _entry(self, path: bytes, rel: bytes, st: os.stat_result, entries: list[Entry],
               look_xattrs: bool = True) -> bool:
        """Add the entry of `path` to `entries`; False if it is left out (vanished, a
        socket). `look_xattrs` False: known to have none (the walk's probe said so)."""
        mode = st.st_mode
        try:
            xattrs = read_xattrs(path) if look_xattrs else ()
        except FileNotFoundError:
            self._vanished(path)
            return False
        except OSError as e:
            raise InvalidArgument(f"cannot read xattrs of {short_path(path)}: "
                                  f"{os_error_reason(e, path)}") from None
        e = Entry(rel, 0, stat.S_IMODE(mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                  xattrs=xattrs)
        if stat.S_ISREG(mode):
            if st.st_nlink > 1:
                first = self._links.get((st.st_dev, st.st_ino))
                if first is not None:
                    e.kind, e.target = HARDLINK, first
                    entries.append(e)
                    return True
                self._links[(st.st_dev, st.st_ino)] = rel
            e.kind = REG
            if not self._file(path, st, e):
                return False
        elif stat.S_ISDIR(mode):
            e.kind = DIR
        elif stat.S_ISLNK(mode):
            e.kind = SYMLINK
            try:
                e.target = os.readlink(path)
            except FileNotFoundError:
                self._vanished(path)
                return False
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            e.kind = CHR if stat.S_ISCHR(mode) else BLK
            e.rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        elif stat.S_ISFIFO(mode):
            e.kind = FIFO
        else:  # sockets cannot be recreated by a checkout; tar skips them too
            self.stats.warnings.append(f"{os.fsdecode(path)}: socket ignored")
            return False
        entries.append(e)
        return True

    def _file(self, path: bytes, st: os.stat_result, e: Entry) -> bool:
        self.stats.files += 1
        self.stats.bytes_total += st.st_size
        for attempt in range(1, READ_ATTEMPTS + 1):
            read = self._read_once(path, st, e)
            if read is None:
                return False
            fst, after = read
            if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                problem = "replaced during scan"
            elif e.size != st.st_size or _changed(st, after):
                problem = "changed as we read it"
            else:
                break
            if attempt == READ_ATTEMPTS:
                if not self.allow_changing:
                    raise SourceChanged(
                        os.fsdecode(path), f"{problem} ({READ_ATTEMPTS} reads)",
                        "snapshot it again when it is quiet, or pass --allow-changing to "
                        "store the last read")
                self._consistent = False
                self.stats.changed.append(path)
                self.stats.warnings.append(
                    f"{os.fsdecode(path)}: {problem} ({READ_ATTEMPTS} reads); stored "
                    f"the last read ({e.size} bytes)")
                e.mode, e.uid, e.gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
                e.mtime_ns = st.st_mtime_ns
                return True
            seen = st.st_size
            self._consistent = False  # what is stored is a later state than the walk saw
            try:  # read it again, as it is now
                st = os.lstat(path)
            except FileNotFoundError:
                self._vanished(path)
                return False
            if not stat.S_ISREG(st.st_mode):
                raise SourceChanged(os.fsdecode(path),
                                    "replaced by another kind of file during scan",
                                    "snapshot it again")
            self.stats.bytes_total += st.st_size - seen
        # metadata as of the consistent read
        e.mode, e.uid, e.gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
        e.mtime_ns = st.st_mtime_ns
        return True

    def _read_once(self, path: bytes, st: os.stat_result,
                   e: Entry) -> tuple[os.stat_result, os.stat_result] | None:
        """Read the file at `path` into `e` (content, chunks, size: at most the size
        `st` saw); the file's fstat before and after the read, or None if it vanished."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            self._vanished(path)
            return None
        except OSError as err:
            raise InvalidArgument(f"cannot read {short_path(path)}: "
                                  f"{os_error_reason(err, path)}") from None
        try:
            fst = os.fstat(fd)
            try:
                if st.st_size <= INLINE_MAX:
                    e.set_inline(self.reader.read_inline(fd, st.st_size, self.progress))
                else:
                    e.content, e.chunks, e.size = self.reader.read(fd, st.st_size,
                                                                   self.progress, e.path)
                    if e.size <= INLINE_MAX:  # it shrank as we read it: held inline
                        e.set_inline(os.pread(fd, e.size, 0))
            except OSError as err:
                raise InvalidArgument(
                    f"cannot read {short_path(path)}: {os_error_reason(err, path)}") from None
            return fst, os.fstat(fd)
        finally:
            os.close(fd)

