"""`ctr image pull --snapshotter pylayers` from a real registry: a busybox image (umoci,
busybox-static) imported into a pylayers store, pushed with `pylayers push --insecure`
to Debian's docker-registry on 127.0.0.1, pulled by containerd over plain HTTP onto the
pylayers snapshotter and run. Reuses test_containerd_e2e's containerd and snapshotter
(`env`) and registryutil's registry; each part skips with the reason when missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("grpc", reason="grpcio is not installed (pip install '.[test]')")

sys.path.insert(0, os.path.dirname(__file__))

import registryutil  # noqa: E402
import test_containerd_e2e  # noqa: E402
from test_containerd_e2e import need_runc, umoci_image  # noqa: E402

registry = registryutil.registry  # the fixtures
env = test_containerd_e2e.env

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def pylayers(store: Path, *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "pylayers", "--store", str(store), *args],
                         capture_output=True, text=True, cwd=store.parent)
    assert res.returncode == 0, f"pylayers {' '.join(args)}: {res.stderr}"
    assert "Traceback" not in res.stderr
    return res.stdout


def registry_json(registry: registryutil.Registry, path: str, accept: str) -> dict:
    req = urllib.request.Request(registry.url(path), headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_ctr_pull_from_registry_pushed_by_pylayers(env, registry, tmp_path):
    """pylayers push -> docker-registry -> ctr image pull --plain-http onto pylayers ->
    ctr run prints; the pulled layer is committed in the snapshotter under its chain id
    (the image's one diffID), as containerd and pylayers' own view both say."""
    need_runc()
    image = umoci_image(tmp_path, "pushed", {"etc/motd": b"pulled from the registry\n"})
    layout = tmp_path / "pushed-oci"
    assert image.exists() and (layout / "index.json").exists()
    src = tmp_path / "src-store"
    pylayers(src, "import", f"oci:{layout}:latest", "-t", "bb")
    ref = f"{registry.host}/pylayers/busybox:v1"
    digest = pylayers(src, "push", "bb", ref, "--insecure").strip()
    assert digest.startswith("sha256:")

    manifest = registry_json(registry, f"/v2/pylayers/busybox/manifests/{digest}",
                             OCI_MANIFEST)
    assert len(manifest["layers"]) == 1
    config = registry_json(registry,
                           f"/v2/pylayers/busybox/blobs/{manifest['config']['digest']}",
                           "*/*")
    (diff_id,) = config["rootfs"]["diff_ids"]  # one layer: its chain id is its diffID

    before = env.agree()
    assert diff_id not in before
    env.ctr("image", "pull", "--plain-http", "--snapshotter", "pylayers", ref)
    images = env.ctr("images", "ls").stdout
    assert ref in images and digest in images, images
    # the pull itself unpacked onto pylayers (before any run could unpack it)
    pulled = env.agree()  # `ctr snapshots ls` == the store's own walk
    assert {k: v for k, v in pulled.items() if k not in before} == {
        diff_id: ("", "committed")}, pulled

    res = env.ctr("run", "--snapshotter", "pylayers", "--rm", ref, "pulled",
                  "cat", "/etc/motd")
    assert res.stdout == "pulled from the registry\n", (res.stdout, res.stderr)
    res = env.ctr("run", "--snapshotter", "pylayers", "--rm", ref, "pulled2",
                  "echo", "hi")
    assert res.stdout.strip() == "hi"

    assert env.agree() == pulled  # the runs' snapshots went with --rm
    # the layer's bytes went into the pylayers store, busybox among them
    assert env.own_usage(diff_id) >= Path("/bin/busybox").stat().st_size
    assert "Traceback" not in env.server.log
