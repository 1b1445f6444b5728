"""The manifest codec is the safety boundary (docs/format.md, "Manifest" and "Threat
model"): `decode_manifest` refuses every manifest the format does not allow, with a
one-line CorruptData (UnsafePath for a path that could escape), and `encode_manifest`
refuses to write one, so each tree has exactly one encoding and one id. Valid
manifests keep their bytes (a golden id computed before the codec grew its checks).

Hostile bytes are made by tests/hostile.py's hand encoder, never by the code under
test. The hypothesis tests feed the decoder generated, mutated and hostile manifests:
it must answer CorruptData or a tree, and a real checkout of whatever tree it and
`validate_tree` accept never writes outside its destination.
"""

from __future__ import annotations

import os
import shutil
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import blake3
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))

from hostile import raw_entry, raw_manifest  # noqa: E402

from pylayers.errors import (  # noqa: E402
    CorruptData,
    InvalidArgument,
    PylayersError,
    UnsafePath,
    short_path,
)
from pylayers.layers.checkout import checkout_tree  # noqa: E402
from pylayers.layers.manifest import (  # noqa: E402
    BLK,
    CHR,
    DIR,
    FIFO,
    HARDLINK,
    INLINE_MAX,
    OPAQUE,
    REG,
    SYMLINK,
    WHITEOUT,
    Entry,
    ManifestEncoder,
    decode_manifest,
    encode_manifest,
    pack_chunks,
    sort_key,
)
from pylayers.layers.tree import apply_layer, validate_tree  # noqa: E402
from pylayers.store.readahead import read_ahead  # noqa: E402
from pylayers.store.repository import Store  # noqa: E402

T = 1_600_000_000_123_456_789
PARENT = b"\x99" * 32
# blake3 of encode_manifest(PARENT, valid()) as store format 6 (PLYRMAN2, small files
# inline) first wrote it: valid manifests keep their bytes, so layer ids stay.
GOLDEN_ID = "cc28e70f25dda0c64ad552156a60ab5b7e35f66bc122aaed4dd0efb48aba24a5"


def small(path: bytes, data: bytes, *args, **kw) -> Entry:
    """A file of at most INLINE_MAX bytes: its content is in the entry."""
    e = Entry(path, REG, *args, **kw)
    e.set_inline(data)
    return e


def valid() -> list[Entry]:
    """Every kind and field a manifest holds, each at an awkward value."""
    es = [
        Entry(b"", DIR, 0o755, 0, 0, T, xattrs=((b"trusted.x", b"1"), (b"user.a", b"\x00\xff"))),
        Entry(b"d", DIR, 0o1777, 1, 2, T, flags=OPAQUE),
        Entry(b"d/f", REG, 0o4755, 1000, 1000, T, 5000, b"\x33" * 32,
              pack_chunks([(b"\x11" * 32, 2000), (b"\x22" * 32, 3000)]),
              xattrs=((b"security.capability", b"\x01\x00\x00\x02"),)),
        Entry(b"d/g", HARDLINK, 0o4755, 1000, 1000, T, target=b"d/f"),
        Entry(b"d/z", WHITEOUT),
        Entry(b"d.x", SYMLINK, 0o777, 0, 0, -T, target=b"../../etc/passwd"),
        Entry(b"dev", CHR, 0o600, rdev=(1, 3)),
        Entry(b"disk", BLK, 0o660, 0, 6, rdev=(4095, 1048575)),
        small(b"empty", b"", 0o644),
        small(b"edge", b"x" * 1024, 0o600),  # INLINE_MAX bytes: inline; 1025: chunks
        Entry(b"edge2", REG, 0o600, 0, 0, 0, 1025, b"\x77" * 32,
              pack_chunks([(b"\x78" * 32, 1025)])),
        Entry(b"fifo", FIFO, 0o644, 65534, 65534),
        Entry(b"name\nwith\xffodd \xe2\x80\xa8", REG, 0o600, 2**32 - 2, 0, 0, 7000,
              b"\x44" * 32, pack_chunks([(b"\x55" * 32, 7000)])),
        small(b"small", b"hello\x00\xffworld\n", 0o640, 7, 8, T, xattrs=((b"user.k", b"v"),)),
    ]
    return sorted(es, key=lambda e: e.key)


