"""containerd's filter syntax for List, on snapshot Infos: a filter is selectors joined
by "," (all must match); a list of filters matches if any one does. A selector is a
field path, alone (present and non-empty) or with `==`, `!=` or `~=` (a regular
expression) and a value, bare or in double quotes. Fields: name, parent, kind, and
labels.KEY (KEY bare or double-quoted)."""

from __future__ import annotations

import re
from collections.abc import Callable

from ..errors import InvalidArgument

_FIELD = r'(?:name|parent|kind|labels\.(?:"(?:[^"\\]|\\.)*"|[A-Za-z0-9_./\-]+))'
_VALUE = r'(?:"(?:[^"\\]|\\.)*"|[^,"]*)'
_SELECTOR = re.compile(rf"\s*(?P<field>{_FIELD})\s*(?:(?P<op>==|!=|~=)\s*(?P<value>{_VALUE}))?\s*")
_KINDS = {0: "unknown", 1: "view", 2: "active", 3: "committed"}

Matcher = Callable[[object], bool]


def _unquote(s: str) -> str:
    if len(s) >= 2 and s[0] == s[-1] == '"':
        return re.sub(r"\\(.)", r"\1", s[1:-1])
    return s


def _field(info, path: str) -> str | None:
    if path == "name":
        return info.name
    if path == "parent":
        return info.parent
    if path == "kind":
        return _KINDS.get(info.kind, "unknown")
    label = _unquote(path[len("labels."):])
    return info.labels[label] if label in info.labels else None


def _selector(field: str, op: str | None, value: str | None) -> Matcher:
    if op is None:
        return lambda info: bool(_field(info, field))
    value = _unquote(value.strip())
    if op == "==":
        return lambda info: _field(info, field) == value
    if op == "!=":
        return lambda info: _field(info, field) != value
    try:
        rx = re.compile(value)
    except re.error as err:
        raise InvalidArgument(f"filter: bad regular expression {value!r}: {err}") from None
    return lambda info: (v := _field(info, field)) is not None and rx.search(v) is not None


def parse_filter(text: str) -> Matcher:
    selectors = []
    pos = 0
    while True:
        m = _SELECTOR.match(text, pos)
        if m is None or m.end() == pos:
            raise InvalidArgument(f"filter {text!r}: cannot parse at offset {pos}")
        selectors.append(_selector(m["field"], m["op"], m["value"]))
        pos = m.end()
        if pos == len(text):
            break
        if text[pos] != ",":
            raise InvalidArgument(f"filter {text!r}: expected ',' at offset {pos}")
        pos += 1
    return lambda info: all(s(info) for s in selectors)


def parse_filters(filters: list[str]) -> Matcher | None:
    """A matcher for the filters (any one matching), or None for no filter at all."""
    filters = [f for f in filters if f.strip()]
    if not filters:
        return None
    matchers = [parse_filter(f) for f in filters]
    return lambda info: any(m(info) for m in matchers)
