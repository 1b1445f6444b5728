"""A chain's tree built from scanned manifests (`tree.chain_tree`, what `Layers.tree`
uses): only the last layer is decoded whole, the older ones are scanned
(`manifest.scan_manifest`) and only their entries that reach the tree are decoded.
It gives exactly what applying each layer's decoded entries oldest first gives
(`apply_layer`), on generated chains of whiteouts, opaque directories and
directories replaced by files and back; an entry that reaches the tree is decoded and
checked as ever; the scan refuses what the merge relies on (order, kinds, flags, a
NUL in a path, truncations).

Manifests are written by tests/hostile.py's hand encoder, never by the code under
test.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))

from hostile import raw_manifest, store_manifest  # noqa: E402

from pylayers.errors import CorruptData, UnsafePath  # noqa: E402
from pylayers.layers.manifest import (  # noqa: E402
    DIR,
    FIFO,
    OPAQUE,
    REG,
    SYMLINK,
    WHITEOUT,
    Entry,
    decode_manifest,
    pack_chunks,
    scan_manifest,
)
from pylayers.layers.repo import Layers  # noqa: E402
from pylayers.layers.tree import apply_layer, chain_tree  # noqa: E402
from pylayers.store import Store  # noqa: E402

PATHS = [b"a", b"a/b", b"a/b/c", b"a/b/c/d", b"a/x", b"a.b", b"b", b"b/a", b"b/a/z"]


OPAQUE_DIR = -1  # an opaque directory, for `_entry`


def _entry(path: bytes, kind: int, n: int) -> Entry:
    """An entry of `kind` (or OPAQUE_DIR) at `path`; `n` makes its fields differ from
    other layers'."""
    if kind == REG and n % 2:  # a small file, inline
        e = Entry(path, REG, 0o644, 0, 0, n)
        e.set_inline(b"v%d" % n)
        return e
    if kind == REG:  # a file of chunks
        return Entry(path, REG, 0o644, 0, 0, n, 5000, bytes([n % 256]) * 32,
                     pack_chunks([(bytes([n % 256]) * 32, 5000)]))
    if kind == SYMLINK:
        return Entry(path, SYMLINK, 0o777, 0, 0, n, target=b"t%d" % n)
    if kind == WHITEOUT:
        return Entry(path, WHITEOUT)
    if kind == OPAQUE_DIR:
        return Entry(path, DIR, 0o755, 0, 0, n, flags=OPAQUE)
    return Entry(path, kind, 0o755, 0, 0, n, xattrs=((b"user.n", b"%d" % n),) if n % 3 else ())


@st.composite
def chains(draw) -> list[bytes]:
    """2-5 manifests, each of entries at paths of PATHS (any kind at any path: their
    trees need not be valid, which `apply_layer` does not ask either)."""
    out = []
    for layer in range(draw(st.integers(2, 5))):
        picked = draw(st.dictionaries(
            st.sampled_from(PATHS),
            st.sampled_from([DIR, DIR, OPAQUE_DIR, REG, REG, SYMLINK, FIFO, WHITEOUT]),
            max_size=len(PATHS)))
        entries = [Entry(b"", DIR, 0o755, 0, 0, layer)] if draw(st.booleans()) or not layer \
            else []
        n = layer * 100
        for path, kind in picked.items():
            n += 1
            entries.append(_entry(path, kind, n))
        entries.sort(key=lambda e: e.key)
        out.append(raw_manifest(None, entries))
    return out


def _bottom_up(base: list[Entry], manifests: list[bytes]) -> tuple[list[Entry], list[Entry]]:
    tree, own = base, []
    for m in manifests:
        own = decode_manifest(m)[1]
        tree = apply_layer(tree, own)
    return tree, own


@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(manifests=chains(), cached=st.integers(0, 2))
def test_the_same_tree_as_applying_every_layer(manifests: list[bytes], cached: int) -> None:
    """And from a tree of the first layers already built (`Layers.tree` keeps the last
    one), the same again."""
    want = _bottom_up([], manifests)
    assert chain_tree([], manifests) == want
    cached = min(cached, len(manifests) - 1)
    base = _bottom_up([], manifests[:cached])[0]
    assert chain_tree(base, manifests[cached:]) == want


