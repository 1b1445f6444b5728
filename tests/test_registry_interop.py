"""Registry interop with independent clients, through a real docker-registry: an image
pushed by pylayers is copied out by skopeo and unpacked by umoci, and an image made by
umoci and pushed by skopeo is pulled and checked out by pylayers; the trees compared
entry by entry (type, mode, owner, size, mtime, content, xattrs, hardlinks). The image
is test_oci_interop's: a busybox-static rootfs, then a layer deleting, replacing and
recreating entries (whiteouts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))

import registryutil  # noqa: E402
import test_oci_interop as interop  # noqa: E402
from treeutil import run_cli  # noqa: E402

registry = registryutil.registry  # the fixtures
umoci_image = interop.umoci_image


def test_pushed_by_pylayers_copied_by_skopeo_unpacked_by_umoci(tmp_path, registry,
                                                               umoci_image) -> None:
    interop.need("skopeo", "umoci")
    store = tmp_path / "store"
    proc = run_cli(store, "import", f"oci:{umoci_image}:bb", "-t", "bb")
    assert proc.returncode == 0, proc.stderr
    assert run_cli(store, "checkout", "bb", tmp_path / "co").returncode == 0
    proc = run_cli(store, "push", "bb", f"{registry.host}/interop/bb:v1", "--insecure",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    pushed = json.loads(proc.stdout)
    out = tmp_path / "copied"
    interop.run("skopeo", "copy", "--src-tls-verify=false",
                f"docker://{registry.host}/interop/bb:v1", f"oci:{out}:v1")
    # skopeo kept the manifest as it was: the same digest
    index = json.loads((out / "index.json").read_text())
    assert index["manifests"][0]["digest"] == pushed["digest"]
    interop.run("umoci", "unpack", "--image", f"{out}:v1", tmp_path / "unpacked")
    interop.same(tmp_path / "co", tmp_path / "unpacked/rootfs")


def test_made_by_umoci_pushed_by_skopeo_pulled_by_pylayers(tmp_path, registry,
                                                           umoci_image) -> None:
    interop.need("skopeo", "umoci")
    interop.run("skopeo", "copy", "--dest-tls-verify=false", f"oci:{umoci_image}:bb",
                f"docker://{registry.host}/umoci/bb:latest")
    store = tmp_path / "store"
    proc = run_cli(store, "pull", f"{registry.host}/umoci/bb", "--insecure", "-t", "bb",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    pulled = json.loads(proc.stdout)
    assert len(pulled["layers"]) == 2 and pulled["layers_fetched"] == 2
    assert run_cli(store, "checkout", "bb", tmp_path / "co").returncode == 0
    interop.run("umoci", "unpack", "--image", f"{umoci_image}:bb", tmp_path / "ref")
    interop.same(tmp_path / "ref/rootfs", tmp_path / "co")
    # the same layers as importing the layout directly
    proc = run_cli(tmp_path / "s2", "import", f"oci:{umoci_image}:bb")
    assert proc.stdout.decode().split() == pulled["layers"]
    # skopeo's docker v2 manifest (it converts when asked): read as well
    interop.run("skopeo", "copy", "--dest-tls-verify=false", "--format", "v2s2",
                f"oci:{umoci_image}:bb", f"docker://{registry.host}/umoci/bb:v2s2")
    proc = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                           f"docker://{registry.host}/umoci/bb:v2s2"],
                          capture_output=True, text=True)
    assert "vnd.docker.distribution.manifest.v2+json" in proc.stdout
    proc = run_cli(tmp_path / "s3", "pull", f"{registry.host}/umoci/bb:v2s2", "--insecure",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["layers"] == pulled["layers"]
