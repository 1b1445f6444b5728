"""Chunk-level transfer against a real registry (Debian's docker-registry on 127.0.0.1,
tests/registryutil.py): v1 and v2 of an image pushed with their chunk artifacts; a
fresh store pulls v1 then v2, and v2 costs a small fraction of a full pull; registries
that refuse multi-range requests (400) or ignore Range (a real HTTP proxy in front of
the registry) still serve a correct pull; a damaged chunk in a pack blob is refused
with one line and nothing written; `skopeo copy` of the tag sees a normal image; an
image pushed without its artifact is pulled the standard way."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import registryutil  # noqa: E402
from test_chunk_transfer import edit, source_specs  # noqa: E402
from treeutil import assert_same_tree, build, need_tools, run_cli  # noqa: E402

import pylayers  # noqa: E402
from pylayers.oci.chunkartifact import LayerIndex, artifact_tag, decode_artifact  # noqa: E402
from pylayers.oci.registry_transfer import pull_image, push_image  # noqa: E402

registry = registryutil.registry


@pytest.fixture
def image(tmp_path, registry):
    """v1 and v2 of REPO (a base layer and an app layer; v2 edits the app) pushed with
    their chunk artifacts: (pusher store path, v2 source dir, {version: top layer})."""
    store = pylayers.Store.open(tmp_path / "pusher")
    layers = pylayers.Layers(store)
    try:
        build(tmp_path / "base", source_specs(1, 30))
        base = layers.snapshot(tmp_path / "base").layer_id
        src = tmp_path / "src"
        build(src, source_specs(2))
        tops = {}
        for v in (1, 2):
            if v == 2:
                edit(src, seed=v)
            tops[v] = layers.snapshot(src, parent=base).layer_id
            res = push_image(layers, tops[v], f"{registry.host}/app:v{v}", insecure=True,
                             chunks=True)
            assert res.chunks is not None and res.chunks["blobs_sent"] > 0
    finally:
        store.close()
    return tmp_path / "pusher", src, tops


def _pull(store_path: Path, ref: str, **kw):
    store = pylayers.Store.open(store_path)
    try:
        return pull_image(pylayers.Layers(store), ref, insecure=True, **kw)
    finally:
        store.close()


def _checkout(store_path: Path, top: bytes, dest: Path) -> None:
    with pylayers.Store.open(store_path) as store:
        pylayers.Layers(store).checkout(top, dest)


def test_next_version_pulls_a_small_fraction(tmp_path, registry, image):
    _pusher, src, tops = image
    v1 = _pull(tmp_path / "a", f"{registry.host}/app:v1", tag="app")
    assert v1.chunks is not None and v1.top == tops[1]
    full = v1.counters["bytes_received"]
    v2 = _pull(tmp_path / "a", f"{registry.host}/app:v2", tag="app")
    assert v2.chunks is not None and v2.top == tops[2]
    assert v2.chunks["layers_fetched"] == 1  # the base layer is not fetched again
    chunked = v2.counters["bytes_received"]
    assert chunked < 0.15 * full
    _checkout(tmp_path / "a", tops[2], tmp_path / "out")
    assert_same_tree(src, tmp_path / "out")
    # the standard pull of v2 after v1 fetches the whole app layer again
    _pull(tmp_path / "b", f"{registry.host}/app:v1", chunks=False)
    std = _pull(tmp_path / "b", f"{registry.host}/app:v2", chunks=False)
    assert std.chunks is None and std.fetched == 1
    assert chunked < 0.3 * std.counters["bytes_received"]
    # a re-push sends no blob
    with pylayers.Store.open(_pusher) as store:
        again = push_image(pylayers.Layers(store), tops[2], f"{registry.host}/app:v2",
                           insecure=True, chunks=True)
    assert again.chunks["blobs_sent"] == 0 and again.counters["blob_bytes_sent"] == 0


class _Proxy(BaseHTTPRequestHandler):
    """Passes requests to the registry, except that with mode "400" a multi-range
    request is answered 400, and with mode "ignore" Range headers are dropped (the
    whole blob comes back, 200)."""

    protocol_version = "HTTP/1.1"
    upstream = ""
    mode = ""
    refused = 0
    multipart = 0  # multi-range requests answered with several parts

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._forward()

    def do_HEAD(self) -> None:
        self._forward()

    def _forward(self) -> None:
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("host", "connection")}
        rng = headers.get("Range")
        cls = type(self)
        if rng and cls.mode == "400" and "," in rng:
            cls.refused += 1
            self.send_response(400)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if rng and cls.mode == "ignore":
            cls.refused += 1
            del headers["Range"]
        if rng and cls.mode.startswith("fail-after-"):
            cls.refused += 1
            if cls.refused > int(cls.mode.rpartition("-")[2]):  # the registry goes away
                self.send_response(500)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        conn = http.client.HTTPConnection(cls.upstream, timeout=30)
        try:
            conn.request(self.command, self.path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if rng and "," in rng and resp.status == 206 and (
                resp.getheader("Content-Type") or "").startswith("multipart/byteranges"):
            cls.multipart += 1
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        length = resp.getheader("Content-Length") if self.command == "HEAD" else len(body)
        self.send_header("Content-Length", str(length or 0))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


@pytest.mark.parametrize("mode", ["pass", "400", "ignore"])
def test_range_refusing_registry_still_pulls(tmp_path, registry, image, mode):
    """"pass": the registry itself, which answers multi-range requests with
    multipart/byteranges; "400" and "ignore": a proxy refusing or ignoring them."""
    _pusher, src, tops = image
    handler = type("Proxy", (_Proxy,), {"upstream": registry.host, "mode": mode,
                                       "refused": 0, "multipart": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host = f"127.0.0.1:{server.server_address[1]}"
        v1 = _pull(tmp_path / "a", f"{host}/app:v1")
        v2 = _pull(tmp_path / "a", f"{host}/app:v2", tag="app")
    finally:
        server.shutdown()
        server.server_close()
    assert v1.chunks is not None and v2.chunks is not None and v2.top == tops[2]
    if mode == "pass":
        assert handler.multipart > 0 and handler.refused == 0
    else:
        assert handler.refused > 0 and handler.multipart == 0
    _checkout(tmp_path / "a", tops[2], tmp_path / "out")
    assert_same_tree(src, tmp_path / "out")


def test_interrupted_pull_resumes_without_fetching_again(tmp_path, registry, image):
    """The registry fails after a few range requests: the pull stops with one line and
    no layer, the chunks it verified stay; run again, it fetches only the others."""
    _pusher, src, tops = image
    handler = type("Proxy", (_Proxy,), {"upstream": registry.host, "mode": "fail-after-3",
                                       "refused": 0, "multipart": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host = f"127.0.0.1:{server.server_address[1]}"
        proc = run_cli(tmp_path / "a", "pull", "--insecure", f"{host}/app:v1", "-t", "app")
    finally:
        server.shutdown()
        server.server_close()
    err = proc.stderr.decode()
    assert proc.returncode != 0 and err.strip().count("\n") == 0, err
    with pylayers.Store.open(tmp_path / "a") as store:
        assert pylayers.Layers(store).all_ids() == []
        kept = store.chunk_count()
    assert kept > 0
    whole = _pull(tmp_path / "b", f"{registry.host}/app:v1")
    again = _pull(tmp_path / "a", f"{registry.host}/app:v1", tag="app")
    assert again.top == tops[1]
    fetched, total = again.chunks["chunks_fetched"], whole.chunks["chunks_fetched"]
    assert fetched + kept >= total and fetched < total
    assert again.counters["bytes_received"] < whole.counters["bytes_received"]


def _manifest(registry, ref: str) -> tuple[str, bytes]:
    """(digest, bytes) of the OCI manifest REPO:REF, fetched as any client would."""
    import urllib.request

    req = urllib.request.Request(
        registry.url(f"/v2/app/manifests/{ref}"),
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.headers["Docker-Content-Digest"], r.read()


def _artifact(registry, tag: str) -> LayerIndex:
    """The top layer's index in the chunk artifact of REPO:TAG."""
    digest, _data = _manifest(registry, tag)
    art = decode_artifact(_manifest(registry, artifact_tag(digest))[1], digest)
    top = art.layers[-1]
    return LayerIndex.decode(registry.get(f"/v2/app/blobs/{top.index_digest}"))