def test_only_entries_that_reach_the_tree_are_decoded() -> None:
    """An older layer's entry replaced by a newer one is not decoded (so a field only
    decoding refuses goes unseen there); one that reaches the tree is decoded and
    refused as ever."""
    bad = Entry(b"a/f", REG, 0o644, 0xFFFFFFFF, 0, 1)  # (uid_t)-1: refused when decoded
    bad.set_inline(b"old")
    good = Entry(b"a/f", REG, 0o644, 0, 0, 2)
    good.set_inline(b"new")
    root, a = Entry(b"", DIR, 0o755), Entry(b"a", DIR, 0o755)
    old = raw_manifest(None, [root, a, bad])
    with pytest.raises(CorruptData, match="owner"):
        decode_manifest(old)
    tree, own = chain_tree([], [old, raw_manifest(None, [good])])
    assert tree == [root, a, good] and own == [good]
    with pytest.raises(CorruptData, match="owner"):  # it reaches the tree
        chain_tree([], [old, raw_manifest(None, [Entry(b"b", DIR, 0o755)])])
    with pytest.raises(UnsafePath, match="'..'"):
        chain_tree([], [raw_manifest(None, [root, Entry(b"a/../b", DIR, 0o755)]),
                        raw_manifest(None, [a])])


def _valid() -> list[Entry]:
    f = Entry(b"d/f", REG, 0o600, 1, 2, 3, 2000, b"\x01" * 32, pack_chunks([(b"\x02" * 32, 2000)]),
              xattrs=((b"user.a", b"1"), (b"user.b", b"")))
    return [Entry(b"", DIR, 0o755), Entry(b"d", DIR, 0o755, flags=OPAQUE), f,
            Entry(b"d/l", SYMLINK, 0o777, target=b"f"), Entry(b"d/w", WHITEOUT)]


def test_the_scan_reads_what_the_decoder_reads() -> None:
    data = raw_manifest(None, _valid())
    scanned = scan_manifest(data, 7)
    assert [(k, kind, flags, tag) for k, kind, flags, tag, _at in scanned] == [
        (e.key, e.kind, e.flags, 7) for e in decode_manifest(data)[1]]


def test_every_truncation_and_extension_is_refused_by_the_scan() -> None:
    data = raw_manifest(None, _valid())
    for n in range(len(data)):
        with pytest.raises(CorruptData):
            scan_manifest(data[:n])
    with pytest.raises(CorruptData, match="trailing"):
        scan_manifest(data + b"\x00")


@pytest.mark.parametrize("entries,match", [
    ([Entry(b"", DIR), Entry(b"b", DIR), Entry(b"a", DIR)], "out of order"),
    ([Entry(b"", DIR), Entry(b"a", DIR), Entry(b"a", FIFO)], "out of order"),
    ([Entry(b"", DIR), Entry(b"a", 9)], "kind 9"),
    ([Entry(b"", DIR), Entry(b"a", FIFO, flags=OPAQUE)], "flags"),
    ([Entry(b"", DIR), Entry(b"a", DIR, flags=2)], "flags"),
], ids=["order", "repeat", "kind", "opaque-fifo", "flag-bit"])
def test_the_scan_refuses_what_the_merge_relies_on(entries, match: str) -> None:
    with pytest.raises(CorruptData, match=match):
        scan_manifest(raw_manifest(None, entries))


def test_the_scan_refuses_a_nul_in_a_path() -> None:
    """"a\\0b" would sort as "a/b" does."""
    with pytest.raises(UnsafePath, match="NUL"):
        scan_manifest(raw_manifest(None, [Entry(b"", DIR), Entry(b"a\x00b", DIR)]))


def test_layers_tree_of_a_stored_chain(tmp_path: Path) -> None:
    """Through `Layers.tree`: a file replaced in the second layer, a directory
    whited out in the third, each layer's tree as applying its chain gives."""
    with Store.open(tmp_path / "store") as s:
        root = Entry(b"", DIR, 0o755)
        ms = [raw_manifest(None, [root, Entry(b"a", DIR, 0o755), _entry(b"a/f", REG, 1),
                                  _entry(b"b", SYMLINK, 2)])]
        ids = [store_manifest(s, ms[0])]
        for entries in ([_entry(b"a/f", REG, 4), _entry(b"c", FIFO, 5)],
                        [Entry(b"a", WHITEOUT), _entry(b"b", REG, 6)]):
            ms.append(raw_manifest(ids[-1], entries))
            ids.append(store_manifest(s, ms[-1], ids[-1]))
        for n, lid in enumerate(ids):
            want = _bottom_up([], ms[: n + 1])[0]
            assert Layers(s).tree(lid) == want
        assert [e.path for e in Layers(s).tree(ids[-1])] == [b"", b"b", b"c"]
        layers = Layers(s)
        layers.tree(ids[1])  # kept: the next tree starts from it
        assert layers.tree(ids[2]) == _bottom_up([], ms)[0]
