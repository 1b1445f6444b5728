"""Build cache keys: which layer an image builder can reuse for an instruction.

Keys follow BuildKit's rules (docs/format.md, "Build cache keys"). The key of a step is
the BLAKE3 of a domain-separated, length-prefixed encoding of

- its parent: the previous step's key, or the base layer's id, or nothing;
- the instruction text and its options (canonical JSON);
- for steps that read files (COPY/ADD), every input file's record: path, type, mode,
  uid, gid, size, content id (BLAKE3), link target, device numbers and xattrs (names
  and values), never the mtime.

The parent's key is part of the key, so one miss changes the key of every later step.

File content comes from a hash-only scan: for an input directory a snapshot keeps a walk
cache of, a file's content id is its cached layer's only when the file's lstat record
(inode, size, mtime *and* ctime among it) is the one recorded (a write always moves the
ctime, and the ctime cannot be set back), otherwise the file is read. The scan never
writes a walk cache: it stores nothing.

`BuildCache(store)` maps keys to layers in the store's `cachekeys` table; this module
owns its records (layer id + the key's record as JSON), through the table's accessor.
With each key it keeps what the key was made of (parent, instruction, options, and per
input file its attributes), so `explain_miss` can say what differs from the closest
earlier key.
"""

from __future__ import annotations

import difflib
import json
import os
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import blake3

from ..chunking import ChunkerParams
from ..errors import CorruptData, InvalidArgument, NotFound, SourceChanged
from ..layers.manifest import BLK, CHR, HARDLINK, KIND_NAMES, REG, SYMLINK, Entry
from ..layers.scan import Scanner
from ..store.repository import Store
from ..store.tables import CacheKeyTable, Tables

KEY_DOMAIN = b"pylayers build cache key v1\x00"
RECORD_VERSION = 1
PARENT_NONE, PARENT_KEY, PARENT_LAYER = 0, 1, 2
_PARENT_NAMES = {PARENT_NONE: "none", PARENT_KEY: "key", PARENT_LAYER: "layer"}
_PARENT_KINDS = {v: k for k, v in _PARENT_NAMES.items()}
NO_CONTENT = bytes(32)
MAX_SHOWN = 20  # differences listed by explain_miss

_U32 = struct.Struct("<I")
_HEAD = struct.Struct("<BIIIQ")  # kind, mode, uid, gid, size
_DEV = struct.Struct("<II")
_XATTR = struct.Struct("<HI")


# -- keys ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheKey:
    """A step's cache key. Equal keys have equal digests; `record` (what the key was made
    of, used to explain misses) is carried along but not compared."""

    digest: bytes
    record: dict | None = field(default=None, compare=False, repr=False)

    @property
    def hex(self) -> str:
        return self.digest.hex()

    def __str__(self) -> str:
        return self.hex

    @classmethod
    def from_hex(cls, text: str) -> CacheKey:
        try:
            digest = bytes.fromhex(text)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise InvalidArgument(f"invalid cache key {text!r} (64 hex digits)")
        return cls(digest)


@dataclass
class InputsChecksum:
    """The scanned inputs: per input, its name and its entries in component order
    (hardlinks carry their inode's size and content id), and what the scans did."""

    inputs: list[tuple[str, list[Entry]]]
    files: int = 0
    bytes_read: int = 0
    cache_hits: int = 0


def _normalise_inputs(inputs) -> list[tuple[bytes, str]]:
    out = []
    for item in inputs or ():
        if isinstance(item, tuple | list):
            if len(item) != 2:
                raise InvalidArgument(f"input {item!r}: a path or a (path, destination) pair")
            src, dest = item
            name = os.fsdecode(dest)
        else:
            src, name = item, os.fsdecode(item)
        out.append((os.fsencode(src), name))
    return out


IGNORABLE = frozenset({"mode", "owner"})