def test_valid_manifest_keeps_its_bytes_and_round_trips() -> None:
    entries = valid()
    data = encode_manifest(PARENT, entries)
    assert data == raw_manifest(PARENT, entries)  # the format as docs/format.md spells it
    assert blake3.blake3(data).hexdigest() == GOLDEN_ID
    assert decode_manifest(data) == (PARENT, valid())
    assert decode_manifest(encode_manifest(None, entries))[0] is None


def test_the_streaming_encoder_is_the_encoder() -> None:
    """ManifestEncoder (a first snapshot's scan streams through it) gives the same bytes,
    and keeps each file's path and chunk list for the commit's check."""
    enc = ManifestEncoder(PARENT)
    for e in valid():
        enc.add(e)
    assert bytes(enc.finish()) == encode_manifest(PARENT, valid())
    files = [e for e in valid() if e.kind == REG]
    assert enc.count == len(valid()) and enc.file_bytes == sum(e.size for e in files)
    assert [enc.file_path(n) for n in range(len(files))] == [e.path for e in files]
    assert bytes(enc.file_chunks) == b"".join(e.chunks for e in files)
    assert list(enc.file_ends) == [len(b"".join(e.chunks for e in files[: n + 1]))
                                   for n in range(len(files))]
    # an entry refused leaves nothing behind it: what was encoded is still whole
    with pytest.raises(InvalidArgument):
        enc.add(Entry(b"zz", SYMLINK, 0o777, 0, 0, 0, target=b"x" * 70000))
    assert bytes(enc.finish()) == encode_manifest(PARENT, valid())


def at(entries: list[Entry], path: bytes) -> Entry:
    return next(e for e in entries if e.path == path)


def _edit(path: bytes, **fields) -> Callable[[list[Entry]], list[Entry]]:
    def edit(es: list[Entry]) -> list[Entry]:
        e = at(es, path)
        for k, v in fields.items():
            setattr(e, k, v)
        return es
    return edit


def _add(*new: Entry) -> Callable[[list[Entry]], list[Entry]]:
    return lambda es: sorted(es + list(new), key=lambda e: e.key)


def _file(path: bytes, **kw) -> Entry:
    return small(path, b"\x01", 0o644, **kw)


