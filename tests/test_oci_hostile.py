"""Hostile and broken archives: each refused with one line on stderr and exit 1,
nothing written outside the store, and no layer or tag left behind (the store passes
fsck afterwards). Import streams: a multi-GB layer is imported in bounded memory."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import sys
import tarfile
import tracemalloc
from pathlib import Path

import pytest
import zstandard

sys.path.insert(0, os.path.dirname(__file__))

from ocitar import DirM, Link, Reg, Sym, make_tar  # noqa: E402
from treeutil import File, build, run_cli  # noqa: E402

import pylayers  # noqa: E402
from pylayers.errors import PylayersError  # noqa: E402
from pylayers.oci import export_image, import_source  # noqa: E402


@pytest.fixture
def env(tmp_path):
    """(store path, base tag present) with a base layer tagged `base` holding a
    symlink to a directory outside, and an `outside` directory that must stay empty."""
    store = tmp_path / "store"
    outside = tmp_path / "outside"
    outside.mkdir()
    src = tmp_path / "src"
    build(src, [File("f", b"f")])
    os.symlink(outside, src / "out")
    os.symlink("../../..", src / "up")
    assert run_cli(store, "snapshot", src, "--tag", "base").returncode == 0
    return store, outside


def refused(env, source: bytes | str, *args: str, name: str = "layer.tar",
            expect: str = "", code: int = 8) -> str:
    """Refused with one line, exit status `code` (README "Exit codes": 8 damaged or
    unsafe data, 6 an unusable argument, 3 not found), nothing left behind."""
    store, outside = env
    if isinstance(source, bytes):
        path = store.parent / name
        path.write_bytes(source)
        source = str(path)
    before = layer_state(store)
    proc = run_cli(store, "import", source, "-t", "hostile", *args, text=True)
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("pylayers: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    assert expect in proc.stderr, proc.stderr
    assert layer_state(store) == before
    assert list(outside.iterdir()) == []
    fsck = run_cli(store, "fsck", text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    return proc.stderr


def layer_state(store: Path) -> tuple:
    with pylayers.Store.open(store, create=False) as st:
        layers = pylayers.Layers(st)
        return sorted(layers.all_ids()), sorted(layers.tags().items())


@pytest.mark.parametrize("members,expect", [
    ([Reg("../evil", data=b"x")], "climbs out"),
    ([DirM("a/"), Reg("a/../../evil", data=b"x")], "climbs out"),
    ([Link("h", target="../../etc/passwd")], "climbs out"),
    ([Link("h", target="/etc/passwd")], "not a file listed before it"),
    ([Link("h", target="later"), Reg("later", data=b"x")], "not a file listed before it"),
    ([DirM("d/"), Link("h", target="d")], "not a file listed before it"),
    ([Sym("s", target="/"), Link("h", target="s")], "not a file listed before it"),
    ([Sym("link", target="/"), Reg("link/evil", data=b"x")], "made a non-directory"),
    ([Reg("out/evil", data=b"x")], "through the symlink /out"),
    ([Reg("up/evil", data=b"x")], "through the symlink /up"),
    ([Reg("f/x", data=b"x")], "not a directory"),
    ([Reg("a", data=b"x"), Reg("a/b", data=b"x")], "made a non-directory"),
    ([Sym("", target="/")], "root"),
])
def test_hostile_paths_refused(env, members, expect):
    refused(env, make_tar(members), "--parent", "base", expect=expect)


def test_symlinks_are_kept_not_followed(env, tmp_path):
    """A symlink pointing anywhere is stored as a symlink; checkout makes the link and
    writes nothing through it."""
    store, outside = env
    (tmp_path / "l.tar").write_bytes(make_tar([Sym("abs", target=str(outside)),
                                               Sym("rel", target="../../../../..")]))
    assert run_cli(store, "import", tmp_path / "l.tar", "-t", "links").returncode == 0
    assert run_cli(store, "checkout", "links", tmp_path / "co").returncode == 0
    assert os.readlink(tmp_path / "co/abs") == str(outside)
    assert list(outside.iterdir()) == []


def good_tar() -> bytes:
    return make_tar([DirM("d/"), Reg("d/a", data=os.urandom(50_000) * 4),
                     Reg("d/b", data=b"b" * 10_000)])


@pytest.mark.parametrize("how", ["gzip", "zstd"])
def test_truncated_or_corrupt_compression_refused(env, how):
    """Truncation anywhere is refused; so is corruption that the format can detect
    (gzip's CRC, a zstd frame's checksum; a zstd frame without one and a raw block
    flipped decodes "fine", which only a digest catches: see test_wrong_digests)."""
    raw = good_tar()
    blob = gzip.compress(raw) if how == "gzip" else \
        zstandard.ZstdCompressor(write_checksum=True).compress(raw)
    refused(env, blob[:len(blob) // 2], expect="truncated")
    refused(env, blob[:-3], expect="")
    bad = bytearray(blob)
    for i in range(len(bad) // 3, len(bad) // 3 + 8):
        bad[i] ^= 0xFF
    refused(env, bytes(bad), expect="")


def test_truncated_tar_refused(env):
    raw = good_tar()
    refused(env, raw[:600], expect="truncated")  # inside d/a's data
    refused(env, raw[:1024 + 300], expect="")  # inside a header


def test_enormous_header_refused(env):
    blob = make_tar([Reg("a", data=b"x", pax={"comment": "y" * (2 << 20)})])
    refused(env, blob, expect="extended header")
    long = make_tar([Reg("n" * 100 + "/" + "m" * 3000, data=b"x")], fmt=tarfile.GNU_FORMAT)
    # a GNU long name of 3 KB is fine in size but its 3000-byte component is not
    refused(env, long, expect="255 bytes")


def test_decompression_bomb_refused(env):
    store, _ = env
    raw = make_tar([Reg("zeros", data=bytes(8 << 20))])
    blob = zstandard.ZstdCompressor(level=19).compress(raw)
    assert len(blob) < 2000
    err = refused(env, blob, "--max-layer-size", "1M", expect="--max-layer-size", code=6)
    assert "1048576 bytes" in err
    # trailing zeros after the tar's end count too
    refused(env, gzip.compress(make_tar([Reg("a", data=b"a")]) + bytes(4 << 20)),
            "--max-layer-size", "2M", expect="--max-layer-size", code=6)


def image(tmp_path: Path, store: Path) -> Path:
    src = tmp_path / "isrc"
    build(src, [File("a", b"a" * 5000), File("b", b"b")])
    with pylayers.Store.open(tmp_path / "istore") as st:
        layers = pylayers.Layers(st)
        lid = layers.snapshot(src).layer_id
        export_image(layers, lid, f"oci:{tmp_path / 'img'}", "gzip")
    return tmp_path / "img"


def blobs_of(img: Path) -> tuple[dict, dict, Path]:
    index = json.loads((img / "index.json").read_text())
    mpath = img / "blobs/sha256" / index["manifests"][0]["digest"][7:]
    manifest = json.loads(mpath.read_bytes())
    return index, manifest, mpath


def test_wrong_digests_refused(env, tmp_path):
    store, _ = env
    img = image(tmp_path, store)
    _index, manifest, _ = blobs_of(img)
    layer = img / "blobs/sha256" / manifest["layers"][0]["digest"][7:]
    good = layer.read_bytes()
    bad = bytearray(good)
    bad[-9] ^= 1  # inside the gzip trailer's CRC: still a gzip stream, wrong digest
    layer.write_bytes(bytes(bad))
    refused(env, f"oci:{img}", expect="")
    layer.write_bytes(good + b"\0")
    refused(env, f"oci:{img}", expect="larger than its descriptor")
    layer.unlink()
    refused(env, f"oci:{img}", expect="missing", code=3)
    layer.write_bytes(good)
    # a config whose diffID does not match the layer: change it and re-address it
    cpath = img / "blobs/sha256" / manifest["config"]["digest"][7:]
    cfg = json.loads(cpath.read_bytes())
    cfg["rootfs"]["diff_ids"] = ["sha256:" + "0" * 64]
    data = json.dumps(cfg).encode()
    digest = hashlib.sha256(data).hexdigest()
    (img / "blobs/sha256" / digest).write_bytes(data)
    manifest["config"].update(digest="sha256:" + digest, size=len(data))
    mdata = json.dumps(manifest).encode()
    mdigest = hashlib.sha256(mdata).hexdigest()
    (img / "blobs/sha256" / mdigest).write_bytes(mdata)
    (img / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": manifest["mediaType"], "digest": "sha256:" + mdigest,
         "size": len(mdata)}]}))
    refused(env, f"oci:{img}", expect="does not match its digest sha256:000")
    # the manifest blob itself altered after it was addressed
    mpath = img / "blobs/sha256" / mdigest
    mpath.write_bytes(mdata.replace(b'"schemaVersion": 2', b'"schemaVersion": 3'))
    refused(env, f"oci:{img}", expect="")


def test_docker_archive_wrong_digests_refused(env, tmp_path):
    store, _ = env
    src = tmp_path / "isrc"
    build(src, [File("a", b"a" * 5000)])
    with pylayers.Store.open(tmp_path / "istore") as st:
        layers = pylayers.Layers(st)
        lid = layers.snapshot(src).layer_id
        export_image(layers, lid, f"docker-archive:{tmp_path / 'img.tar'}", "none")
    out = io.BytesIO()
    with tarfile.open(tmp_path / "img.tar") as tf, tarfile.open(fileobj=out, mode="w") as w:
        for m in tf.getmembers():
            data = tf.extractfile(m).read() if m.isfile() else None
            if data and m.name.startswith("blobs/") and b"a" * 5000 in data:
                data = data.replace(b"a" * 5000, b"b" + b"a" * 4999)
            w.addfile(m, io.BytesIO(data) if data is not None else None)
    (store.parent / "d.tar").write_bytes(out.getvalue())
    refused(env, f"docker-archive:{store.parent / 'd.tar'}", expect="does not match")


def test_failed_import_keeps_existing_tag(env, tmp_path):
    store, _ = env
    assert run_cli(store, "tag", "hostile", "base").returncode == 0
    refused(env, make_tar([Reg("../x", data=b"x")]))


def test_fuzz_never_crashes_reference(env):
    """The importer's contract on one input: a PylayersError or a layer."""
    store, _ = env
    with pylayers.Store.open(store, create=False) as st:
        with pytest.raises(PylayersError):
            import_source(pylayers.Layers(st), str(store.parent / "nonexistent.tar"))


