"""push and pull against a real registry (Debian's docker-registry, started per test by
tests/registryutil.py on 127.0.0.1): the client's calls (existence checks, monolithic
and chunked uploads, mounts, ranged reads, manifests checked against their digests),
round trips compared entry by entry, re-pushes and pushes to a new repository that
send no blob data, damaged blobs refused with nothing left behind, and the exit codes
of the failures."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import registryutil  # noqa: E402
from registryutil import Registry  # noqa: E402
from treeutil import (  # noqa: E402
    Dir,
    File,
    Symlink,
    build,
    describe_tree,
    run_cli,
    snapshot,
    tree_differences,
)

from pylayers.errors import CorruptData, NotFound  # noqa: E402
from pylayers.oci.reference import parse_reference  # noqa: E402
from pylayers.oci.registry import RegistryClient, RegistryError  # noqa: E402

registry = registryutil.registry  # the fixture
T = 1_700_000_000_000_000_000


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def cli_json(store: Path, *args: str, code: int = 0) -> dict:
    proc = run_cli(store, *args, "--json")
    assert proc.returncode == code, proc.stderr.decode(errors="replace")
    return json.loads(proc.stdout)


def same_tree(a: Path, b: Path) -> None:
    diffs = tree_differences(describe_tree(a), describe_tree(b))
    assert not diffs, "trees differ:\n" + "\n".join(diffs[:40])


@pytest.fixture
def image(tmp_path) -> tuple[Path, Path, str]:
    """A store with tag v2: a base layer and a second that changes, deletes and adds."""
    store, src = tmp_path / "store", tmp_path / "src"
    build(src, [Dir("etc", mode=0o755, mtime_ns=T), File("etc/motd", b"hello\n", mtime_ns=T),
                File("etc/gone", b"x\n", mtime_ns=T),
                File("big", os.urandom(300_000), mode=0o600, mtime_ns=T),
                Symlink("link", "etc/motd"), Dir("d"), Dir("d/e", mtime_ns=T)])
    snapshot(store, src, "-t", "base")
    os.unlink(src / "etc/gone")
    (src / "etc/motd").write_text("hello again\n")
    (src / "new").write_bytes(b"n" * 5000)
    os.link(src / "new", src / "new.hl")
    top = snapshot(store, src, "--parent", "base", "-t", "v2")
    return store, src, top


# -- references --------------------------------------------------------------------------
@pytest.mark.parametrize("text,want", [
    ("127.0.0.1:5000/app:v1", ("127.0.0.1:5000", "app", "v1", None)),
    ("localhost/a/b", ("localhost", "a/b", "latest", None)),
    ("busybox", ("docker.io", "library/busybox", "latest", None)),
    ("ghcr.io/org/app@sha256:" + "a" * 64, ("ghcr.io", "org/app", None, "sha256:" + "a" * 64)),
    ("reg.example:443/x/y:1.0@sha256:" + "b" * 64,
     ("reg.example:443", "x/y", "1.0", "sha256:" + "b" * 64)),
])
def test_references(text, want) -> None:
    r = parse_reference(text)
    assert (r.registry, r.repository, r.tag, r.digest) == want


@pytest.mark.parametrize("text", ["", "app/UPPER", "a//b", "reg:5000/app:", "x@sha256:12",
                                  "a b", "reg.io/app:-bad"])
def test_bad_references_are_usage_errors(text, tmp_path) -> None:
    proc = run_cli(tmp_path / "store", "pull", text)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.decode().strip().splitlines()) == 1


# -- the client ------------------------------------------------------------------------------
def test_client_blobs_monolithic_chunked_mount_and_ranges(registry) -> None:
    small, big = os.urandom(3000), os.urandom(5 << 20)
    with RegistryClient(f"{registry.host}/a/b", insecure=True, push=True) as c:
        assert not c.has_blob(sha(small))
        c.push_blob(sha(small), small)
        assert c.stat_blob(sha(small)) == 3000
        sent = c.blob_bytes_sent
        c.push_blob(sha(big), io.BytesIO(big), len(big), chunk_size=1 << 20)  # 5 PATCHes
        assert c.blob_bytes_sent - sent == len(big)
        assert registry.blob_path(sha(big)).read_bytes() == big
        with c.open_blob(sha(big)) as s:
            assert s.read() == big and not s.partial
        with c.open_blob(sha(big), (100, 200)) as s:
            assert s.partial and s.start == 100 and s.total == len(big)
            assert s.read() == big[100:200]
        with c.open_blob(sha(big), (len(big) - 10, None)) as s:
            assert s.read() == big[-10:]
        with pytest.raises(RegistryError):  # a blob whose bytes are not its digest
            c.push_blob(sha(b"other"), b"not other")
    with RegistryClient(f"{registry.host}/c", insecure=True, push=True) as c2:
        assert not c2.has_blob(sha(big))
        assert c2.mount_blob(sha(big), "a/b")
        assert c2.has_blob(sha(big)) and c2.blob_bytes_sent == 0
        # not in the source repository: 202, and the upload it opened is used
        assert not c2.mount_blob(sha(b"elsewhere"), "nope")
        c2.push_blob(sha(b"elsewhere"), b"elsewhere")
        assert c2.has_blob(sha(b"elsewhere"))


def test_client_manifests_checked_against_digests(registry) -> None:
    cfg = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    manifest = json.dumps({"schemaVersion": 2,
                           "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": sha(cfg), "size": len(cfg)},
                           "layers": []}).encode()
    with RegistryClient(f"{registry.host}/m", insecure=True, push=True) as c:
        c.push_blob(sha(cfg), cfg)
        assert c.put_manifest("t1", "application/vnd.oci.image.manifest.v1+json",
                              manifest) == sha(manifest)
        mt, data, digest = c.get_manifest("t1")
        assert (mt, data, digest) == ("application/vnd.oci.image.manifest.v1+json",
                                      manifest, sha(manifest))
        assert c.get_manifest(sha(manifest))[1] == manifest
        assert c.head_manifest("t1") == sha(manifest)
        assert c.head_manifest("t2") is None
        with pytest.raises(NotFound):
            c.get_manifest("t2")
    # the stored manifest damaged: refused whatever the registry says
    revisions = registry.storage / "docker/registry/v2/blobs/sha256" / sha(manifest)[7:9]
    data_file = revisions / sha(manifest)[7:] / "data"
    data_file.write_bytes(manifest.replace(b'"layers": []', b'"layers":[] '))
    with RegistryClient(f"{registry.host}/m", insecure=True) as c, \
            pytest.raises(CorruptData):
        c.get_manifest(sha(manifest))


# -- push and pull -------------------------------------------------------------------------
def test_push_pull_round_trip(tmp_path, registry, image) -> None:
    store, src, top = image
    dest = f"{registry.host}/app:v2"
    pushed = cli_json(store, "push", "v2", dest, "--insecure")
    assert pushed["blobs_uploaded"] == 3 and pushed["manifest_pushed"]
    # the same bytes as export oci:
    exported = run_cli(store, "export", "v2", f"oci:{tmp_path / 'oci'}:v2")
    assert exported.stdout.decode().strip() == pushed["digest"]
    store2 = tmp_path / "store2"
    pulled = cli_json(store2, "pull", dest, "--insecure", "-t", "got")
    assert pulled["digest"] == pushed["digest"] and pulled["id"] == top
    assert pulled["layers_fetched"] == 2 and pulled["blob_bytes_received"] > 300_000
    assert run_cli(store2, "checkout", "got", tmp_path / "co").returncode == 0
    co1 = tmp_path / "co1"
    assert run_cli(store2, "checkout", "got^", co1).returncode == 0
    assert (co1 / "etc/gone").exists() and not (tmp_path / "co/etc/gone").exists()
    assert run_cli(store, "checkout", "v2", tmp_path / "orig").returncode == 0
    same_tree(tmp_path / "orig", tmp_path / "co")
    # nothing left in the download area
    assert not any((store2 / "registry" / "downloads").iterdir())
    # pulling again, or by digest: every layer is known, nothing fetched
    again = cli_json(store2, "pull", f"{registry.host}/app@{pushed['digest']}", "--insecure")
    assert again["layers_reused"] == 2 and again["blob_bytes_received"] == 0
    assert again["id"] == top


def test_repush_and_push_to_new_repository_send_no_blob_bytes(registry, image) -> None:
    store, _src, _top = image
    first = cli_json(store, "push", "v2", f"{registry.host}/app:v2", "--insecure")
    assert first["blob_bytes_sent"] > 300_000 and first["exported"]
    again = cli_json(store, "push", "v2", f"{registry.host}/app:v2", "--insecure")
    assert again["blob_bytes_sent"] == 0 and again["bytes_sent"] == 0
    assert again["blobs_present"] == 3 and not again["manifest_pushed"]
    # nothing exported: the manifest rebuilt from what the first push exported
    assert not again["exported"] and again["digest"] == first["digest"]
    other = cli_json(store, "push", "v2", f"{registry.host}/team/other:v1", "--insecure")
    assert other["blob_bytes_sent"] == 0 and other["blobs_mounted"] == 3
    assert other["manifest_pushed"] and other["digest"] == first["digest"]
    assert not other["exported"]
    # another compression is another image: exported and sent
    zst = cli_json(store, "push", "v2", f"{registry.host}/app:zst", "--insecure",
                   "--compression", "zstd")
    assert zst["exported"] and zst["blobs_uploaded"] == 2 and zst["blobs_present"] == 1
    # a registry that lost a blob (in every repository): exported again, that blob sent
    import shutil

    shutil.rmtree(registry.blob_path(first["layers"][1]).parent)
    lost = cli_json(store, "push", "v2", f"{registry.host}/app:v2", "--insecure")
    assert lost["exported"] and lost["blobs_uploaded"] == 1
    assert lost["digest"] == first["digest"]
    # the parent alone, as a new tag: its one layer and a new config
    base = cli_json(store, "push", "base", f"{registry.host}/app:base", "--insecure")
    assert base["blobs_present"] == 1 and base["blobs_uploaded"] == 1
    assert base["blob_bytes_sent"] < 2000  # the config only


def test_chunked_push(tmp_path, registry, image) -> None:
    store, _src, top = image
    res = cli_json(store, "push", "v2", f"{registry.host}/chunked:v2", "--insecure",
                   "--chunk-size", "64K", "--compression", "none")
    assert res["requests"] > 10  # one PATCH per 64K of the 300K layer
    pulled = cli_json(tmp_path / "s2", "pull", f"{registry.host}/chunked:v2", "--insecure")
    assert pulled["id"] == top


def test_corrupt_blob_is_refused_and_nothing_is_left(tmp_path, registry, image) -> None:
    store, _src, _top = image
    res = cli_json(store, "push", "v2", f"{registry.host}/app:v2", "--insecure")
    big = max(res["layers"], key=lambda d: registry.blob_path(d).stat().st_size)
    path = registry.blob_path(big)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    store2 = tmp_path / "store2"
    proc = run_cli(store2, "pull", f"{registry.host}/app:v2", "--insecure", "-t", "x")
    err = proc.stderr.decode()
    assert proc.returncode == 8, err
    assert len(err.strip().splitlines()) == 1 and big in err
    assert run_cli(store2, "layers", "--json").stdout.strip() == b"[]"
    assert run_cli(store2, "tags", "--json").stdout.strip() == b"[]"
    assert list((store2 / "registry" / "downloads").iterdir()) == []


def test_truncated_blob_is_refused(tmp_path, registry, image) -> None:
    store, _src, _top = image
    res = cli_json(store, "push", "v2", f"{registry.host}/app:v2", "--insecure",
                   "--compression", "zstd")
    path = registry.blob_path(res["layers"][0])
    path.write_bytes(path.read_bytes()[:-100])
    proc = run_cli(tmp_path / "s2", "pull", f"{registry.host}/app:v2", "--insecure")
    assert proc.returncode in (1, 8), proc.stderr
    assert len(proc.stderr.decode().strip().splitlines()) == 1
    assert run_cli(tmp_path / "s2", "layers", "--json").stdout.strip() == b"[]"


def test_errors_and_exit_codes(tmp_path, registry, image) -> None:
    store, _src, _top = image
    s2 = tmp_path / "s2"
    cases = [
        (("pull", f"{registry.host}/nothing:here", "--insecure"), 3, "not found"),
        (("pull", f"{registry.host}/app:v2"), 1, "--insecure"),  # plain http, no flag
        (("push", "nosuchtag", f"{registry.host}/app:v2", "--insecure"), 3, "nosuchtag"),
        (("push", "v2", f"{registry.host}/app@sha256:" + "a" * 64, "--insecure"), 2,
         "digest"),
        (("pull", f"{registry.host}/app:v2", "--insecure", "--platform", "linux"), 2,
         "platform"),
    ]
    for args, code, words in cases:
        st = store if args[0] == "push" else s2
        proc = run_cli(st, *args)
        err = proc.stderr.decode()
        assert proc.returncode == code, (args, err)
        assert len(err.strip().splitlines()) == 1 and words in err, (args, err)
    registry.stop()
    proc = run_cli(store, "push", "v2", f"{registry.host}/app:v2", "--insecure")
    assert proc.returncode == 1 and "cannot connect" in proc.stderr.decode()
    assert len(proc.stderr.decode().strip().splitlines()) == 1


def test_index_picks_the_platform(tmp_path, registry, image) -> None:
    """An index of two images (this machine's and another's): the pull takes this
    machine's, or the one --platform names."""
    store, _src, top = image
    a = cli_json(store, "push", "v2", f"{registry.host}/multi:a", "--insecure")
    b = cli_json(store, "push", "base", f"{registry.host}/multi:b", "--insecure")
    from pylayers.oci.config import GOARCH

    here = GOARCH.get(os.uname().machine, os.uname().machine)
    other = "s390x" if here != "s390x" else "arm64"

    def desc(digest: str, arch: str) -> dict:
        size = len(registry.blob_path(digest).read_bytes())
        return {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest, "size": size,
                "platform": {"os": "linux", "architecture": arch}}

    index = json.dumps({"schemaVersion": 2,
                        "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [desc(b["digest"], other), desc(a["digest"], here)]
                        }).encode()
    with RegistryClient(f"{registry.host}/multi", insecure=True, push=True) as c:
        c.put_manifest("both", "application/vnd.oci.image.index.v1+json", index)
    got = cli_json(tmp_path / "s2", "pull", f"{registry.host}/multi:both", "--insecure")
    assert got["id"] == top and got["digest"] == a["digest"]
    got = cli_json(tmp_path / "s3", "pull", f"{registry.host}/multi:both", "--insecure",
                   "--platform", f"linux/{other}")
    assert got["digest"] == b["digest"] and len(got["layers"]) == 1
    proc = run_cli(tmp_path / "s4", "pull", f"{registry.host}/multi:both", "--insecure",
                   "--platform", "windows/amd64")
    assert proc.returncode == 6 and "windows/amd64" in proc.stderr.decode()


