"""Fuzzing the importer: valid layer archives (plain, gzip, zstd; whiteouts, opaque
markers, hardlinks, PAX xattrs and long names, GNU long names, devices) mutated by
hypothesis (bytes flipped, cut, inserted, header fields overwritten) and imported onto
a parent. The contract: a PylayersError, or a layer whose tree is valid and checks
out; never another exception, never a write outside the checkout."""

from __future__ import annotations

import gzip
import os
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))

from ocitar import Dev, DirM, Fifo, Link, Reg, Sym, make_tar  # noqa: E402
from treeutil import Dir, File, build  # noqa: E402

import pylayers  # noqa: E402
from pylayers.errors import PylayersError  # noqa: E402
from pylayers.oci import import_source  # noqa: E402

SEEDS = [
    make_tar([DirM("./"), DirM("d/"), Reg("d/.wh..wh..opq"), Reg("d/a", data=b"a" * 700),
              Link("d/h", target="d/a"), Sym("s", target="../x"), Reg(".wh.f"),
              Reg("x", data=b"xx", pax={"SCHILY.xattr.user.k": "v\udcff"}),
              Reg("L" * 150, data=b"long")]),
    make_tar([DirM("d/"), Reg("d/" + "n" * 120, data=os.urandom(3000)),
              Link("h", target="d/" + "n" * 120), Fifo("p"), Dev("c")],
             fmt=tarfile.GNU_FORMAT),
    make_tar([Reg("a", data=b"1"), Reg("a", data=b"2"), DirM("a/"), Reg("a/b", data=b"3"),
              Reg("a", data=b"4")], fmt=tarfile.USTAR_FORMAT),
]
SEEDS += [gzip.compress(SEEDS[0]), zstandard.ZstdCompressor().compress(SEEDS[1]),
          zstandard.ZstdCompressor(write_checksum=True).compress(SEEDS[2])]


@pytest.fixture(scope="module")
def world():
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        src = root / "src"
        build(src, [File("f", b"f"), Dir("d"), File("d/old", b"o")])
        os.symlink("/", src / "up")
        with pylayers.Store.open(root / "store") as store:
            layers = pylayers.Layers(store)
            base = layers.snapshot(src).layer_id
            yield root, layers, base


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 16), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("field"), st.integers(0, 1 << 16),
              st.sampled_from([b"99999999999", b"-1", b"\x80\xff\xff\xff\xff\xff\xff\xff",
                               b"../../../x", b"/", b"x" * 100, b"L", b"K", b"x", b"g",
                               b"S", b"7", b"1", b"2", b"3", b"4", b"5", b"6",
                               b"30 path=../../../../x\n", b"99999999 "])),
)


def fix_checksums(b: bytearray) -> None:
    """Make every block that looks like a ustar header checksum right again, so that
    mutations reach the parsing past the checksum."""
    for off in range(0, len(b) - 511, 512):
        if b[off + 257:off + 262] == b"ustar":
            b[off + 148:off + 156] = b" " * 8
            b[off + 148:off + 156] = b"%06o\0 " % sum(b[off:off + 512])


def mutate(blob: bytes, muts: list, fix: bool = False) -> bytes:
    b = bytearray(blob)
    for kind, pos, arg in muts:
        if not b:
            break
        pos %= len(b)
        if kind == "flip":
            b[pos] ^= arg
        elif kind == "cut":
            del b[pos:]
        elif kind == "insert":
            b[pos:pos] = arg
        else:
            b[pos:pos + len(arg)] = arg
    if fix:
        fix_checksums(b)
    return bytes(b)


@settings(max_examples=int(os.environ.get("OCI_FUZZ_EXAMPLES", "1000")), deadline=None,
          derandomize="OCI_FUZZ_EXAMPLES" not in os.environ,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seed=st.sampled_from(range(len(SEEDS))), muts=st.lists(mutation, min_size=1, max_size=4),
       on_parent=st.booleans(), fix=st.booleans())
def test_mutated_archives(world, seed, muts, on_parent, fix):
    root, layers, base = world
    path = root / "fuzz.tar"
    path.write_bytes(mutate(SEEDS[seed], muts, fix))
    try:
        res = import_source(layers, str(path), parent=base if on_parent else None,
                            max_layer_size=1 << 24)
    except PylayersError:
        return
    tree = layers.tree(res.top)
    assert tree[0].path == b""
    out = Path(tempfile.mkdtemp(dir=root))
    os.rmdir(out)
    layers.checkout(res.top, out)
    for dirpath, dirnames, filenames in os.walk(out):
        for name in dirnames + filenames:
            assert os.path.realpath(os.path.join(dirpath, name)).startswith(str(root)) or \
                os.path.islink(os.path.join(dirpath, name))


def test_seeds_import(world):
    """Every seed imports as it is (so mutations start from valid archives)."""
    root, layers, base = world
    for i, seed in enumerate(SEEDS):
        (root / f"seed{i}").write_bytes(seed)
        import_source(layers, str(root / f"seed{i}"), parent=base)
