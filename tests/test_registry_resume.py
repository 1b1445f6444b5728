"""An interrupted pull resumes without fetching again what it had: the registry going
away mid-blob (a proxy in front of the real registry that closes every connection
after N bytes, then refuses new ones), and the pulling process killed (SIGKILL) mid-
download. The failed pull leaves no layer and no tag; the next one reads the blobs
it had received whole from the download area and asks only for the rest of the
partial one (a Range request), and ends with the same layers."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import registryutil  # noqa: E402
from registryutil import Proxy  # noqa: E402
from treeutil import File, build, run_cli, snapshot, start_cli  # noqa: E402

registry = registryutil.registry  # the fixture
MB = 1 << 20


@pytest.fixture
def pushed(tmp_path, registry) -> tuple[str, dict]:
    """Two layers of 2 MiB of random bytes each (incompressible), pushed uncompressed."""
    store, src = tmp_path / "store", tmp_path / "src"
    build(src, [File("a", os.urandom(2 * MB))])
    snapshot(store, src, "-t", "one")
    (src / "b").write_bytes(os.urandom(2 * MB))
    snapshot(store, src, "--parent", "one", "-t", "two")
    proc = run_cli(store, "push", "two", f"{registry.host}/big:two", "--insecure",
                   "--compression", "none", "--json")
    assert proc.returncode == 0, proc.stderr
    return str(store), json.loads(proc.stdout)


def layer_bytes(registry, res: dict) -> list[int]:
    return [registry.blob_path(d).stat().st_size for d in res["layers"]]


def nothing_committed(store: Path) -> None:
    assert run_cli(store, "layers", "--json").stdout.strip() == b"[]"
    assert run_cli(store, "tags", "--json").stdout.strip() == b"[]"


def test_registry_gone_mid_pull_then_resumed(tmp_path, registry, pushed) -> None:
    _store, res = pushed
    sizes = layer_bytes(registry, res)
    proxy = Proxy(registry.host, cut_after=sizes[0] + MB)  # mid second layer
    try:
        s2 = tmp_path / "s2"
        proc = run_cli(s2, "pull", f"{proxy.host}/big:two", "--insecure", "-t", "got")
        err = proc.stderr.decode()
        assert proc.returncode == 1, err
        assert len(err.strip().splitlines()) == 1, err
        nothing_committed(s2)
        downloads = sorted(p.name for p in (s2 / "registry/downloads").iterdir())
        assert downloads == sorted([res["layers"][0][7:], res["layers"][1][7:] + ".partial"])
    finally:
        proxy.close()
    # the registry "back": the same blobs, from the registry itself
    proc = run_cli(s2, "pull", f"{registry.host}/big:two", "--insecure", "-t", "got",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    assert again["blobs_resumed"] == 2 and again["layers_fetched"] == 2
    # only what the first pull had not received
    assert again["blob_bytes_received"] <= sum(sizes) - sizes[0] - MB // 2
    assert again["blob_bytes_received"] >= sizes[1] - MB - (256 << 10)
    assert again["digest"] == res["digest"]
    assert run_cli(s2, "tags", "--json").stdout.count(b'"got"') == 1
    assert list((s2 / "registry/downloads").iterdir()) == []
    assert run_cli(s2, "fsck").returncode == 0


def test_pull_killed_mid_download_then_resumed(tmp_path, registry, pushed) -> None:
    _store, res = pushed
    sizes = layer_bytes(registry, res)
    proxy = Proxy(registry.host, rate=2 * MB)  # about 2 s for the image
    try:
        s2 = tmp_path / "s2"
        proc = start_cli(s2, "pull", f"{proxy.host}/big:two", "--insecure", "-t", "got")
        partial = s2 / "registry/downloads" / (res["layers"][0][7:] + ".partial")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if partial.exists() and partial.stat().st_size >= MB:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        have = partial.stat().st_size
        assert MB <= have < sizes[0]
        nothing_committed(s2)
    finally:
        proxy.close()
    proc = run_cli(s2, "pull", f"{registry.host}/big:two", "--insecure", "-t", "got",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    assert again["blobs_resumed"] == 1
    assert again["blob_bytes_received"] <= sum(sizes) - have + 4096  # + the config
    assert again["digest"] == res["digest"]
    assert run_cli(s2, "fsck").returncode == 0


def test_partial_download_damaged_is_refused_and_dropped(tmp_path, registry, pushed) -> None:
    """A partial file whose bytes are wrong: the digest check fails, it is deleted, and
    the pull after that fetches the blob whole."""
    _store, res = pushed
    s2 = tmp_path / "s2"
    assert run_cli(s2, "init").returncode == 0
    area = s2 / "registry/downloads"
    area.mkdir(parents=True)
    (area / (res["layers"][0][7:] + ".partial")).write_bytes(b"\0" * 1000)
    proc = run_cli(s2, "pull", f"{registry.host}/big:two", "--insecure")
    assert proc.returncode == 8 and res["layers"][0] in proc.stderr.decode()
    nothing_committed(s2)
    assert list(area.iterdir()) == []
    proc = run_cli(s2, "pull", f"{registry.host}/big:two", "--insecure", "--json")
    assert proc.returncode == 0, proc.stderr