def test_registry_fixture_restarts(tmp_path) -> None:
    reg = Registry(tmp_path / "r")
    reg.start()
    try:
        assert reg.get("/v2/") in (b"{}", b"")
        reg.stop()
        reg.start()
        assert reg.get("/v2/") in (b"{}", b"")
    finally:
        reg.stop()


def test_progress_lines_and_quiet(tmp_path, registry, image) -> None:
    """--progress on a pipe: lines for the upload and the download with their totals;
    --quiet: nothing on stderr."""
    import subprocess

    store, _src, _top = image
    env = dict(os.environ, PYLAYERS_PROGRESS_INTERVAL="0", PYLAYERS_PROGRESS_DELAY="0")

    def cli(st: Path, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pylayers", "--store", str(st), *args],
                              capture_output=True, text=True, env=env, cwd=tmp_path)

    proc = cli(store, "push", "v2", f"{registry.host}/p:v2", "--insecure", "--progress")
    assert proc.returncode == 0, proc.stderr
    assert "push: upload: 100%" in proc.stderr, proc.stderr
    proc = cli(tmp_path / "s2", "pull", f"{registry.host}/p:v2", "--insecure", "--progress")
    assert proc.returncode == 0, proc.stderr
    assert "pull: download: 100%" in proc.stderr and "2 layers fetched" in proc.stderr
    proc = cli(tmp_path / "s3", "pull", f"{registry.host}/p:v2", "--insecure", "--quiet")
    assert proc.returncode == 0 and proc.stderr == ""
    assert len(proc.stdout.split()) == 2