# Entry lists each rule refuses; the paths are re-sorted, so order is never the only
# fault unless the case is about order. (name, edit, unsafe path?)
REFUSED: list[tuple[str, Callable[[list[Entry]], list[Entry]], bool]] = [
    ("dotdot", _add(_file(b"../evil")), True),
    ("dotdot-inside", _add(_file(b"d/../../evil")), True),
    ("dotdot-last", _add(_file(b"d/..")), True),
    ("dot", _add(_file(b"./evil")), True),
    ("dot-inside", _add(_file(b"d/./evil")), True),
    ("absolute", _add(_file(b"/evil")), True),
    ("double-slash", _add(_file(b"d//evil")), True),
    ("trailing-slash", _add(_file(b"d/evil/")), True),
    ("nul", _add(_file(b"d/ev\x00il")), True),
    ("component-256", _add(_file(b"d/" + b"e" * 256)), True),
    ("path-max", _add(_file(b"/".join([b"p" * 200] * 21)[:4096])), True),
    ("hardlink-target-dotdot", _add(Entry(b"zz", HARDLINK, target=b"../OUT/victim")), True),
    ("hardlink-target-absolute", _add(Entry(b"zz", HARDLINK, target=b"/etc/passwd")), True),
    ("hardlink-target-empty", _add(Entry(b"zz", HARDLINK, target=b"")), True),
    ("hardlink-target-after", _edit(b"d/g", target=b"fifo"), False),
    ("hardlink-to-itself", _edit(b"d/g", target=b"d/g"), False),
    ("unsorted-xattrs", _edit(b"", xattrs=((b"user.a", b"2"), (b"trusted.x", b"1"))), False),
    ("duplicate-xattrs", _edit(b"", xattrs=((b"user.a", b"1"), (b"user.a", b"2"))), False),
    ("empty-xattr-name", _edit(b"", xattrs=((b"", b"1"),)), False),
    ("nul-in-xattr-name", _edit(b"", xattrs=((b"user.a\x00b", b"1"),)), False),
    ("long-xattr-name", _edit(b"", xattrs=((b"user." + b"a" * 251, b"1"),)), False),
    ("opaque-file", _edit(b"d/f", flags=OPAQUE), False),
    ("opaque-symlink", _edit(b"d.x", flags=OPAQUE), False),
    ("unknown-flag-on-dir", _edit(b"d", flags=2), False),
    ("size-on-dir", _edit(b"d", size=1), False),
    ("size-on-symlink", _edit(b"d.x", size=16), False),
    ("size-on-hardlink", _edit(b"d/g", size=5), False),
    ("size-on-device", _edit(b"dev", size=1), False),
    ("size-on-fifo", _edit(b"fifo", size=1), False),
    ("size-on-whiteout", _edit(b"d/z", size=1), False),
    ("metadata-on-whiteout", _edit(b"d/z", mode=0o644), False),
    ("xattrs-on-whiteout", _edit(b"d/z", xattrs=((b"user.a", b"1"),)), False),
    ("chunks-short-of-size", _edit(b"d/f", size=5001), False),
    ("chunks-past-size", _edit(b"d/f", size=4999), False),
    ("empty-chunk", _edit(b"d/f", size=5000, chunks=pack_chunks(
        [(b"\x11" * 32, 2000), (b"\x66" * 32, 0), (b"\x22" * 32, 3000)])), False),
    # a small file's bytes are as many as its size says: fewer or more misparse
    ("inline-data-short", _edit(b"small", data=b"hello"), False),
    ("inline-data-long", _edit(b"small", data=b"hello\x00\xffworld\n!"), False),
    # a file of 1025 bytes or more is chunks, never inline
    ("big-file-without-chunks", _edit(b"edge2", chunks=b""), False),
    ("type-bits-in-mode", _edit(b"d/f", mode=0o100755), False),
    ("owner-minus-one", _edit(b"fifo", uid=2**32 - 1), False),
    ("group-minus-one", _edit(b"fifo", gid=2**32 - 1), False),
    ("root-not-a-dir", lambda es: [_file(b"")] + es[1:], False),
    ("root-whiteout", lambda es: [Entry(b"", WHITEOUT)] + es[1:], False),
    ("empty-symlink-target", _edit(b"d.x", target=b""), False),
    ("nul-in-symlink-target", _edit(b"d.x", target=b"/etc\x00"), False),
    ("device-major", _edit(b"dev", rdev=(4096, 0)), False),
    ("device-minor", _edit(b"dev", rdev=(0, 1 << 20)), False),
    ("unknown-kind", _edit(b"fifo", kind=9), False),
    ("kind-zero", _edit(b"fifo", kind=0), False),
]
UNSORTED: list[tuple[str, Callable[[list[Entry]], list[Entry]]]] = [
    ("unsorted-paths", lambda es: [es[0], es[2], es[1], *es[3:]]),
    ("duplicate-paths", lambda es: [*es, es[-1]]),
    # bytewise, "d.x" < "d/f"; in component order "d/f" comes first
    ("bytewise-not-component-order", lambda es: sorted(es, key=lambda e: e.path)),
]


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and len(text) < 300, text
    return text


