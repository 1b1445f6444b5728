"""Image configs per image, not per top layer (store format 4): two builds that end on
the same layer with other configs (Dockerfiles differing only in CMD), tagged a and b,
keep their own config through `export` and `push` (and a pull of each into another
store, and `tag` of a tag); a REF naming the layer gets the last image stored on it;
gc keeps every config a tag or a layer names and drops the others.

Needs root, /bin/busybox and mount+PID namespaces (tests/buildutil.py); the push test
needs docker-registry."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pylayers import Layers, Store
from pylayers.oci import config as image_config
from pylayers.oci.registry import RegistryClient

sys.path.insert(0, os.path.dirname(__file__))
import registryutil  # noqa: E402
from buildutil import BUSYBOX, needs_build  # noqa: E402

pytestmark = needs_build
registry = registryutil.registry  # the fixture

BASE = 'FROM scratch\nCOPY busybox /bin/busybox\nLABEL which=base\n'


def cli(store: Path, *args: str, code: int = 0) -> str:
    proc = subprocess.run([sys.executable, "-m", "pylayers", "--store", str(store), *args],
                          capture_output=True, text=True, timeout=300, cwd=store.parent)
    assert proc.returncode == code, proc.stderr
    return proc.stdout


def build_two(tmp_path: Path) -> tuple[Path, str, str]:
    """A store holding tags a and b: the same layers, CMD a and CMD b."""
    store = tmp_path / "store"
    ids = []
    for name in ("a", "b"):
        ctx = tmp_path / f"ctx-{name}"
        ctx.mkdir()
        shutil.copy(BUSYBOX, ctx / "busybox")
        (ctx / "Dockerfile").write_text(BASE + f'CMD ["{name}"]\n')
        ids.append(cli(store, "build", str(ctx), "-t", name).split()[-1])
    return store, ids[0], ids[1]


def pushed_config(registry, repo: str, tag: str) -> dict:
    with RegistryClient(f"{registry.host}/{repo}:{tag}", insecure=True) as client:
        _mt, data, _digest = client.get_manifest(tag)
    digest = json.loads(data)["config"]["digest"]
    return json.loads(registry.get(f"/v2/{repo}/blobs/{digest}"))


def exported_config(layout: Path, digest: str) -> dict:
    manifest = json.loads((layout / "blobs/sha256" / digest[7:]).read_bytes())
    return json.loads((layout / "blobs/sha256" / manifest["config"]["digest"][7:]).read_bytes())


def test_two_builds_on_one_layer_export_their_own_configs(tmp_path: Path) -> None:
    store, a, b = build_two(tmp_path)
    assert a == b  # CMD makes no layer: both images end on the same one
    out = tmp_path / "layout"
    got = {}
    for name in ("a", "b"):
        digest = cli(store, "export", name, f"oci:{out}:{name}").strip()
        got[name] = exported_config(out, digest)["config"]["Cmd"]
    assert got == {"a": ["a"], "b": ["b"]}
    # the layer id itself names the image stored last on it (b)
    digest = cli(store, "export", a, f"oci:{out}:by-id").strip()
    assert exported_config(out, digest)["config"]["Cmd"] == ["b"]
    # `tag` of a tag names the same image; of a layer id, the layer's
    cli(store, "tag", "a2", "a")
    digest = cli(store, "export", "a2", f"oci:{out}:a2").strip()
    assert exported_config(out, digest)["config"]["Cmd"] == ["a"]
    # a tag moved by a command that has no config no longer claims a's
    cli(store, "tag", "a2", a)
    digest = cli(store, "export", "a2", f"oci:{out}:a2").strip()
    assert exported_config(out, digest)["config"]["Cmd"] == ["b"]
    # FROM a tag inherits that tag's config
    ctx = tmp_path / "ctx-from"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM a\nLABEL child=yes\n")
    cli(store, "build", str(ctx), "-t", "child")
    digest = cli(store, "export", "child", f"oci:{out}:child").strip()
    assert exported_config(out, digest)["config"]["Cmd"] == ["a"]


def test_gc_keeps_the_configs_tags_and_layers_name(tmp_path: Path) -> None:
    store, a, _b = build_two(tmp_path)
    with Store.open(store) as st:
        with st.read() as t:
            assert len(list(t.image_configs.digests())) == 2
    cli(store, "gc")
    with Store.open(store) as st:
        with st.read() as t:
            assert len(list(t.image_configs.digests())) == 2  # a's (tag), b's (tag, layer)
    cli(store, "rm", "a")
    out = json.loads(cli(store, "gc", "--json"))
    assert out["image_configs"] == 1  # a's: no tag or layer names it now
    with Store.open(store) as st:
        lid, cfg = image_config.for_ref(Layers(st), "b")
        assert lid.hex() == a and json.loads(cfg)["config"]["Cmd"] == ["b"]
        with st.read() as t:
            assert len(list(t.image_configs.digests())) == 1


def test_two_builds_on_one_layer_push_their_own_configs(tmp_path: Path, registry) -> None:
    store, _a, _b = build_two(tmp_path)
    for name in ("a", "b"):
        cli(store, "push", name, f"{registry.host}/img:{name}", "--insecure")
    # another store pulls both: each tag gets its own config again
    other = tmp_path / "other"
    for name in ("a", "b"):
        cli(other, "pull", f"{registry.host}/img:{name}", "-t", name, "--insecure")
    for name in ("a", "b"):
        assert pushed_config(registry, "img", name)["config"]["Cmd"] == [name]
        with Store.open(other) as st:
            _lid, stored = image_config.for_ref(Layers(st), name)
        assert json.loads(stored)["config"]["Cmd"] == [name]
    # and a re-push of each (known blobs, no export) still sends its own config
    for name in ("a", "b"):
        cli(store, "push", name, f"{registry.host}/again:{name}", "--insecure")
        assert pushed_config(registry, "again", name)["config"]["Cmd"] == [name]


@pytest.mark.parametrize("dest", ["docker-archive"])
def test_docker_archive_export_carries_the_tags_config(tmp_path: Path, dest: str) -> None:
    store, _a, _b = build_two(tmp_path)
    for name in ("a", "b"):
        archive = tmp_path / f"{name}.tar"
        cli(store, "export", name, f"{dest}:{archive}")
        work = tmp_path / f"x-{name}"
        work.mkdir()
        subprocess.run(["tar", "-xf", str(archive), "-C", str(work)], check=True)
        entry = json.loads((work / "manifest.json").read_text())[0]
        assert json.loads((work / entry["Config"]).read_text())["config"]["Cmd"] == [name]
