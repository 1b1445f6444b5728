"""References to layers (REFs) and tag names.

A REF is a base followed by any number of ancestor steps. The base is looked up in
this order, the first match winning:

1. a tag of exactly that name (a tag may be all hex: `tag` accepted it, so it resolves);
2. a full layer id (64 hex digits);
3. a unique prefix of a layer id, of at least 6 hex digits (fewer: "too short";
   several layers: an error listing them).

Steps, applied left to right: `^` is the parent, `~N` the Nth ancestor (`~` alone is
`~1`), so `v2^^`, `v2~2` and `v2~1~1` all name v2's grandparent.

A tag name is 1 to 128 characters of letters, digits and `._:/@+-`, starting with a
letter, digit or `_`; `/` separates non-empty parts (no leading, trailing or double
`/`), and a name of 64 hex digits is refused: it would hide the layer whose id it is.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import InvalidArgument, NotFound, UsageError

if TYPE_CHECKING:
    from ..store.tables import Tables
    from .repo import Layers

TAG_MAX = 128
MIN_PREFIX = 6
_TAG_CHARS = re.compile(r"[A-Za-z0-9._:/@+-]*")
_STEP = re.compile(r"\^|~(\d*)")
_HEX = re.compile(r"[0-9a-fA-F]+")
_SHOWN = 8  # ambiguous prefix: candidates listed


def check_tag(name: str) -> None:
    """Raise UsageError saying what is wrong with the tag name `name`, if anything."""
    shown = repr(name) if len(name) <= 40 else repr(name[:20] + "..." + name[-10:])
    if not name:
        raise UsageError("a tag name must not be empty")
    if len(name) > TAG_MAX:
        raise UsageError(f"tag name {shown} is {len(name)} characters; the limit is "
                         f"{TAG_MAX}")
    if not _TAG_CHARS.fullmatch(name):
        bad = next(c for c in name if not _TAG_CHARS.fullmatch(c))
        raise UsageError(f"invalid tag name {shown}: {bad!r} is not allowed (letters, "
                         "digits and ._:/@+- only)")
    if name.startswith("/") or name.endswith("/") or "//" in name:
        raise UsageError(f"invalid tag name {shown}: '/' must separate non-empty parts "
                         "(no leading, trailing or double '/')")
    if not (name[0].isalnum() or name[0] == "_"):
        raise UsageError(f"invalid tag name {shown}: it must start with a letter, a digit "
                         "or '_'")
    if len(name) == 64 and _HEX.fullmatch(name):
        raise UsageError(f"invalid tag name {shown}: 64 hex digits would hide the layer of "
                         "that id")


def parse_ref(ref: str) -> tuple[str, int]:
    """(base, ancestor steps) of a REF; UsageError if it is malformed."""
    i = min((p for p in (ref.find("^"), ref.find("~")) if p >= 0), default=len(ref))
    base, rest = ref[:i], ref[i:]
    if not base:
        raise UsageError(f"invalid reference {ref!r}: it names no layer or tag")
    steps = 0
    pos = 0
    while pos < len(rest):
        m = _STEP.match(rest, pos)
        if m is None:
            raise UsageError(f"invalid reference {ref!r}: after a tag or id only ^ and ~N "
                             "may follow")
        steps += 1 if m.group(0) == "^" else int(m.group(1) or 1)
        pos = m.end()
    return base, steps


def resolve_in(t: Tables, ref: str, parent_of: Callable[[bytes], bytes | None]) -> bytes:
    """The layer id `ref` names (see the module's text for the rules), read in the
    transaction `t`; `parent_of(layer_id)` gives a layer's parent."""
    base, steps = parse_ref(ref)
    layer_id = _resolve_base(t, base)
    for i in range(steps):
        parent = parent_of(layer_id)
        if parent is None:
            raise NotFound(f"{ref}: {base} has only {i} ancestors")
        layer_id = parent
    return layer_id


def _resolve_base(t: Tables, base: str) -> bytes:
    tagged = t.tags.get(base)
    if tagged is not None:
        return tagged
    if not _HEX.fullmatch(base):
        raise NotFound(f"no tag named {base!r}")
    if len(base) == 64:
        lid = bytes.fromhex(base)
        if t.layers.has(lid):
            return lid
        raise NotFound(f"layer {base} not found")
    if len(base) > 64:
        raise NotFound(f"no tag named {base!r} (and a layer id is 64 hex digits)")
    if len(base) < MIN_PREFIX:
        raise InvalidArgument(f"{base!r} is too short for a layer id prefix (at least "
                              f"{MIN_PREFIX} hex digits) and no tag has that name")
    hits = t.layers.with_hex_prefix(base.lower(), limit=_SHOWN + 1)
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise NotFound(f"no layer or tag named {base!r}")
    names: dict[bytes, list[str]] = {}
    for name, lid in t.tags.items():
        names.setdefault(lid, []).append(name)
    listed = ", ".join(lid.hex()[:16] + (f" ({','.join(sorted(names[lid]))})"
                                         if lid in names else "")
                       for lid in hits[:_SHOWN])
    count = f"{len(hits)} layers match" if len(hits) <= _SHOWN else \
        f"more than {_SHOWN} layers match, among them"
    raise InvalidArgument(f"layer id prefix {base} is ambiguous: {count}: {listed}; "
                          "give more digits")


def remove_refs(layers: Layers, refs: list[str]) -> list[tuple[str, str, bytes]]:
    """Remove each REF: a tag of that name, else the layer it names (refused while a
    tag, a child layer or a snapshot references it). Every REF is resolved first, so a
    typo removes nothing; tags go first, then layers, descendants before ancestors, so
    `rm parent child` works as well as `rm child parent`. Returns (kind, ref, layer id)
    per removal, in order."""
    tags = layers.tags()
    named_tags = [r for r in refs if r in tags]
    targets = {r: layers.resolve(r) for r in refs if r not in tags}
    depth = {lid: len(layers.chain(lid)) for lid in set(targets.values())}
    done: list[tuple[str, str, bytes]] = []
    for ref in dict.fromkeys(named_tags):
        kind, lid = layers.remove(ref)
        done.append((kind, ref, lid))
    seen: set[bytes] = set()
    for ref, lid in sorted(targets.items(), key=lambda kv: -depth[kv[1]]):
        if lid in seen:
            continue
        seen.add(lid)
        kind, lid = layers.remove(lid.hex())
        done.append((kind, ref, lid))
    return done


__all__ = ["MIN_PREFIX", "TAG_MAX", "check_tag", "parse_ref", "remove_refs", "resolve_in"]
