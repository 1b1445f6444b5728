"""`FROM` an image in a registry (a real docker-registry, tests/registryutil.py): pulled
into the store first, its config (Env, WorkingDir, User, Cmd, Entrypoint, labels...)
inherited; a tag resolved at the registry on every build, so a moved tag re-runs the
steps after FROM; a digest the store has used without any request; `COPY --from` a
reference; the rule that only names with a registry host or a digest go to the network;
the CLI's registry options; and failures (unreachable registry, unknown tag or digest,
malformed digest) as one line with a non-zero exit.

Needs root, /bin/busybox and mount+PID namespaces (tests/buildutil.py), and
docker-registry."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pylayers import Layers, Store
from pylayers.build.bases import RegistryOptions, is_reference
from pylayers.build.builder import Builder
from pylayers.errors import NotFound
from pylayers.oci import config as image_config
from pylayers.oci.registry_transfer import push_image

sys.path.insert(0, os.path.dirname(__file__))
import registryutil  # noqa: E402
from buildutil import BUSYBOX, needs_build  # noqa: E402

pytestmark = needs_build
registry = registryutil.registry  # the fixture
INSECURE = RegistryOptions(insecure=True)

BASE = ('FROM scratch\nCOPY busybox /bin/busybox\n'
        'RUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
        'RUN mkdir -p /work /tmp && chmod 1777 /work /tmp\n'
        'ENV GREETING=hello PATH=/bin\nWORKDIR /work\nLABEL team=base\nEXPOSE 8080\n'
        'USER 1234:1234\nENTRYPOINT ["/bin/sh", "-c"]\nCMD ["echo base"]\n')


def context(root: Path, dockerfile: str, files: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, root / "busybox")
    for name, text in (files or {}).items():
        (root / name).write_text(text)
    (root / "Dockerfile").write_text(dockerfile)
    return root


def ran(res) -> list[str]:
    return [s.text for s in res.steps if s.layer is not None and not s.cached]


class Stores:
    """A store that builds and pushes base images, and a fresh one that builds FROM them."""

    def __init__(self, tmp: Path, host: str) -> None:
        self.tmp = tmp
        self.host = host
        self.src = Store.open(tmp / "src-store")
        self.dst = Store.open(tmp / "dst-store")
        self.src_layers, self.layers = Layers(self.src), Layers(self.dst)

    def push_base(self, dockerfile: str, ref: str, name: str = "base", **kw) -> str:
        res = Builder(self.src_layers).build(context(self.tmp / name, dockerfile))
        return push_image(self.src_layers, res.layer_id, f"{self.host}/{ref}",
                          insecure=True, **kw).manifest_digest

    def build(self, dockerfile: str, name: str = "app", **kw):
        ctx = context(self.tmp / name, dockerfile, kw.pop("files", None))
        return Builder(self.layers, registry=INSECURE, **kw).build(ctx)

    def files(self, layer: bytes) -> dict[str, bytes]:
        return {e.path.decode(): self.layers.read_file(e) for e in self.layers.tree(layer)
                if e.kind == 1}

    def close(self) -> None:
        self.src.close()
        self.dst.close()


@pytest.fixture
def stores(tmp_path: Path, registry):
    s = Stores(tmp_path, registry.host)
    yield s
    s.close()


def cli(store: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pylayers", "--store", str(store), *args],
                          capture_output=True, text=True, timeout=300, cwd=store.parent)


def test_which_names_are_registry_references() -> None:
    for name in ("127.0.0.1:5000/busybox:1", "localhost/app", "ghcr.io/org/app:v1",
                 "docker.io/library/busybox", "base@sha256:" + "a" * 64,
                 "localhost:5000/a/b@sha256:" + "b" * 64):
        assert is_reference(name), name
    for name in ("base", "app:v2", "team/app:v2", "0123abcd", "my_stage", "busybox:1.36"):
        assert not is_reference(name), name


def test_from_a_tag_pulls_the_base_and_inherits_its_config(stores) -> None:
    stores.push_base(BASE, "base:1", chunks=True)
    app = (f"FROM {stores.host}/base:1\n"
           'RUN echo "$GREETING from $(pwd) as $(id -u)" > out\n'
           'LABEL app=yes\n')
    res = stores.build(app)
    assert ran(res) == ['RUN echo "$GREETING from $(pwd) as $(id -u)" > out']
    assert stores.files(res.layer_id)["work/out"] == b"hello from /work as 1234\n"
    cfg = res.config["config"]
    assert "GREETING=hello" in cfg["Env"] and cfg["WorkingDir"] == "/work"
    assert cfg["User"] == "1234:1234"
    assert cfg["Entrypoint"] == ["/bin/sh", "-c"] and cfg["Cmd"] == ["echo base"]
    assert cfg["Labels"] == {"team": "base", "app": "yes"}
    assert cfg["ExposedPorts"] == {"8080/tcp": {}}
    # the base's layers and history come first: 3 of the base's, then the RUN
    assert len(stores.layers.chain(res.layer_id)) == 4
    assert [h.get("created_by") for h in res.config["history"]
            if not h.get("empty_layer")][-1].startswith("RUN echo")
    # an unchanged rebuild: the tag resolves to the same base, every step cached
    again = stores.build(app)
    assert ran(again) == [] and again.layer_id == res.layer_id


def test_a_moved_tag_reruns_the_steps_after_from(stores) -> None:
    stores.push_base(BASE, "base:1")
    app = f"FROM {stores.host}/base:1\nRUN echo built > /work/out\nCMD [\"x\"]\n"
    first = stores.build(app)
    assert ran(first) == ["RUN echo built > /work/out"]
    stores.push_base(BASE + "RUN echo v2 > /work/version\n", "base:1", name="base2")
    second = stores.build(app)
    assert ran(second) == ["RUN echo built > /work/out"]  # re-run on the new base
    assert second.layer_id != first.layer_id
    assert stores.files(second.layer_id)["work/version"] == b"v2\n"


def test_a_pinned_digest_is_used_without_the_network(stores, registry) -> None:
    digest = stores.push_base(BASE, "base:1")
    app = f"FROM --platform=linux/amd64 {stores.host}/base@{digest}\nRUN echo x > /work/x\n"
    if os.uname().machine != "x86_64":
        app = app.replace("--platform=linux/amd64 ", "")
    first = stores.build(app)
    assert ran(first) == ["RUN echo x > /work/x"]
    registry.stop()  # no registry: the digest is in the store
    again = stores.build(app)
    assert ran(again) == [] and again.layer_id == first.layer_id
    # a tag must be resolved at the registry: with none there, the build fails
    with pytest.raises(Exception, match=r"Dockerfile:1: FROM .*base:1"):
        stores.build(f"FROM {stores.host}/base:1\n")


def test_copy_from_a_reference(stores) -> None:
    stores.push_base(BASE + "RUN echo tool > /work/tool\n", "tools:1")
    res = stores.build(f"FROM scratch\nCOPY --from={stores.host}/tools:1 /work/tool /t\n")
    assert stores.files(res.layer_id) == {"t": b"tool\n"}


def test_a_local_tag_with_a_plain_name_never_goes_to_the_network(stores) -> None:
    with pytest.raises(NotFound, match="no stage, tag or layer"):
        stores.build("FROM busybox:1.36\n")


def test_images_with_the_same_layers_and_other_configs_keep_their_own(stores) -> None:
    """The base's config is the one its digest names, not another image's that ends on
    the same layer."""
    stores.push_base(BASE, "base:1")
    stores.push_base(BASE.replace("GREETING=hello", "GREETING=bonjour"), "base:2",
                     name="base-fr")
    one = stores.build(f"FROM {stores.host}/base:1\nRUN echo $GREETING > /work/g\n")
    two = stores.build(f"FROM {stores.host}/base:2\nRUN echo $GREETING > /work/g\n")
    assert stores.files(one.layer_id)["work/g"] == b"hello\n"
    assert stores.files(two.layer_id)["work/g"] == b"bonjour\n"
    stored = image_config.parse(image_config.load(stores.dst, two.layer_id))
    assert "GREETING=bonjour" in stored["config"]["Env"]


def test_cli_build_from_a_registry_with_its_options(tmp_path, stores) -> None:
    digest = stores.push_base(BASE, "base:1")
    ctx = context(tmp_path / "cli", f"FROM {stores.host}/base:1\nRUN echo hi > /work/hi\n")
    store = tmp_path / "cli-store"
    assert cli(store, "init").returncode == 0
    proc = cli(store, "build", str(ctx), "-t", "app", "--insecure", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["built"] == 1
    # failures are one line, naming the Dockerfile line
    dead = registryutil.free_port()
    cases = [
        (f"FROM 127.0.0.1:{dead}/base:1\n", 1),  # nothing listens there
        (f"FROM {stores.host}/base:nope\n", 3),  # unknown tag
        (f"FROM {stores.host}/base@sha256:{'0' * 64}\n", 3),  # unknown digest
        (f"FROM {stores.host}/base@sha256:abc\n", 2),  # malformed digest
        (f"FROM {stores.host}/nothing-here:1\n", 3),  # unknown repository
    ]
    for text, code in cases:
        (ctx / "Dockerfile").write_text(text)
        proc = cli(store, "build", str(ctx), "--insecure")
        assert proc.returncode == code, (text, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "Dockerfile:1: FROM" in lines[0], lines[0]
    assert digest.startswith("sha256:")
