"""Chunk-level transfer (issue 11; docs/format.md, "Chunk artifacts") through an OCI
image layout directory as the remote: the artifact's blobs and their determinism, a
pull of the next version fetching only the chunks the store lacks, the checked-out tree
equal to the source entry by entry, resuming, and the refusals of damaged or hostile
artifacts. The same against a real registry: tests/test_chunk_transfer_registry.py."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from treeutil import Dir, File, Hardlink, Symlink, assert_same_tree, build  # noqa: E402

import pylayers  # noqa: E402
from pylayers.errors import CorruptData, UnsafePath  # noqa: E402
from pylayers.layers.manifest import DIR, REG, Entry, encode_manifest  # noqa: E402
from pylayers.oci import export_image  # noqa: E402
from pylayers.oci.chunkartifact import (  # noqa: E402
    HEADER,
    INDEX_TYPE,
    MANIFEST_TYPE,
    PACK_TYPE,
    FrameRef,
    LayerIndex,
    artifact_tag,
    build_packs,
    decode_artifact,
    descriptor,
    encode_artifact,
    sha256_digest,
)
from pylayers.oci.chunkpull import coalesce, pull_chunk_artifact  # noqa: E402
from pylayers.oci.chunkpush import push_chunk_artifact  # noqa: E402
from pylayers.oci.chunkremote import LayoutRemote  # noqa: E402

T = 1_700_000_000_000_000_000


def source_specs(seed: int, files: int = 60) -> list:
    """A tree of text-like and random files, a few large, with links."""
    rng = random.Random(seed)
    words = b" ".join(rng.choice([b"alpha", b"beta", b"gamma", b"delta", b"%d" % i])
                      for i in range(20_000))
    specs: list = [Dir("", mode=0o755, mtime_ns=T), Dir("lib", mode=0o755, mtime_ns=T)]
    for i in range(files):
        n = rng.choice([300, 5000, 40_000, 200_000, 900_000])
        text = b"".join(words[o:o + 4096] for o in
                        (rng.randrange(len(words) - 4096) for _ in range(n // 4096 + 1)))
        content = text[:n] if i % 2 else rng.randbytes(n)
        specs.append(File(f"lib/m{i:03d}.py", content=content, mode=0o644, mtime_ns=T + i))
    specs += [Symlink("lib/link", target="m001.py"), Hardlink("lib/hard", "lib/m002.py")]
    return specs


def edit(root: Path, seed: int, count: int = 3) -> None:
    """A release: a few files edited in the middle, one added, one removed."""
    rng = random.Random(seed)
    names = sorted(p.name for p in (root / "lib").glob("m*.py"))
    for name in rng.sample(names, count):
        p = root / "lib" / name
        data = bytearray(p.read_bytes())
        at = len(data) // 2
        data[at:at + 16] = rng.randbytes(16)
        p.write_bytes(bytes(data))
        os.utime(p, ns=(T, T + 10**9 * seed))
    (root / "lib" / f"new{seed}.py").write_bytes(rng.randbytes(70_000))
    os.unlink(root / "lib" / names[-1])
    os.utime(root / "lib", ns=(T, T))


@pytest.fixture
def pusher(tmp_path):
    store = pylayers.Store.open(tmp_path / "pusher")
    yield pylayers.Layers(store)
    store.close()


@pytest.fixture
def puller(tmp_path):
    store = pylayers.Store.open(tmp_path / "puller")
    yield pylayers.Layers(store)
    store.close()


def push(layers, top: bytes, remote: LayoutRemote, name: str):
    """The standard image (export into the layout) and its chunk artifact."""
    res = export_image(layers, top, f"oci:{remote.root}:{name}")
    image = descriptor(MANIFEST_TYPE, res.manifest_digest,
                       len(remote.get_blob(res.manifest_digest, _size(remote, res))))
    return res.manifest_digest, push_chunk_artifact(layers, top, remote, image)


def _size(remote: LayoutRemote, res) -> int:
    return (remote.root / "blobs/sha256" / res.manifest_digest[7:]).stat().st_size


@pytest.fixture
def versions(tmp_path, pusher):
    """Two image versions (a base layer and an app layer each; v2 edits the app) pushed
    to a layout: (remote, [(digest, top, source dir)])."""
    remote = LayoutRemote(tmp_path / "remote")
    base_dir = tmp_path / "base"
    build(base_dir, source_specs(1, 30))
    base = pusher.snapshot(base_dir).layer_id
    src = tmp_path / "src"
    build(src, source_specs(2))
    out = []
    for v in (1, 2):
        if v == 2:
            edit(src, seed=v)
        top = pusher.snapshot(src, parent=base).layer_id
        digest, _res = push(pusher, top, remote, f"v{v}")
        out.append((digest, top, src if v == 2 else None))
    return remote, out


def test_pull_next_version_fetches_only_missing_chunks(tmp_path, versions, puller, pusher):
    remote, [(d1, top1, _), (d2, top2, src2)] = versions
    full = pull_chunk_artifact(puller, remote, d1, tag="app")
    assert full.top == top1 and full.layers_fetched == 2
    assert puller.resolve("app") == top1
    v2 = pull_chunk_artifact(puller, remote, d2, tag="app")
    assert v2.top == top2 and v2.layers_fetched == 1  # the base is not fetched again
    # the edits are a few chunks: far less than the full pull
    assert 0 < v2.bytes_received < full.bytes_received * 0.15
    assert v2.chunks_fetched < full.chunks_fetched * 0.15
    assert puller.resolve("app") == top2
    puller.checkout(top2, tmp_path / "out")
    assert_same_tree(src2, tmp_path / "out")
    # pulling again fetches nothing but the artifact manifest
    again = pull_chunk_artifact(puller, remote, d2)
    assert again.chunks_fetched == 0 and again.layers_fetched == 0


def test_push_is_deterministic_and_resends_nothing(tmp_path, versions, pusher):
    remote, [(d1, top1, _), (d2, top2, _)] = versions
    sent = remote.bytes_sent
    image = json.loads((remote.root / "blobs/sha256" / d2[7:]).read_bytes())
    size = (remote.root / "blobs/sha256" / d2[7:]).stat().st_size
    res = push_chunk_artifact(pusher, top2, remote, descriptor(MANIFEST_TYPE, d2, size))
    assert res.blobs_sent == 0 and res.blobs > 0
    assert remote.bytes_sent - sent == res.bytes_sent  # the artifact manifest only
    assert res.bytes_sent < 64 << 10
    assert image["layers"]  # the standard image is untouched beside it
    # v2 shares the base layer's blobs with v1
    a1 = decode_artifact(remote.get_manifest(artifact_tag(d1))[1], d1)
    a2 = decode_artifact(remote.get_manifest(artifact_tag(d2))[1], d2)
    assert a1.layers[0] == a2.layers[0]
    assert set(a1.blobs) & set(a2.blobs)


def test_pack_cache_gives_the_same_artifact(tmp_path, versions, pusher):
    """A re-push takes packs from STORE/registry/chunk-packs (nothing read or
    compressed); with the cache deleted, or an entry damaged, the artifact is the
    same."""
    remote, [_v1, (d2, top2, _)] = versions
    cache = pusher.store.path / "registry" / "chunk-packs"
    entries = sorted(cache.glob("*/*"))
    assert entries
    size = (remote.root / "blobs/sha256" / d2[7:]).stat().st_size
    image = descriptor(MANIFEST_TYPE, d2, size)
    first = push_chunk_artifact(pusher, top2, remote, image).digest
    entries[0].write_bytes(entries[0].read_bytes()[:-1])
    assert push_chunk_artifact(pusher, top2, remote, image).digest == first
    shutil.rmtree(cache)
    res = push_chunk_artifact(pusher, top2, remote, image)
    assert res.digest == first and res.blobs_sent == 0
    assert sorted(cache.glob("*/*"))


def test_packs_cut_by_content_survive_an_edit():
    """One chunk changed in the middle of a layer: the packs before it and, once the
    cuts resync, after it are byte-identical (the registry has them already)."""
    rng = random.Random(5)
    chunks = [rng.randbytes(8192) for _ in range(3000)]

    def packs(seq):
        from pylayers.store.ingest import chunk_id

        pairs = [(chunk_id(c), c) for c in seq]
        return [p.digest for p in build_packs(pairs[:1], pairs[1:], level=1)]

    a = packs(chunks)
    chunks[1500] = rng.randbytes(8192)
    b = packs(chunks)
    assert len(a) >= 4
    assert len(set(a) - set(b)) <= 2 and len(set(b) - set(a)) <= 2
    assert packs(chunks) == b  # deterministic


def test_no_artifact_returns_none(tmp_path, pusher, puller):
    remote = LayoutRemote(tmp_path / "remote")
    src = tmp_path / "src"
    build(src, source_specs(3, 5))
    top = pusher.snapshot(src).layer_id
    res = export_image(pusher, top, f"oci:{remote.root}:plain")
    assert pull_chunk_artifact(puller, remote, res.manifest_digest) is None


def _damage_chunk(remote: LayoutRemote, digest: str, which: int) -> bytes:
    """Flip a byte inside the `which`-th frame of the top layer's packs; its chunk id."""
    art = decode_artifact(remote.get_manifest(artifact_tag(digest))[1], digest)
    top = art.layers[-1]
    idx = LayerIndex.decode(remote.get_blob(top.index_digest, top.index_size))
    f = idx.frames[which]
    path = remote.root / "blobs/sha256" / idx.packs[f.pack][0][7:]
    data = bytearray(path.read_bytes())
    data[f.offset + f.stored_len // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return f.chunk


def test_corrupt_chunk_refused_nothing_half_written_then_resumes(tmp_path, versions, puller):
    remote, [(d1, top1, _), _v2] = versions
    _damage_chunk(remote, d1, -1)  # the last frame: the others are fetched first
    with pytest.raises(CorruptData) as e:
        pull_chunk_artifact(puller, remote, d1, tag="app")
    assert "does not match its id" in str(e.value) or "decompress" in str(e.value)
    assert "\n" not in str(e.value)
    assert puller.all_ids() == [] and puller.tags() == {}
    # chunks verified before the damaged one were kept: the next pull does not fetch
    # them again (restore the blob as a repaired registry would)
    stored = puller.store.chunk_count()
    assert stored > 0
    _damage_chunk(remote, d1, -1)  # flips the byte back
    res = pull_chunk_artifact(puller, remote, d1, tag="app")
    assert res.top == top1
    total = sum(1 for _ in puller.store.iter_chunk_locations())
    assert res.chunks_fetched < total


def test_artifact_of_another_image_refused(versions):
    remote, [(d1, _t1, _), (d2, _t2, _)] = versions
    data = remote.get_manifest(artifact_tag(d1))[1]
    with pytest.raises(CorruptData):
        decode_artifact(data, d2)
    doc = json.loads(data)
    doc["annotations"]["dev.pylayers.chunks.version"] = "2"
    with pytest.raises(CorruptData, match="version"):
        decode_artifact(json.dumps(doc).encode(), d1)


def test_layer_index_decoder_is_strict(versions):
    remote, [(d1, _t1, _), _v2] = versions
    art = decode_artifact(remote.get_manifest(artifact_tag(d1))[1], d1)
    good = remote.get_blob(art.layers[-1].index_digest, art.layers[-1].index_size)
    idx = LayerIndex.decode(good)
    assert idx.encode() == good
    bad = [good[:-1], good + b"\0", b"XXXXXXXX" + good[8:], good[:8] + b"\2" + good[9:]]
    gap = LayerIndex(idx.layer_id, idx.parent, idx.manifest, idx.packs,
                     [FrameRef(f.pack, f.offset + 1, f.stored_len, f.codec, f.raw_len,
                               f.chunk) for f in idx.frames])
    dup = LayerIndex(idx.layer_id, idx.parent, idx.manifest, idx.packs,
                     idx.frames + idx.frames[-1:])
    huge = good[:HEADER.size + 64] + struct.pack("<I", 1 << 30) + good[HEADER.size + 68:]
    for data in [*bad, gap.encode(), dup.encode(), huge]:
        with pytest.raises(CorruptData):
            LayerIndex.decode(data)


def test_coalesce_neighbours():
    f = [FrameRef(0, o, n, 1, n, bytes(32)) for o, n in ((16, 10), (26, 5), (100_000, 7))]
    assert [(s, e, len(g)) for s, e, g in coalesce(f)] == [(16, 31, 2), (100_000, 100_007, 1)]


def test_hostile_manifest_in_artifact_refused(tmp_path, puller):
    """A pusher can make a valid artifact for any manifest bytes: a path with `..`
    is refused by the manifest decoder and nothing is written."""
    remote = LayoutRemote(tmp_path / "remote")
    content = b"payload" * 200  # too big to be held in the manifest: a chunk
    from pylayers.store.ingest import chunk_id

    cid = chunk_id(content)
    entries = [Entry(b"", DIR, 0o755), Entry(b"aa", REG, 0o644, size=len(content),
                                              content=cid,
                                              chunks=struct.pack("<32sI", cid, len(content)))]
    manifest = encode_manifest(None, entries).replace(b"\x00aa", b"\x00..")
    assert manifest.count(b"..") == 1
    mid = chunk_id(manifest)
    image = remote.put_manifest("img", b'{"schemaVersion":2,"layers":[]}', MANIFEST_TYPE)
    idx = LayerIndex(mid, None, [(mid, len(manifest))])
    packs = []
    for pack in build_packs([(mid, manifest)], [(cid, content)]):
        idx.packs.append((pack.digest, len(pack.data)))
        idx.frames += [FrameRef(len(idx.packs) - 1, *f) for f in pack.frames]
        remote.put_blob(pack.digest, pack.data)
        packs.append(descriptor(PACK_TYPE, pack.digest, len(pack.data)))
    data = idx.encode()
    remote.put_blob(sha256_digest(data), data)
    doc = encode_artifact(descriptor(MANIFEST_TYPE, image, 1),
                          [(mid, descriptor(INDEX_TYPE, sha256_digest(data), len(data)),
                            packs)])
    remote.put_manifest(artifact_tag(image), doc, MANIFEST_TYPE)
    with pytest.raises((UnsafePath, CorruptData)):
        pull_chunk_artifact(puller, remote, image, tag="evil")
    assert puller.all_ids() == [] and puller.tags() == {}
