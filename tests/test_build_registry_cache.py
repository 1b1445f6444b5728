"""`build --cache-to` / `--cache-from`: a build cache shared through a real registry
(Debian's docker-registry on 127.0.0.1, tests/registryutil.py). A fresh store with
--cache-from gets every step CACHED and the same layer ids and image digest; an edit
re-runs only the later steps; two branches exporting to one ref both hit afterwards; a
no-op export sends no blob and makes a constant number of requests (counted by a proxy
in front of the registry); hostile or damaged caches give one line, never a traceback
nor a wrong hit; a cache whose layer blobs are gone falls back to running the steps.

Needs root, /bin/busybox and mount+PID namespaces (tests/buildutil.py) and
docker-registry."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import registryutil  # noqa: E402
from buildutil import BUSYBOX, needs_build  # noqa: E402

from pylayers import Layers, Store  # noqa: E402
from pylayers.build.bases import RegistryOptions  # noqa: E402
from pylayers.build.builder import Builder  # noqa: E402
from pylayers.build.registrycache import RegistryCache  # noqa: E402
from pylayers.oci import export_image  # noqa: E402

pytestmark = needs_build
registry = registryutil.registry

DOCKERFILE = """\
FROM scratch AS base
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]

FROM base AS build
WORKDIR /src
COPY deps/ /deps/
RUN cat /deps/* > /deps.all
COPY src/ ./
RUN cat a.txt b.txt > out.txt && wc -c /deps.all >> out.txt

FROM base
COPY --from=build /src/out.txt /app/out.txt
CMD ["cat", "/app/out.txt"]
"""


def make_context(root: Path, dockerfile: str = DOCKERFILE) -> Path:
    (root / "src").mkdir(parents=True)
    (root / "deps").mkdir()
    shutil.copy(BUSYBOX, root / "busybox")
    (root / "src" / "a.txt").write_text("a\n")
    (root / "src" / "b.txt").write_text("b\n")
    for i in range(3):
        (root / "deps" / f"d{i}").write_bytes(os.urandom(1) * (200_000 + i))
    (root / "Dockerfile").write_text(dockerfile)
    return root


def build(store_path: Path, ctx: Path, cache_from=(), cache_to=None, **kw):
    """(BuildResult, RegistryCache) of one build in the store at `store_path`."""
    with Store.open(store_path) as store:
        layers = Layers(store)
        cache = RegistryCache(layers, cache_from, cache_to, insecure=True)
        try:
            res = cache.build(Builder(layers, registry=RegistryOptions(insecure=True)), ctx,
                              **kw)
        finally:
            cache.close()
        return res, cache


def ran(res) -> list[str]:
    return [s.text for s in res.steps if s.layer is not None and not s.cached]


def image_digest(store_path: Path, layer: bytes, dest: Path) -> str:
    with Store.open(store_path) as store:
        return export_image(Layers(store), layer, f"oci:{dest}", "gzip", 0).manifest_digest


def cli(store: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pylayers", "--store", str(store), *args],
                          capture_output=True, text=True, timeout=300, cwd=store.parent)


def test_fresh_store_with_cache_from_gets_everything_cached(tmp_path, registry):
    ctx = make_context(tmp_path / "ctx")
    ref = f"{registry.host}/cache/app:main"
    first, cache = build(tmp_path / "a", ctx, cache_to=ref)
    assert len(ran(first)) == 8
    assert cache.export_result.layers_pushed > 0
    again, cache = build(tmp_path / "b", ctx, cache_from=[ref])
    assert ran(again) == []
    assert again.layer_id == first.layer_id
    assert [s.layer for s in again.steps] == [s.layer for s in first.steps]
    assert image_digest(tmp_path / "a", first.layer_id, tmp_path / "img-a") == \
        image_digest(tmp_path / "b", again.layer_id, tmp_path / "img-b")
    # the layers the build needed were pulled, and are now in the store's own cache
    with Store.open(tmp_path / "b") as store:
        assert Layers(store).exists(first.layer_id)
    local = build(tmp_path / "b", ctx)[0]
    assert ran(local) == []


def test_edit_after_cache_from_reruns_only_later_steps(tmp_path, registry):
    ctx = make_context(tmp_path / "ctx")
    ref = f"{registry.host}/cache/app:main"
    build(tmp_path / "a", ctx, cache_to=ref)
    (ctx / "src" / "b.txt").write_text("B\n")
    res, cache = build(tmp_path / "b", ctx, cache_from=[ref])
    assert ran(res) == ["COPY src/ ./", "RUN cat a.txt b.txt > out.txt && wc -c /deps.all "
                        ">> out.txt", "COPY --from=build /src/out.txt /app/out.txt"]
    # only the layers the build read were pulled: the base stage's two, and the build
    # stage's up to the step that ran (WORKDIR, COPY deps/, RUN); not the old COPY src/,
    # its RUN, nor the old final layer
    assert cache.pulled == 5
    with Store.open(tmp_path / "b") as store:
        files = {e.path: Layers(store).read_file(e) for e in Layers(store).tree(res.layer_id)
                 if e.kind == 1}
    assert files[b"app/out.txt"].startswith(b"a\nB\n")


def test_cli_cache_to_and_from_json_and_lines(tmp_path, registry):
    ctx = make_context(tmp_path / "ctx")
    ref = f"{registry.host}/cache/cli:main"
    first = cli(tmp_path / "a", "build", str(ctx), "--cache-to", ref, "--insecure")
    assert first.returncode == 0, first.stderr
    assert f"cache-to {ref}: 8 records (8 added)" in first.stderr
    top = first.stdout.split()[-1]
    second = cli(tmp_path / "b", "build", str(ctx), "--cache-from", ref, "--cache-from",
                 f"{registry.host}/cache/none:x", "--cache-to", ref, "--insecure", "--json")
    assert second.returncode == 0, second.stderr
    doc = json.loads(second.stdout)
    assert doc["id"] == top and doc["built"] == 0 and doc["cached"] == 8
    assert doc["cache_from"]["layers_pulled"] > 0
    assert doc["cache_to"]["records_added"] == 0 and doc["cache_to"]["blob_bytes_sent"] == 0
    assert any("cache/none:x not found" in w for w in doc["warnings"])


def test_two_branches_exporting_to_one_ref_both_hit(tmp_path, registry):
    ref = f"{registry.host}/cache/app:shared"
    main = make_context(tmp_path / "main")
    feature = tmp_path / "feature"
    shutil.copytree(main, feature)
    (feature / "src" / "a.txt").write_text("feature\n")
    a, _ = build(tmp_path / "ci-main", main, cache_to=ref)
    b, cache = build(tmp_path / "ci-feature", feature, cache_to=ref)
    assert cache.export_result.records == 8 + 3  # the feature's COPY src/ and after
    assert cache.export_result.layers_pushed == 3
    for ctx, want in ((main, a), (feature, b)):
        res, _ = build(tmp_path / f"fresh-{ctx.name}", ctx, cache_from=[ref])
        assert ran(res) == [] and res.layer_id == want.layer_id


class Counting(BaseHTTPRequestHandler):
    """A proxy in front of the registry counting the requests by method, and the bytes
    of their bodies."""

    protocol_version = "HTTP/1.1"
    upstream = ""
    requests: list = []
    body_bytes = 0
    hook = None  # called with (method, path) before a request is passed on

    def log_message(self, *args) -> None:
        pass

    def _forward(self) -> None:
        cls = type(self)
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else None
        cls.requests.append((self.command, self.path))
        cls.body_bytes += n
        if cls.hook is not None:
            cls.hook(self.command, self.path)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
        conn = http.client.HTTPConnection(cls.upstream, timeout=30)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        length = resp.getheader("Content-Length") if self.command == "HEAD" else len(data)
        self.send_header("Content-Length", str(length or 0))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _forward


@pytest.fixture
def counting(registry):
    handler = type("Handler", (Counting,), {"upstream": registry.host, "requests": [],
                                            "body_bytes": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    handler.host = f"127.0.0.1:{server.server_address[1]}"
    yield handler
    server.shutdown()
    server.server_close()


def many_steps(n: int) -> str:
    return ("FROM scratch\nCOPY busybox /bin/busybox\n"
            + "".join(f"RUN [\"/bin/busybox\", \"touch\", \"/f{i}\"]\n" for i in range(n)))


@pytest.mark.parametrize("steps", [2, 40])
def test_noop_export_sends_nothing_and_makes_constant_requests(tmp_path, registry,
                                                               counting, steps):
    ctx = make_context(tmp_path / "ctx", many_steps(steps))
    build(tmp_path / "a", ctx, cache_to=f"{registry.host}/cache/many:x")
    res, cache = build(tmp_path / "a", ctx, cache_to=f"{counting.host}/cache/many:x")
    assert ran(res) == []
    assert cache.export_result.records_added == 0
    assert counting.body_bytes == 0
    methods = [m for m, _ in counting.requests]
    assert methods == ["GET", "GET"], counting.requests  # the manifest, the records blob


# -- hostile and damaged caches -------------------------------------------------------------
def _doc(registry, path: str) -> dict:
    req = urllib.request.Request(
        registry.url(path), headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _put(registry, repo_tag: str, manifest: dict, blobs: dict[str, bytes] | None = None
         ) -> None:
    """Upload `blobs` then PUT `manifest` under REPO:TAG (anything the registry takes)."""
    from pylayers.oci.registry import RegistryClient

    repo, _, tag = repo_tag.partition(":")
    with RegistryClient(f"{registry.host}/{repo}:{tag}", insecure=True, push=True) as c:
        for digest, data in (blobs or {}).items():
            c.push_blob(digest, data)
        c.put_manifest(tag, manifest.get("mediaType", "application/vnd.oci.image.manifest."
                                                      "v1+json"),
                       json.dumps(manifest).encode())


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def exported(tmp_path, registry):
    """A cache exported to REGISTRY/cache/app:main: (context, the manifest, its records)."""
    ctx = make_context(tmp_path / "ctx")
    first, _ = build(tmp_path / "a", ctx, cache_to=f"{registry.host}/cache/app:main")
    manifest = _doc(registry, "/v2/cache/app/manifests/main")
    records = _doc(registry, f"/v2/cache/app/blobs/{manifest['config']['digest']}")
    return ctx, manifest, records, first


def _with_records(manifest: dict, records) -> tuple[dict, dict[str, bytes]]:
    blob = records if isinstance(records, bytes) else json.dumps(records).encode()
    m = json.loads(json.dumps(manifest))
    m["config"] = {**m["config"], "digest": _sha(blob), "size": len(blob)}
    return m, {_sha(blob): blob}


def _hostile_cases(manifest: dict, records: dict) -> dict:
    cases = {}
    m = json.loads(json.dumps(manifest))
    m["artifactType"] = "application/vnd.example.other"
    cases["another artifact"] = (m, {}, "is not a pylayers build cache")
    m = json.loads(json.dumps(manifest))
    m["annotations"]["dev.pylayers.buildcache.version"] = "9"
    cases["a later version"] = (m, {}, "has version 9")
    cases["records not JSON"] = (*_with_records(manifest, b"\x00not json"), "is not JSON")
    cases["records a list"] = (*_with_records(manifest, b"[1, 2]"), "not a JSON object")
    r = json.loads(json.dumps(records))
    r["records"][0]["layer"] = "ab" * 32
    cases["record names an unlisted layer"] = (*_with_records(manifest, r),
                                               "which the cache does not list")
    r = json.loads(json.dumps(records))
    r["records"][0]["key"] = "XYZ"
    cases["bad key"] = (*_with_records(manifest, r), "is not 64 lowercase hex digits")
    r = json.loads(json.dumps(records))
    r["records"][1]["created"] = "yesterday"
    cases["bad created"] = (*_with_records(manifest, r), "is malformed")
    r = json.loads(json.dumps(records))
    r["records"].append(r["records"][0])
    cases["a key twice"] = (*_with_records(manifest, r), "is listed twice")
    m = json.loads(json.dumps(manifest))
    first_index = next(d for d in m["layers"] if "annotations" in d)
    first_index["annotations"]["dev.pylayers.parent"] = "cd" * 32
    cases["parent not listed"] = (m, {}, "is not listed")
    m = json.loads(json.dumps(manifest))
    m["layers"].insert(0, m["layers"][1])
    cases["a pack before any index"] = (m, {}, "before any layer index")
    m = json.loads(json.dumps(manifest))
    m["config"]["size"] = 1 << 40
    cases["a huge records blob"] = (m, {}, "too large")
    r = json.loads(json.dumps(records))
    with_inputs = next(x for x in r["records"] if x["inputs"])
    with_inputs["inputs"] = {"digest": _sha(b"x"), "size": 1}
    cases["inputs blob not listed"] = (*_with_records(manifest, r),
                                       "names an inputs blob the cache does not list")
    return cases


def test_hostile_cache_refs_give_one_line_errors(tmp_path, registry, exported):
    ctx, manifest, records, _first = exported
    cases = _hostile_cases(manifest, records)
    for n, (name, (m, blobs, expect)) in enumerate(cases.items()):
        _put(registry, f"cache/app:bad{n}", m, blobs)
        for args in (["--cache-from", f"{registry.host}/cache/app:bad{n}"],
                     ["--cache-to", f"{registry.host}/cache/app:bad{n}"]):
            proc = cli(tmp_path / "fresh", "build", str(ctx), "--insecure", *args)
            err = proc.stderr.strip().splitlines()
            assert proc.returncode == 8, (name, proc.stderr)
            assert "Traceback" not in proc.stderr and len(err) == 1, (name, proc.stderr)
            assert expect in err[0], (name, err[0])
    # the tag an export refused is left as it was
    assert _doc(registry, "/v2/cache/app/manifests/bad0")["artifactType"] == \
        "application/vnd.example.other"


@pytest.mark.parametrize("inputs", [b"[]", b'{"version": 1, "inputs": [{"name": "x", '
                                    b'"files": {"a": ["file", "0644", 0, 0, 1, null, null, '
                                    b'null, {}]}}]}'])
def test_a_malformed_inputs_blob_is_one_line_with_explain(tmp_path, registry, exported,
                                                          inputs):
    ctx, manifest, records, _first = exported
    r = json.loads(json.dumps(records))
    for x in r["records"]:
        if x["inputs"]:
            x["inputs"] = {"digest": _sha(inputs), "size": len(inputs)}
    m, blobs = _with_records(manifest, r)
    m["layers"] = [d for d in m["layers"] if not d["mediaType"].endswith("inputs.v1+json")]
    m["layers"].append({"mediaType": "application/vnd.pylayers.buildcache.inputs.v1+json",
                        "digest": _sha(inputs), "size": len(inputs)})
    _put(registry, "cache/app:badinputs", m, {**blobs, _sha(inputs): inputs})
    (ctx / "src" / "b.txt").write_text("changed\n")
    ref = f"{registry.host}/cache/app:badinputs"
    ok = cli(tmp_path / "fresh", "build", str(ctx), "--insecure", "--cache-from", ref)
    assert ok.returncode == 0, ok.stderr  # the inputs are read by --explain only
    proc = cli(tmp_path / "fresh2", "build", str(ctx), "--insecure", "--cache-from", ref,
               "--explain")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 8 and len(err) == 1 and "Traceback" not in proc.stderr, \
        proc.stderr
    assert "inputs blob" in err[0] and ("not a JSON object" in err[0]
                                        or "is malformed" in err[0]), err[0]


def test_a_record_on_another_parent_is_a_miss_never_a_wrong_hit(tmp_path, registry,
                                                                exported):
    """A record whose layer was not made on the layer the step runs on is ignored: here
    every key is moved to the record of the step after it (a cache that lies)."""
    ctx, manifest, records, first = exported
    r = json.loads(json.dumps(records))
    keys = [x["key"] for x in r["records"]]
    for x, k in zip(r["records"], keys[1:] + keys[:1], strict=True):
        x["key"] = k
    _put(registry, "cache/app:shifted", *_with_records(manifest, r))
    res, _ = build(tmp_path / "fresh", ctx, cache_from=[f"{registry.host}/cache/app:shifted"])
    assert len(ran(res)) == 8 and res.layer_id == first.layer_id


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_layer_whose_blobs_are_gone_or_damaged_runs_its_steps(tmp_path, registry,
                                                                exported, damage):
    ctx, manifest, _records, first = exported
    # the pack blobs of the final stage's COPY --from layer (the top layer)
    top = next(d for d in manifest["layers"] if d.get("annotations", {}).get(
        "dev.pylayers.layer") == first.layer_id.hex())
    at = manifest["layers"].index(top)
    packs = [d for d in manifest["layers"][at + 1:at + 3]
             if d["mediaType"].endswith("pack.v1")]
    assert packs
    for d in packs:
        path = registry.blob_path(d["digest"])
        if damage == "missing":
            path.unlink()
        else:
            data = bytearray(path.read_bytes())
            data[-5] ^= 0xFF
            path.write_bytes(bytes(data))
    res, cache = build(tmp_path / "fresh", ctx,
                       cache_from=[f"{registry.host}/cache/app:main"])
    assert ran(res) == ["COPY --from=build /src/out.txt /app/out.txt"]
    assert res.layer_id == first.layer_id
    assert any("cannot be pulled" in w and "run again" in w for w in res.warnings), \
        res.warnings


def test_explain_on_a_fresh_machine_names_the_changed_file(tmp_path, registry):
    ctx = make_context(tmp_path / "ctx")
    ref = f"{registry.host}/cache/app:main"
    build(tmp_path / "a", ctx, cache_to=ref)
    (ctx / "src" / "b.txt").write_text("B!\n")
    os.chmod(ctx / "src" / "a.txt", 0o600)
    res, _ = build(tmp_path / "b", ctx, cache_from=[ref], explain=True)
    why = {s.text: s.explanation for s in res.steps if s.explanation}
    assert "b.txt: content changed (size 2 -> 3)" in why["COPY src/ ./"], why
    assert "a.txt: mode 0644 -> 0600" in why["COPY src/ ./"], why
    assert "the parent step missed" in why["COPY --from=build /src/out.txt /app/out.txt"] or \
        "differs" in why["COPY --from=build /src/out.txt /app/out.txt"]


def test_an_exporter_that_moved_the_tag_meanwhile_is_merged_not_replaced(
        tmp_path, registry, counting):
    """Another CI job exports to the tag after this export read it and before its PUT
    (the proxy lets that job's manifest in just before this export's check): the export
    merges again, and both jobs' records are in the tag."""
    main = make_context(tmp_path / "main")
    feature = tmp_path / "feature"
    shutil.copytree(main, feature)
    (feature / "src" / "a.txt").write_text("feature\n")
    b, _ = build(tmp_path / "ci-feature", feature,
                 cache_to=f"{registry.host}/cache/race:feature")
    other = urllib.request.urlopen(urllib.request.Request(
        registry.url("/v2/cache/race/manifests/feature"),
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})).read()

    def meanwhile(method: str, path: str) -> None:
        if method == "HEAD" and path == "/v2/cache/race/manifests/shared" and \
                counting.hook is not None:
            counting.hook = None  # once
            req = urllib.request.Request(
                registry.url(path), data=other, method="PUT",
                headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
            urllib.request.urlopen(req).read()

    counting.hook = staticmethod(meanwhile)
    a, cache = build(tmp_path / "ci-main", main,
                     cache_to=f"{counting.host}/cache/race:shared")
    assert counting.hook is None, "the export never checked the tag before its PUT"
    assert cache.export_result.attempts == 2
    assert cache.export_result.records == 11
    for ctx, want in ((main, a), (feature, b)):
        res, _ = build(tmp_path / f"fresh-{ctx.name}", ctx,
                       cache_from=[f"{registry.host}/cache/race:shared"])
        assert ran(res) == [] and res.layer_id == want.layer_id


def test_export_beyond_the_record_limit_drops_the_oldest_and_their_layers(
        tmp_path, registry, monkeypatch):
    from pylayers.build import registrycache

    ref = f"{registry.host}/cache/app:small"
    main = make_context(tmp_path / "main")
    feature = tmp_path / "feature"
    shutil.copytree(main, feature)
    (feature / "src" / "a.txt").write_text("feature\n")
    build(tmp_path / "ci-main", main, cache_to=ref)
    time.sleep(1.1)  # records carry their export's second: the feature's are newer
    monkeypatch.setattr(registrycache, "MAX_RECORDS", 9)
    b, cache = build(tmp_path / "ci-feature", feature, cache_to=ref)
    assert cache.export_result.records_added == 3
    manifest = _doc(registry, "/v2/cache/app/manifests/small")
    art, config = registrycache.decode_manifest(json.dumps(manifest).encode(), "cache")
    blob = registry.get(f"/v2/cache/app/blobs/{config['digest']}")
    records = registrycache.decode_records(blob, art, "records")
    assert len(records) == 9
    needed = {x for r in records.values() for x in art.chain(r.layer)}
    assert needed == set(art.layers)  # no layer left that no record needs
    res, _ = build(tmp_path / "fresh", feature, cache_from=[ref])
    assert ran(res) == [] and res.layer_id == b.layer_id


def test_layers_the_repository_has_cost_no_upload(tmp_path, registry):
    """An export to a new tag of a repository that holds the layers' blobs (another
    tag's cache, or `push --chunks` of the image) lists them and sends only the small
    records blob."""
    ctx = make_context(tmp_path / "ctx")
    first, one = build(tmp_path / "a", ctx, cache_to=f"{registry.host}/cache/app:one")
    assert one.export_result.counters["blob_bytes_sent"] > 500_000
    _res, two = build(tmp_path / "a", ctx, cache_to=f"{registry.host}/cache/app:two")
    assert two.export_result.layers_pushed == 8
    assert two.export_result.counters["blob_bytes_sent"] < 8192
    res, _ = build(tmp_path / "b", ctx, cache_from=[f"{registry.host}/cache/app:two"])
    assert ran(res) == [] and res.layer_id == first.layer_id


def test_a_base_from_a_registry_and_the_cache_on_a_fresh_machine(tmp_path, registry):
    """FROM an image in the registry: a fresh store pulls the base, then takes every
    step from the cache (keys chain to the base's layer id, the same on both)."""
    from pylayers.oci.registry_transfer import push_image

    base_ctx = make_context(tmp_path / "base-ctx", 'FROM scratch\nCOPY busybox /bin/busybox\n'
                            'RUN ["/bin/busybox", "--install", "-s", "/bin"]\n')
    with Store.open(tmp_path / "base-store") as store:
        top = Builder(Layers(store)).build(base_ctx).layer_id
        push_image(Layers(store), top, f"{registry.host}/base:v1", insecure=True, chunks=True)
    ctx = make_context(tmp_path / "ctx", f"FROM {registry.host}/base:v1\nCOPY src/ /src/\n"
                       "RUN cat /src/a.txt /src/b.txt > /out\n")
    ref = f"{registry.host}/cache/onbase:main"
    first, _ = build(tmp_path / "a", ctx, cache_to=ref)
    assert len(ran(first)) == 2
    again, cache = build(tmp_path / "b", ctx, cache_from=[ref])
    assert ran(again) == [] and again.layer_id == first.layer_id
    assert cache.pulled == 2  # the base came FROM's pull, the two steps' layers the cache