def test_damaged_chunk_refused_one_line_nothing_written(tmp_path, registry, image):
    idx = _artifact(registry, "v1")
    f = idx.frames[len(idx.frames) // 2]
    path = registry.blob_path(idx.packs[f.pack][0])
    data = bytearray(path.read_bytes())
    data[f.offset + f.stored_len // 2] ^= 0x55
    path.write_bytes(bytes(data))
    store = tmp_path / "a"
    proc = run_cli(store, "pull", "--insecure", f"{registry.host}/app:v1", "-t", "app")
    err = proc.stderr.decode()
    assert proc.returncode == 8, err
    assert err.strip().count("\n") == 0, err
    assert "does not match its id" in err or "decompress" in err, err
    assert "Traceback" not in err
    with pylayers.Store.open(store) as s:
        layers = pylayers.Layers(s)
        assert layers.all_ids() == [] and layers.tags() == {}


def test_standard_client_sees_a_normal_image(tmp_path, registry, image):
    need_tools("skopeo")
    doc = json.loads(_manifest(registry, "v2")[1])
    assert "artifactType" not in doc and "subject" not in doc
    assert all(d["mediaType"].startswith("application/vnd.oci.image.layer.v1.tar")
               for d in doc["layers"])
    dest = tmp_path / "copy"
    proc = subprocess.run(["skopeo", "copy", "--src-tls-verify=false",
                           f"docker://{registry.host}/app:v2", f"oci:{dest}:v2"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    index = json.loads((dest / "index.json").read_text())
    assert len(index["manifests"]) == 1
    mdigest = index["manifests"][0]["digest"]
    copied = json.loads((dest / "blobs/sha256" / mdigest[7:]).read_text())
    assert [d["digest"] for d in copied["layers"]] == [d["digest"] for d in doc["layers"]]
    for d in copied["layers"]:  # the layers are whole tars, not the artifact's packs
        assert (dest / "blobs/sha256" / d["digest"][7:]).stat().st_size == d["size"]


def test_image_without_artifact_pulls_standard_layers(tmp_path, registry):
    build(tmp_path / "src", source_specs(4, 8))
    with pylayers.Store.open(tmp_path / "pusher") as store:
        layers = pylayers.Layers(store)
        top = layers.snapshot(tmp_path / "src").layer_id
        res = push_image(layers, top, f"{registry.host}/plain:v1", insecure=True)
        assert res.chunks is None  # the artifact is pushed on request only
    got = _pull(tmp_path / "a", f"{registry.host}/plain:v1", tag="p")
    assert got.chunks is None and got.fetched == 1
    _checkout(tmp_path / "a", got.top, tmp_path / "out")
    assert_same_tree(tmp_path / "src", tmp_path / "out")


def test_cli_pull_with_and_without_chunks(tmp_path, registry, image):
    for store, flags, chunked in (("a", [], True), ("b", ["--no-chunks"], False)):
        proc = run_cli(tmp_path / store, "pull", "--insecure", "--json", *flags,
                       f"{registry.host}/app:v2")
        assert proc.returncode == 0, proc.stderr.decode()
        doc = json.loads(proc.stdout)
        assert (doc["chunk_transfer"] is not None) == chunked
        if chunked:  # the pusher's very layers (a tar import makes its own)
            assert doc["id"] == image[2][2].hex()