@pytest.mark.parametrize("name,edit,unsafe", REFUSED, ids=[c[0] for c in REFUSED])
def test_decoder_refuses(name: str, edit, unsafe: bool) -> None:
    data = raw_manifest(PARENT, edit(valid()))
    with pytest.raises(UnsafePath if unsafe else CorruptData) as info:
        decode_manifest(data)
    one_line(info.value)


@pytest.mark.parametrize("name,edit", UNSORTED, ids=[c[0] for c in UNSORTED])
def test_decoder_refuses_any_other_order(name: str, edit) -> None:
    with pytest.raises(CorruptData) as info:
        decode_manifest(raw_manifest(PARENT, edit(valid())))
    assert "order" in one_line(info.value) or "repeats" in str(info.value)


@pytest.mark.parametrize("name,edit,unsafe", REFUSED + [(n, e, False) for n, e in UNSORTED],
                         ids=[c[0] for c in REFUSED + UNSORTED])
def test_encoder_refuses_the_same(name: str, edit, unsafe: bool) -> None:
    with pytest.raises(InvalidArgument) as info:
        encode_manifest(PARENT, edit(valid()))
    one_line(info.value)


def test_xattrs_in_either_order_never_give_two_ids() -> None:
    """Sorted, they encode; reversed, the encoder refuses (and the decoder would too):
    one tree, one encoding, one id."""
    xs = ((b"security.capability", b"\x01"), (b"trusted.a", b"2"), (b"user.a", b"3"))
    good = [Entry(b"", DIR, 0o755, xattrs=xs)]
    bad = [Entry(b"", DIR, 0o755, xattrs=tuple(reversed(xs)))]
    assert decode_manifest(encode_manifest(None, good))[1] == good
    with pytest.raises(InvalidArgument):
        encode_manifest(None, bad)
    with pytest.raises(CorruptData):
        decode_manifest(raw_manifest(None, bad))


@pytest.mark.parametrize("entry", [
    Entry(b"f", REG, 0o644),  # the default content=b"": not a 32-byte id
    Entry(b"f", REG, 0o644, content=b"\x01" * 31),
    Entry(b"f", REG, 0o644, content=b"\x01" * 32, chunks=b"\x02" * 35, size=0),
    # a small file held as chunks, or with a content id that is not its data's
    Entry(b"f", REG, 0o644, content=blake3.blake3(b"ab").digest(), size=2,
          chunks=pack_chunks([(blake3.blake3(b"ab").digest(), 2)])),
    Entry(b"f", REG, 0o644, content=blake3.blake3(b"ab").digest(), size=2, data=b"ac"),
    # a big file with inline data beside its chunks
    Entry(b"f", REG, 0o644, content=b"\x01" * 32, size=2000, data=b"x" * 2000,
          chunks=pack_chunks([(b"\x02" * 32, 2000)])),
    Entry(b"d", DIR, 0o755, data=b"x"),
    Entry(b"d", DIR, 0o755, content=b"\x01" * 32),
    Entry(b"d", DIR, 0o755, chunks=pack_chunks([(b"\x02" * 32, 1)])),
    Entry(b"f", FIFO, 0o644, target=b"x"),
    Entry(b"f", SYMLINK, 0o777, target=b"x", rdev=(1, 3)),
    Entry(b"f", CHR, 0o600, rdev=(1, 3), content=b"\x01" * 32),
    Entry(b"f", FIFO, 0o644, mtime_ns=1 << 63),  # out of the i64
    Entry(b"f", FIFO, 0o644, uid=-1),
], ids=lambda e: repr(e))
def test_encoder_refuses_fields_its_kind_cannot_hold(entry: Entry) -> None:
    """What the encoder would drop or could not write: refused, not silently lost."""
    with pytest.raises(InvalidArgument) as info:
        encode_manifest(None, [Entry(b"", DIR, 0o755), entry])
    one_line(info.value)