def checksum_inputs(inputs: Iterable, *, store: Store | None = None,
                    exclude: Callable[[bytes], bool] | None = None,
                    ignore: Iterable[str] = ()) -> InputsChecksum:
    """Scan `inputs` (paths, or (path, destination) pairs) without storing anything. An
    input is named by its destination, else by the path as given (never made absolute),
    so keys do not depend on where the build context lives. `exclude(path)`: leave out
    that path below an input (its full path as joined to the input's), and what lies
    under it. `ignore`: attributes left out of the records, as a step that sets them
    itself does not depend on them: "mode" (COPY --chmod), "owner" (COPY, which gives
    its files to root or to --chown)."""
    params = store.config.chunker if store is not None else ChunkerParams()
    ignore = frozenset(ignore)
    if ignore - IGNORABLE:
        raise InvalidArgument(f"cannot ignore {sorted(ignore - IGNORABLE)} (only "
                              f"{sorted(IGNORABLE)})")
    result = InputsChecksum([])
    for src, name in _normalise_inputs(inputs):
        # one scanner per input: hardlinks are resolved within one input
        skip = None
        if exclude is not None:
            def skip(rel: bytes, src: bytes = src) -> bool:
                return exclude(os.path.join(src, rel))
        try:
            entries, scanner = _scan_input(store, params, src, skip)
        except SourceChanged as e:  # the bytes hashed may not be any one version of it
            raise InvalidArgument(f"{e.path}: {e.problem}: cannot checksum an input that "
                                  "is being written") from None
        first = {e.path: e for e in entries if e.kind == REG}
        for e in entries:
            if e.kind == HARDLINK and e.target in first:
                e.size, e.content = first[e.target].size, first[e.target].content
            if "mode" in ignore:
                e.mode = 0
            if "owner" in ignore:
                e.uid = e.gid = 0
        result.inputs.append((name, entries))
        result.files += scanner.stats.files
        result.bytes_read += scanner.stats.bytes_read
        result.cache_hits += scanner.stats.cache_hits
    return result


def _scan_input(store: Store | None, params: ChunkerParams, src: bytes,
                exclude: Callable[[bytes], bool] | None) -> tuple[list[Entry], Scanner]:
    """The entries of one input (`Scanner.scan_path`); a directory a snapshot knows is
    scanned through its walk cache (files unchanged since are not read)."""
    real = os.path.realpath(src)
    if store is None or not os.path.isdir(real):
        scanner = Scanner(store, params, None, exclude=exclude)
        return scanner.scan_path(src), scanner
    from ..layers.repo import Layers

    with Layers(store).walk_reuse(real) as (records, reuse):
        scanner = Scanner(store, params, None, exclude=exclude, reuse=reuse)
        return scanner.scan(real, records), scanner


def _lp(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


def _utf8(text: str, what: str) -> bytes:
    if not isinstance(text, str):
        raise InvalidArgument(f"{what} must be a str, not {type(text).__name__}")
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} {text!r} is not encodable as UTF-8") from None


def encode_entry(e: Entry) -> bytes:
    """One input file's record in a key (docs/format.md, "Build cache keys")."""
    has_content = e.kind in (REG, HARDLINK)
    parts = [_lp(e.path),
             _HEAD.pack(e.kind, e.mode, e.uid, e.gid, e.size if has_content else 0),
             e.content if has_content and e.content else NO_CONTENT,
             _lp(e.target if e.kind in (SYMLINK, HARDLINK) else b""),
             _DEV.pack(*(e.rdev if e.kind in (CHR, BLK) else (0, 0))),
             struct.pack("<H", len(e.xattrs))]
    for name, value in e.xattrs:
        parts.append(_XATTR.pack(len(name), len(value)) + name + value)
    return b"".join(parts)


def _summary(e: Entry) -> list:
    """What `explain_miss` compares: kind, mode, uid, gid, size, content id, link target,
    device, and a digest of each xattr's value."""
    has_content = e.kind in (REG, HARDLINK)
    return [KIND_NAMES.get(e.kind, str(e.kind)), e.mode, e.uid, e.gid,
            e.size if has_content else 0,
            e.content.hex() if has_content and e.content else None,
            os.fsdecode(e.target) if e.kind in (SYMLINK, HARDLINK) else None,
            list(e.rdev) if e.kind in (CHR, BLK) else None,
            {os.fsdecode(n): blake3.blake3(v).hexdigest()[:16] for n, v in e.xattrs}]


def _check_option(value: Any, where: str) -> Any:
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, list | tuple):
        return [_check_option(v, where) for v in value]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidArgument(f"option {where}: keys must be str, not {k!r}")
            out[k] = _check_option(v, f"{where}.{k}" if where else k)
        return out
    raise InvalidArgument(f"option {where or '(top)'}: {type(value).__name__} is not allowed "
                          "(str, int, bool, None, and lists and maps of them)")