def test_artifact_and_max_layer_size_are_refused(tmp_path, registry, image) -> None:
    """A manifest whose config is not an image config (an OCI artifact) is not pulled
    (exit 6); a layer over --max-layer-size neither, and neither leaves anything."""
    store, _src, _top = image
    cfg = b'{"kind":"not an image"}'
    manifest = json.dumps({"schemaVersion": 2,
                           "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.example.thing+json",
                                      "digest": sha(cfg), "size": len(cfg)},
                           "layers": []}).encode()
    with RegistryClient(f"{registry.host}/art", insecure=True, push=True) as c:
        c.push_blob(sha(cfg), cfg)
        c.put_manifest("x", "application/vnd.oci.image.manifest.v1+json", manifest)
    s2 = tmp_path / "s2"
    proc = run_cli(s2, "pull", f"{registry.host}/art:x", "--insecure")
    assert proc.returncode == 6 and "artifact" in proc.stderr.decode(), proc.stderr
    assert cli_json(store, "push", "v2", f"{registry.host}/app:v2", "--insecure")
    proc = run_cli(s2, "pull", f"{registry.host}/app:v2", "--insecure",
                   "--max-layer-size", "100K")
    assert proc.returncode == 6 and "max-layer-size" in proc.stderr.decode(), proc.stderr
    assert run_cli(s2, "layers", "--json").stdout.strip() == b"[]"
    assert list((s2 / "registry" / "downloads").iterdir()) == []