def test_encoder_refuses_a_stale_sort_key() -> None:
    e = _file(b"b")
    e.path = b"a"  # key still b"b"
    with pytest.raises(InvalidArgument):
        encode_manifest(None, [Entry(b"", DIR, 0o755), e])


@pytest.mark.parametrize("name,body", [
    # bytes after a kind that has no body: the next entry's header is read from them
    ("content-on-dir", raw_entry(Entry(b"a", DIR, 0o755)).replace(
        b"a\x00\x00", b"a" + b"\x01" * 32 + b"\x00\x00")),
    ("file-without-content-id", raw_entry(Entry(b"a", REG, 0o644, size=2000))),
    ("rdev-on-fifo", raw_entry(Entry(b"a", FIFO, 0o644))[:-2] + struct.pack("<II", 1, 3)
     + b"\x00\x00"),
    ("target-on-file-for-size", raw_entry(_file(b"a"))[:-2] + b"\x01\x00x\x00\x00"),
])
def test_fields_a_kind_does_not_have_do_not_decode(name: str, body: bytes) -> None:
    """The format has no place for them: written anyway, the bytes misparse and the
    decoder refuses the manifest (it never yields an entry carrying them)."""
    with pytest.raises(CorruptData) as info:
        decode_manifest(raw_manifest(None, [Entry(b"", DIR, 0o755), body]))
    one_line(info.value)


def test_every_truncation_and_every_extension_is_refused() -> None:
    data = encode_manifest(PARENT, valid())
    for n in range(len(data)):
        with pytest.raises(CorruptData):
            decode_manifest(data[:n])
    for tail in (b"\x00", b"\xff" * 7, data[44:80]):
        with pytest.raises(CorruptData) as info:
            decode_manifest(data + tail)
        assert "trailing" in one_line(info.value)


def test_every_single_byte_flip_is_refused_or_decodes_to_safe_entries() -> None:
    """Exhaustive over one manifest: each byte, each bit. No exception but CorruptData,
    and what decodes re-encodes to the very same bytes (one encoding)."""
    data = encode_manifest(PARENT, valid())
    decoded = 0
    for i in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            try:
                parent, entries = decode_manifest(bytes(flipped))
            except CorruptData as e:
                one_line(e)
                continue
            decoded += 1
            assert encode_manifest(parent, entries) == bytes(flipped)
    assert 0 < decoded < len(data) * 8  # mtimes, ids, owners flip harmlessly


def test_short_path_keeps_messages_short() -> None:
    long = b"/".join([b"x" * 250] * 40)
    text = short_path(long)
    assert len(text) <= 200 and " ... " in text
    assert text.startswith("xxx") and text.endswith("xxx")
    assert short_path(b"a/b") == "a/b"
    assert short_path(b"\xff") == os.fsdecode(b"\xff")


# -- tree-level rules --------------------------------------------------------------------

ROOT = Entry(b"", DIR, 0o755)
TREES = {
    "under-symlink": [ROOT, Entry(b"link", SYMLINK, 0o777, target=b"/etc"), _file(b"link/evil")],
    "under-file": [ROOT, _file(b"f"), _file(b"f/evil")],
    "under-hardlink": [ROOT, _file(b"a"), Entry(b"b", HARDLINK, 0o644, target=b"a"),
                       _file(b"b/evil")],
    "no-parent": [ROOT, _file(b"missing/evil")],
    "hardlink-to-symlink": [ROOT, Entry(b"l", SYMLINK, 0o777, target=b"/etc/passwd"),
                            Entry(b"z", HARDLINK, 0o644, target=b"l")],
    "hardlink-to-dir": [ROOT, Entry(b"d", DIR, 0o755), Entry(b"z", HARDLINK, 0o644, target=b"d")],
    "hardlink-to-nothing": [ROOT, Entry(b"z", HARDLINK, 0o644, target=b"a")],
    "no-root": [_file(b"evil")],
}