def canonical_options(options: Mapping | None) -> tuple[bytes, dict]:
    """(canonical JSON bytes, normalised options). None and {} are the same."""
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise InvalidArgument(f"options must be a mapping, not {type(options).__name__}")
    norm = _check_option(options, "")
    return json.dumps(norm, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode(), norm


def _parent_ref(parent) -> tuple[int, bytes]:
    if parent is None:
        return PARENT_NONE, NO_CONTENT
    if isinstance(parent, CacheKey):
        return PARENT_KEY, parent.digest
    if isinstance(parent, bytes | bytearray) and len(parent) == 32:
        return PARENT_LAYER, bytes(parent)
    raise InvalidArgument("parent must be a CacheKey, a base layer id (32 bytes) or None, "
                          f"not {parent!r}")


def cache_key(parent, instruction: str, inputs: Iterable | None = None,
              options: Mapping | None = None, *, store: Store | None = None,
              exclude: Callable[[bytes], bool] | None = None,
              ignore: Iterable[str] = ()) -> CacheKey:
    """The key of one build step.

    `parent`: the previous step's CacheKey, a base layer id (32 bytes), or None (a build
    from scratch). `instruction`: its text, e.g. "COPY src /app". `inputs`: the files it
    reads, as paths or (path, destination) pairs; directories are checksummed recursively.
    `options`: the instruction's options (e.g. {"chown": "1000:1000"}). With `store`, the
    walk cache of a directory snapshotted before spares reading files known unchanged;
    the key is the same either way.
    `exclude` and `ignore`: as `checksum_inputs` has them.
    """
    kind, pid = _parent_ref(parent)
    text = _utf8(instruction, "instruction")
    opts_json, opts = canonical_options(options)
    scanned = checksum_inputs(inputs or (), store=store, exclude=exclude, ignore=ignore)
    h = blake3.blake3(KEY_DOMAIN)
    h.update(bytes([kind]) + pid)
    h.update(_lp(text))
    h.update(_lp(opts_json))
    h.update(_U32.pack(len(scanned.inputs)))
    records = []
    for name, entries in scanned.inputs:
        h.update(_lp(_utf8(name, "input name")))
        h.update(_U32.pack(len(entries)))
        for e in entries:
            h.update(encode_entry(e))
        records.append({"name": name,
                        "files": {os.fsdecode(e.path): _summary(e) for e in entries}})
    record = {"version": RECORD_VERSION,
              "parent": {"kind": _PARENT_NAMES[kind],
                         "id": pid.hex() if kind != PARENT_NONE else None},
              "instruction": instruction, "options": opts, "inputs": records}
    return CacheKey(h.digest(), record)


# -- the cache ----------------------------------------------------------------------------


def _record_parent_ref(record: Mapping) -> bytes:
    try:
        p = record["parent"]
        kind = _PARENT_KINDS[p["kind"]]
        pid = bytes.fromhex(p["id"]) if kind != PARENT_NONE else NO_CONTENT
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidArgument(f"not a cache key record: {e}") from None
    return bytes([kind]) + pid


def _decode_value(raw: bytes) -> tuple[bytes, dict]:
    try:
        rec = json.loads(bytes(raw[32:]))
        if not isinstance(rec, dict):
            raise ValueError("not an object")
    except ValueError as e:
        raise CorruptData(f"cache key record is malformed: {e}") from None
    return bytes(raw[:32]), rec


def _short(hexid: str | None) -> str:
    return (hexid or "?")[:12]


def _show(text: str) -> str:
    """`text` quoted on one line: control characters and undecodable bytes escaped."""
    return repr(text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"))


def _display(name: str, rel: str) -> str:
    if not rel:
        return name
    return name.rstrip("/") + "/" + rel if name else rel


def _file_changes(old: list, new: list) -> list[str]:
    ok, om, ou, og, osz, oc, ot, od, ox = old
    nk, nm, nu, ng, nsz, nc, nt, nd, nx = new
    if ok != nk:
        return [f"type {ok} -> {nk}"]
    out = []
    if (oc, osz) != (nc, nsz):
        out.append("content changed" + (f" (size {osz} -> {nsz})" if osz != nsz else ""))
    if ot != nt:
        out.append(f"link target {_show(ot or '')} -> {_show(nt or '')}")
    if od != nd:
        out.append(f"device {od[0]}:{od[1]} -> {nd[0]}:{nd[1]}")
    if om != nm:
        out.append(f"mode {om:04o} -> {nm:04o}")
    if (ou, og) != (nu, ng):
        out.append(f"owner {ou}:{og} -> {nu}:{ng}")
    for name in sorted(set(ox) | set(nx)):
        if name not in ox:
            out.append(f"xattr {_show(name)} added")
        elif name not in nx:
            out.append(f"xattr {_show(name)} removed")
        elif ox[name] != nx[name]:
            out.append(f"xattr {_show(name)} value changed")
    return out


def _input_files(record: Mapping, by_index: bool) -> dict:
    out = {}
    for i, inp in enumerate(record.get("inputs", [])):
        for rel, summary in inp["files"].items():
            path = _display(inp["name"], rel)
            out[(i, path) if by_index else path] = summary
    return out


def differences(old: Mapping, new: Mapping) -> list[str]:
    """What differs from the record `old` to the record `new`, most telling first: the
    instruction text, its options, the list of inputs, then input files."""
    out = []
    if old.get("instruction") != new.get("instruction"):
        out.append(f"instruction text differs: {_show(old.get('instruction', ''))} vs "
                   f"{_show(new.get('instruction', ''))}")
    oo, no = old.get("options", {}), new.get("options", {})
    for k in sorted(set(oo) | set(no)):
        if k not in oo:
            out.append(f"option {k} added: {json.dumps(no[k])}")
        elif k not in no:
            out.append(f"option {k} removed (was {json.dumps(oo[k])})")
        elif oo[k] != no[k]:
            out.append(f"option {k}: {json.dumps(oo[k])} -> {json.dumps(no[k])}")
    onames = [i["name"] for i in old.get("inputs", [])]
    nnames = [i["name"] for i in new.get("inputs", [])]
    by_index = onames == nnames
    if not by_index:
        out.append(f"inputs differ: {onames} -> {nnames}")
    of, nf = _input_files(old, by_index), _input_files(new, by_index)
    def order(k):
        return (k[0], k[1].replace("/", "\0")) if by_index else k.replace("/", "\0")

    for k in sorted(set(of) | set(nf), key=order):
        path = k[1] if by_index else k
        if k not in of:
            out.append(f"{path}: file added")
        elif k not in nf:
            out.append(f"{path}: file removed")
        else:
            changes = _file_changes(of[k], nf[k])
            if changes:
                out.append(f"{path}: {', '.join(changes)}")
    return out


def _listing(diffs: list[str]) -> str:
    if not diffs:
        return "no recorded difference (the key encoding covers more than the record)"
    shown = "; ".join(diffs[:MAX_SHOWN])
    if len(diffs) > MAX_SHOWN:
        shown += f"; and {len(diffs) - MAX_SHOWN} more"
    return shown


class BuildCache:
    """Cache keys -> layers, kept in the store's `cachekeys` table. A key's layer is
    returned only while the layer exists; gc deletes keys whose layer is gone."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @staticmethod
    def _digest(key) -> bytes:
        if isinstance(key, CacheKey):
            return key.digest
        if isinstance(key, bytes | bytearray) and len(key) == 32:
            return bytes(key)
        if isinstance(key, str):
            return CacheKey.from_hex(key).digest
        raise InvalidArgument(f"not a cache key: {key!r}")

    def get(self, key) -> bytes | None:
        """The layer cached for `key`, or None (never cached, or its layer was removed)."""
        digest = self._digest(key)
        with self.store.read() as t:
            raw = t.cachekeys.get(digest)
            if raw is None or len(raw) < 32:
                return None
            layer = raw[:32]
            return layer if t.layers.has(layer) else None

    def put(self, key: CacheKey, layer_id: bytes) -> None:
        """Record that `key`'s step produced `layer_id` (which must exist)."""
        if not isinstance(key, CacheKey) or key.record is None:
            raise InvalidArgument("put needs a CacheKey made by cache_key (it carries what "
                                  "explains later misses)")
        if not isinstance(layer_id, bytes | bytearray) or len(layer_id) != 32:
            raise InvalidArgument(f"not a layer id: {layer_id!r}")
        layer_id = bytes(layer_id)
        rec = dict(key.record, created=time.time())
        value = layer_id + json.dumps(rec, sort_keys=True, separators=(",", ":"),
                                      ensure_ascii=True).encode()
        parent_ref = _record_parent_ref(key.record)
        with self.store.write() as t:
            if not t.layers.has(layer_id):
                raise NotFound(f"layer {layer_id.hex()} not found")
            t.cachekeys.put(key.digest, parent_ref, value)

    def record(self, key) -> tuple[bytes, dict] | None:
        """(layer id, record) stored for `key`, or None."""
        with self.store.read() as t:
            raw = t.cachekeys.get(self._digest(key))
            return _decode_value(raw) if raw is not None else None

    @staticmethod
    def _children(table: CacheKeyTable, parent_prefix: bytes) -> list[tuple[bytes, dict]]:
        out = []
        for digest in table.children(parent_prefix):
            raw = table.get(digest)
            if raw is not None:
                out.append((digest, _decode_value(raw)[1]))
        return out

    def explain_miss(self, key, extra: Callable[[bytes], list[tuple[bytes, dict]]] | None
                     = None) -> str:
        """Why `key` (a CacheKey, or the record it carries) missed: what differs from the
        closest earlier key — same parent and instruction first; for a build's first
        step, the same instruction on another base next; else same parent — or that the
        parent step missed. `extra(prefix)`: more earlier keys to compare with, (digest,
        record) whose parent reference (kind byte and id) starts with `prefix` (a
        registry cache's records)."""
        def children(table: CacheKeyTable, prefix: bytes) -> list[tuple[bytes, dict]]:
            out = self._children(table, prefix)
            if extra is not None:
                have = {d for d, _ in out}
                out += [(d, r) for d, r in extra(prefix) if d not in have]
            return out

        if isinstance(key, Mapping):
            digest, record = None, dict(key)
        else:
            digest = self._digest(key)
            record = key.record if isinstance(key, CacheKey) else None
        label = (f"step {_show(record['instruction'])}" if record is not None
                 else "step") + (f" (key {digest.hex()[:12]})" if digest else "")
        with self.store.read() as t:
            if digest is not None:
                raw = t.cachekeys.get(digest)
                if raw is not None:
                    layer = raw[:32]
                    if t.layers.has(layer):
                        return f"{label}: not a miss: cached as layer {layer.hex()[:12]}"
                    return (f"{label}: was cached as layer {layer.hex()[:12]}, which has been "
                            "removed")
            if record is None:
                return f"{label}: no record of this key (pass the CacheKey cache_key returned)"
            ref = _record_parent_ref(record)
            siblings = [(d, r) for d, r in children(t.cachekeys, ref) if d != digest]
            same = [s for s in siblings if s[1].get("instruction") == record["instruction"]]
            if same:
                best, _, diffs = self._closest(same, record)
                return (f"{label}: missed; the closest earlier key {best.hex()[:12]} (same "
                        f"parent and instruction) differs: {_listing(diffs)}")
            parent = record["parent"]
            if parent["kind"] != "key":
                # a first step: the same instruction on another base explains it better
                # than another instruction on this base (a build's other stages)
                others = [s for p in (PARENT_NONE, PARENT_LAYER)
                          for s in children(t.cachekeys, bytes([p]))
                          if s[1].get("instruction") == record["instruction"]
                          and s[0] != digest]
                base = (f"base layer {_short(parent['id'])}" if parent["kind"] == "layer"
                        else "no base layer")
                if others:
                    best, old, diffs = self._closest(others, record)
                    was = (f"base layer {_short(old['parent']['id'])}"
                           if old["parent"]["kind"] == "layer" else "no base layer")
                    return (f"{label}: missed; the closest earlier key {best.hex()[:12]} "
                            f"(same instruction) differs: {was} -> {base}"
                            + (f"; {_listing(diffs)}" if diffs else ""))
            if siblings:
                def similar(s):
                    return difflib.SequenceMatcher(
                        None, s[1].get("instruction", ""), record["instruction"]).ratio()
                top = max(similar(s) for s in siblings)
                best, _, diffs = self._closest(
                    [s for s in siblings if similar(s) == top], record)
                return (f"{label}: missed; the closest earlier key {best.hex()[:12]} (same "
                        f"parent) differs: {_listing(diffs)}")
            if parent["kind"] == "key":
                return (f"{label}: missed because the parent step missed: nothing is cached "
                        f"after parent key {_short(parent['id'])}, so every later step "
                        "misses too")
            base = (f"base layer {_short(parent['id'])}" if parent["kind"] == "layer"
                    else "no base layer")
            return f"{label}: missed; nothing was cached on {base} yet"

    @staticmethod
    def _closest(items: list[tuple[bytes, dict]],
                 record: Mapping) -> tuple[bytes, dict, list[str]]:
        """The earlier key with the fewest differences, the newest among equals: (its
        digest, its record, the differences)."""
        best = None
        for digest, rec in items:
            diffs = differences(rec, record)
            score = (len(diffs), -rec.get("created", 0.0))
            if best is None or score < best[0]:
                best = (score, digest, rec, diffs)
        assert best is not None
        return best[1], best[2], best[3]


def prune(store: Store) -> int:
    """Delete the cache keys whose layer is gone (and their index entries); the number
    of keys deleted. gc calls this with the store held exclusive."""
    with store.write() as t:
        return prune_in(t)


def prune_in(t: Tables) -> int:
    """`prune` in the transaction `t`."""
    dead = {k for k, v in t.cachekeys.items() if len(v) < 32 or not t.layers.has(v[:32])}
    t.cachekeys.delete(dead)
    return len(dead)