class _ZeroLayer(io.RawIOBase):
    """A layer tar generated on the fly: one file of `size` zero bytes."""

    def __init__(self, size: int) -> None:
        info = tarfile.TarInfo("big")
        info.size = size
        self.parts = [info.tobuf(tarfile.PAX_FORMAT)]
        self.zeros = size + (-size % 512) + 1024
        self.produced = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.parts:
            head = self.parts.pop()
            b[:len(head)] = head
            return len(head)
        n = min(len(b), self.zeros)
        b[:n] = bytes(n) if n < (1 << 20) else _ZERO_MB[:n]
        self.zeros -= n
        return n


_ZERO_MB = bytes(4 << 20)


def test_multi_gb_layer_in_bounded_memory(tmp_path, monkeypatch):
    """A 3 GiB layer streams through: peak Python allocations stay under 64 MiB."""
    size = 3 << 30
    fifo = tmp_path / "layer.tar"
    os.mkfifo(fifo)
    import threading

    def feed() -> None:
        with open(fifo, "wb") as out:
            src = _ZeroLayer(size)
            buf = bytearray(4 << 20)
            while n := src.readinto(memoryview(buf)):
                out.write(buf[:n])

    t = threading.Thread(target=feed)
    t.start()
    with pylayers.Store.open(tmp_path / "store") as st:
        layers = pylayers.Layers(st)
        tracemalloc.start()
        try:
            res = import_source(layers, str(fifo))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            t.join()
        (e,) = [e for e in layers.entries(res.top) if e.path == b"big"]
        assert e.size == size
    assert peak < 64 << 20, f"peak {peak >> 20} MiB"