@pytest.mark.parametrize("name", sorted(TREES))
def test_tree_rules_are_validate_trees(name: str) -> None:
    """Each entry decodes (the codec checks entries); the tree is refused."""
    entries = decode_manifest(raw_manifest(None, TREES[name]))[1]
    with pytest.raises(UnsafePath) as info:
        validate_tree(apply_layer([], entries), entries, "layer 0123456789ab")
    assert one_line(info.value).startswith("layer 0123456789ab: ")


def test_a_whiteout_under_a_non_directory_is_refused() -> None:
    """An overlayfs lower directory holds whiteouts too; one whose parent is not a
    directory of the layer's tree would have nowhere to go."""
    base = [ROOT, _file(b"f")]
    own = [Entry(b"f/gone", WHITEOUT)]
    with pytest.raises(UnsafePath):
        validate_tree(apply_layer(base, own), own)
    own = [Entry(b"missing/gone", WHITEOUT)]
    with pytest.raises(UnsafePath):
        validate_tree(apply_layer(base, own), own)
    validate_tree(apply_layer(base, [Entry(b"f", WHITEOUT)]), [Entry(b"f", WHITEOUT)])


# -- generated and mutated manifests, and a real checkout of what is accepted ------------

CONTENTS = [b"", b"hello\n", b"\x00" * 5000 + b"tail", os.urandom(3000)]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A real store holding CONTENTS, and a sandbox: SANDBOX/OUT (a sibling of the
    destinations, which hostile symlinks aim at) with one canary file."""
    root = tmp_path_factory.mktemp("codec")
    with Store.open(root / "store") as store:
        chunks = []
        with store.writer() as w:
            for data in CONTENTS:
                cid = blake3.blake3(data).digest()
                if len(data) <= INLINE_MAX:  # held in the entry
                    chunks.append((cid, b"", len(data), data))
                    continue
                w.put(cid, data)
                chunks.append((cid, pack_chunks([(cid, len(data))]), len(data), b""))
            w.commit()
        sandbox = root / "sandbox"
        (sandbox / "OUT").mkdir(parents=True)
        (sandbox / "OUT" / "canary").write_bytes(b"canary")
        yield store, chunks, sandbox


# one name in thirty is hostile outright: such a manifest must not decode
NAMES = st.sampled_from([b"a", b"b", b"c"] * 50 + [b"..", b".", b"", b"n" * 256, b"x\x00y"])
TARGETS = st.sampled_from([b"..", b"../..", b"../../OUT", b"@OUT", b"a", b"", b"x\x00"])


def entry_strategy(chunks) -> st.SearchStrategy[Entry]:
    """Mostly entries a scan could make, with names and targets that aim outside."""
    paths = st.lists(NAMES, min_size=1, max_size=3).map(b"/".join)
    targets = st.one_of(TARGETS, paths)
    xattrs = st.lists(st.tuples(st.sampled_from([b"user.a", b"user.b", b"trusted.c", b"bogus",
                                                 b"security.capability"]),
                                st.sampled_from([b"", b"1", b"\x01\x00\x00\x02"])),
                      max_size=2).map(lambda xs: tuple(sorted(dict(xs).items())))

    @st.composite
    def entry(draw) -> Entry:
        kind = draw(st.sampled_from([REG, REG, DIR, DIR, DIR, SYMLINK, SYMLINK, HARDLINK,
                                     CHR, FIFO, WHITEOUT]))
        e = Entry(draw(paths), kind, draw(st.sampled_from([0o755, 0o644, 0o4755, 0])),
                  draw(st.sampled_from([0, 1000])), 0, T, xattrs=draw(xattrs))
        if kind == REG:
            e.content, e.chunks, e.size, e.data = draw(st.sampled_from(chunks))
        elif kind in (SYMLINK, HARDLINK):
            e.target = draw(targets)
        elif kind == CHR:
            e.rdev = draw(st.sampled_from([(1, 3), (0, 0), (4095, 1048575)]))
        elif kind == DIR:
            e.flags = draw(st.sampled_from([0, 0, OPAQUE]))
        if kind == WHITEOUT:
            e.mode = e.uid = 0
            e.mtime_ns, e.xattrs = 0, ()
        return e

    return entry()


@st.composite
def manifests(draw, chunks, out: bytes) -> bytes:
    """A manifest of generated entries (often valid, often with a hostile path or a
    symlink to `out`, outside the destination), in component order, then maybe
    mutated: bytes flipped, cut, or spliced."""
    entries = draw(st.lists(entry_strategy(chunks), max_size=10))
    for e in entries:
        if e.target == b"@OUT":
            e.target = out
    if draw(st.sampled_from([True] * 9 + [False])):
        entries.append(Entry(b"", DIR, 0o755))
    if draw(st.sampled_from([True] * 9 + [False])):  # parents, unless a path holds them
        have = {e.path for e in entries}
        for e in list(entries):
            parts = e.path.split(b"/")
            for n in range(1, len(parts)):
                up = b"/".join(parts[:n])
                if up not in have:
                    have.add(up)
                    entries.append(Entry(up, DIR, 0o755))
    entries = sorted({e.path: e for e in entries}.values(), key=lambda e: sort_key(e.path))
    dirs = [e for e in entries if e.kind == DIR and e.path]
    if dirs and draw(st.booleans()):  # a directory becomes a symlink out, or a file
        e = draw(st.sampled_from(dirs))
        e.flags = 0
        if draw(st.booleans()):
            e.kind, e.target = SYMLINK, draw(st.sampled_from([b"..", b"../..", out]))
        else:
            e.kind, (e.content, e.chunks, e.size, e.data) = REG, draw(st.sampled_from(chunks))
    if entries and draw(st.sampled_from([False] * 19 + [True])):  # a repeated path
        entries.append(entries[-1])
    data = raw_manifest(None, entries)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        how = draw(st.sampled_from(["flip", "cut", "splice"]))
        i = draw(st.integers(0, len(data)))
        if how == "flip" and i < len(data):
            data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
        elif how == "cut":
            data = data[:i]
        elif how == "splice":
            j = draw(st.integers(0, len(data)))
            k = draw(st.integers(0, len(data)))
            data = data[:k] + data[min(i, j):max(i, j)] + data[k:]
    return data


def listing(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st_ = os.lstat(p)
            out[os.path.relpath(p, root)] = (st_.st_mode, st_.st_size, st_.st_mtime_ns)
    return out


@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_decoder_and_checkout_never_escape(pool, data) -> None:
    store, chunks, sandbox = pool
    manifest = data.draw(manifests(chunks, os.fsencode(sandbox / "OUT")))
    try:
        _parent, entries = decode_manifest(manifest)
    except CorruptData as e:
        one_line(e)
        event("refused by the decoder")
        return
    # accepted: it re-encodes to itself, and its tree is written or refused cleanly
    assert encode_manifest(_parent, entries) == manifest
    tree = apply_layer([], entries)
    try:
        validate_tree(tree, entries)
    except UnsafePath as e:
        one_line(e)
        event("refused by validate_tree")
        return
    event("checked out")
    before = listing(sandbox)
    dest = sandbox / "dest"
    try:
        checkout_tree(tree, dest, lambda chunks: read_ahead(store, (c for c, _ in chunks)))
    except PylayersError as e:  # an xattr the kernel refuses, a chunk the store lacks...
        one_line(e)
    finally:
        after = listing(sandbox)
        if dest.exists():
            shutil.rmtree(dest)
    outside = {k: v for k, v in after.items() if k != "dest" and not k.startswith("dest/")}
    assert outside == before
    assert (sandbox / "OUT" / "canary").read_bytes() == b"canary"


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(st.builds(
    Entry, st.sampled_from([b"a", b"b", b"a/b", b"a/c", b"b/a"]),
    st.sampled_from([DIR, SYMLINK, FIFO, WHITEOUT, HARDLINK]),
    st.sampled_from([0, 0o755]), target=st.sampled_from([b"", b"a", b"x"])), max_size=6))
def test_encode_accepts_exactly_what_decode_accepts(entries) -> None:
    """On the same entries, encode refuses (InvalidArgument) exactly when decode of
    their hand-encoded bytes refuses (CorruptData), and agrees on the result."""
    entries.sort(key=lambda e: e.key)
    for e in entries:
        if e.kind not in (SYMLINK, HARDLINK):
            e.target = b""  # a field the kind does not encode: the other test's
    try:
        decoded = decode_manifest(raw_manifest(None, entries))[1]
    except CorruptData:
        with pytest.raises(InvalidArgument):
            encode_manifest(None, entries)
        return
    assert decoded == entries
    assert encode_manifest(None, entries) == raw_manifest(None, entries)


def test_xattr_names_that_are_not_utf8_snapshot_in_bytewise_order(tmp_path: Path) -> None:
    """A scan sorts xattr names as bytes, the order the codec requires: b"user.\\x80"
    before b"user.\\xc3\\xa9" ("é"), though as decoded strings "é" sorts first."""
    src = tmp_path / "src"
    src.mkdir()
    f = os.fsencode(src / "f")
    Path(os.fsdecode(f)).write_bytes(b"x")
    try:
        os.setxattr(f, b"user.\xc3\xa9", b"2")
        os.setxattr(f, b"user.\x80", b"1")
    except OSError as e:
        pytest.skip(f"user xattrs not supported here: {e.strerror}")
    with Store.open(tmp_path / "store") as store:
        from pylayers.layers.repo import Layers
        layers = Layers(store)
        lid = layers.snapshot(src).layer_id
        e = next(e for e in layers.tree(lid) if e.path == b"f")
        assert e.xattrs == ((b"user.\x80", b"1"), (b"user.\xc3\xa9", b"2"))
        layers.checkout(lid, tmp_path / "out")
    out = os.fsencode(tmp_path / "out" / "f")
    assert os.getxattr(out, b"user.\x80") == b"1"
    assert os.getxattr(out, b"user.\xc3\xa9") == b"2"


def test_a_manifest_of_an_earlier_encoding_is_refused_by_name() -> None:
    """Store format 5's manifests (PLYRMAN1: every file as chunks) differ in bytes and
    id; one arriving from elsewhere (a chunk artifact an earlier pylayers pushed) is
    refused in one line that says so, not taken for garbage or misread."""
    data = b"PLYRMAN1" + encode_manifest(PARENT, valid())[8:]
    with pytest.raises(CorruptData, match="earlier pylayers' encoding") as info:
        decode_manifest(data)
    one_line(info.value)
    with pytest.raises(CorruptData, match="bad magic"):
        decode_manifest(b"PLYRMANX" + data[8:])


def test_inline_files_are_exactly_those_of_at_most_inline_max_bytes() -> None:
    """The size alone decides (one encoding): INLINE_MAX bytes are the entry's body,
    one byte more is chunks; a decoded small file's content id is its data's BLAKE3."""
    data = encode_manifest(None, [Entry(b"", DIR, 0o755), small(b"a", b"z" * INLINE_MAX)])
    assert data.endswith(b"a" + b"z" * INLINE_MAX + b"\x00\x00")
    (e,) = decode_manifest(data)[1][1:]
    assert e.inline and e.data == b"z" * INLINE_MAX and not e.chunks
    assert e.content == blake3.blake3(b"z" * INLINE_MAX).digest()
    big = Entry(b"a", REG, 0o644, size=INLINE_MAX + 1, content=b"\x01" * 32,
                chunks=pack_chunks([(b"\x02" * 32, INLINE_MAX + 1)]))
    assert not big.inline
    (e,) = decode_manifest(encode_manifest(None, [Entry(b"", DIR, 0o755), big]))[1][1:]
    assert e == big and e.data == b""
