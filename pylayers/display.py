"""Text for people: messages that may hold file names, kept on one line."""

from __future__ import annotations

# C0 and C1 controls, DEL and the Unicode line separators: everything that would break
# a message's line or drive the terminal.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0))}
_ESCAPES.update({0x0a: "\\n", 0x0d: "\\r", 0x09: "\\t", 0x2028: "\\u2028",
                 0x2029: "\\u2029"})


def one_line(text: str) -> str:
    """`text` (a message that may hold file names) on one line: control characters
    escaped, and bytes of names that are not UTF-8 (surrogate escapes) as \\xNN."""
    text = text.translate(_ESCAPES)
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")