def test_a_blob_repeated_in_an_image(tmp_path, registry, image) -> None:
    """An image listing the same layer blob twice (as empty layers often are): fetched
    once, read twice, two layers."""
    store, _src, _top = image
    res = cli_json(store, "push", "base", f"{registry.host}/app:base", "--insecure")
    with RegistryClient(f"{registry.host}/app", insecure=True, push=True) as c:
        _mt, data, _d = c.get_manifest("base")
        manifest = json.loads(data)
        with c.open_blob(res["config"]) as s:
            config = json.loads(s.read())
        config["rootfs"]["diff_ids"] *= 2
        config.pop("history", None)
        cfg = json.dumps(config).encode()
        c.push_blob(sha(cfg), cfg)
        manifest["config"] = {**manifest["config"], "digest": sha(cfg), "size": len(cfg)}
        manifest["layers"] *= 2
        c.put_manifest("twice", manifest["mediaType"], json.dumps(manifest).encode())
    got = cli_json(tmp_path / "s2", "pull", f"{registry.host}/app:twice", "--insecure")
    assert len(got["layers"]) == 2 and got["layers_fetched"] == 2
    size = registry.blob_path(res["layers"][0]).stat().st_size
    assert size <= got["blob_bytes_received"] < 2 * size


def test_next_tag_fetches_only_the_new_layer(tmp_path, registry, image) -> None:
    """Pulling v2 into a store that pulled its base fetches only v2's own layer; the
    layers are the ones the pushing store has."""
    store, _src, top = image
    base = cli_json(store, "push", "base", f"{registry.host}/app:base", "--insecure")
    v2 = cli_json(store, "push", "v2", f"{registry.host}/app:v2", "--insecure")
    s2 = tmp_path / "s2"
    first = cli_json(s2, "pull", f"{registry.host}/app:base", "--insecure")
    assert first["layers_fetched"] == 1
    nxt = cli_json(s2, "pull", f"{registry.host}/app:v2", "--insecure")
    assert nxt["layers_reused"] == 1 and nxt["layers_fetched"] == 1 and nxt["id"] == top
    assert nxt["layers"][0] == first["id"]
    own = registry.blob_path(v2["layers"][1]).stat().st_size
    assert own <= nxt["blob_bytes_received"] < own + 4096  # its layer and config
    assert base["layers"][0] == v2["layers"][0]
