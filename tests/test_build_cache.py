"""`pylayers build`: the build context and the cache across machines. `.dockerignore`,
keys that hold across umasks and checkout times with `COPY --chmod`, the same layer ids
with both snapshot drivers and in two stores, the same exported image digest, the image
config, and a 200-instruction Dockerfile whose result mounts with the overlay driver.

Needs root, /bin/busybox and mount+PID namespaces (as tests/test_build.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pylayers import Layers, Store
from pylayers.build.builder import Builder
from pylayers.mounts import Snapshotter, mount_all, unmount
from pylayers.mounts.registry import DRIVERS
from pylayers.oci import export_image

sys.path.insert(0, os.path.dirname(__file__))
from buildutil import BUSYBOX, BUSYBOX_BASE, needs_build  # noqa: E402

pytestmark = needs_build

BASE = BUSYBOX_BASE


class Run:
    def __init__(self, path: Path, driver: str | None = None) -> None:
        self.store = Store.open(path)
        self.layers = Layers(self.store)
        self.driver = driver

    def build(self, ctx: Path, **kw):
        return Builder(self.layers, driver=self.driver).build(ctx, **kw)

    def files(self, layer: bytes) -> dict[str, bytes]:
        return {e.path.decode(): self.layers.read_file(e) for e in self.layers.tree(layer)
                if e.kind == 1}

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def run(tmp_path: Path):
    r = Run(tmp_path / "store")
    yield r
    r.close()


def ran(res) -> list[str]:
    return [s.text for s in res.steps if s.layer is not None and not s.cached]


def make_context(root: Path, dockerfile: str, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, root / "busybox")
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    (root / "Dockerfile").write_text(dockerfile)
    return root


def test_dockerignore_patterns_exceptions_and_doublestar(run, tmp_path):
    ctx = make_context(tmp_path / "ctx", BASE + "COPY . /ctx/\n", {
        "app/main.c": "int main;", "app/debug.log": "x", "deep/a/b/c.tmp": "t",
        "deep/a/keep.txt": "k", "secret/key": "s", "secret/keep.pub": "p",
        ".dockerignore": "*.log\n**/*.log\n**/*.tmp\nsecret\n!secret/*.pub\nDockerfile\n"})
    res = run.build(ctx)
    got = sorted(p for p in run.files(res.layer_id) if p.startswith("ctx/"))
    assert got == ["ctx/.dockerignore", "ctx/app/main.c", "ctx/busybox",
                   "ctx/deep/a/keep.txt", "ctx/secret/keep.pub"]
    # an ignored file changing or appearing keeps the COPY cached
    (ctx / "app" / "debug.log").write_text("changed")
    (ctx / "app" / "new.log").write_text("new")
    (ctx / "secret" / "key").write_text("other")
    assert ran(run.build(ctx)) == []
    # a .dockerignore change that brings a file in misses, naming the file
    (ctx / ".dockerignore").write_text("*.log\n**/*.log\nsecret\n!secret/*.pub\nDockerfile\n")
    res = run.build(ctx, explain=True)
    step = next(s for s in res.steps if s.text == "COPY . /ctx/")
    assert not step.cached
    assert "deep/a/b/c.tmp: file added" in step.explanation
    assert "ctx/deep/a/b/c.tmp" in run.files(res.layer_id)


def test_copy_sources_wildcards_files_and_directories(run, tmp_path):
    ctx = make_context(tmp_path / "ctx", BASE + "WORKDIR /w\nCOPY *.txt sub/ dest/\n"
                       "COPY one.txt renamed\nCOPY --chmod=0600 --chown=7:8 one.txt /abs/\n"
                       "ADD arch.tar /unpacked/\n",
                       {"one.txt": "1", "two.txt": "2", "three.md": "3",
                        "sub/inner/x": "x"})
    subprocess.run(["tar", "-C", str(ctx / "sub"), "-cf", str(ctx / "arch.tar"), "inner"],
                   check=True)
    res = run.build(ctx)
    files = run.files(res.layer_id)
    assert files["w/dest/one.txt"] == b"1" and files["w/dest/two.txt"] == b"2"
    assert "w/dest/three.md" not in files
    assert files["w/dest/inner/x"] == b"x"  # a directory's contents, not itself
    assert files["w/renamed"] == b"1"
    assert files["unpacked/inner/x"] == b"x"
    tree = {e.path: e for e in run.layers.tree(res.layer_id)}
    e = tree[b"abs/one.txt"]
    assert (e.mode, e.uid, e.gid) == (0o600, 7, 8)
    assert tree[b"w/dest/one.txt"].uid == 0


def test_copy_errors_name_the_line(run, tmp_path):
    from pylayers.errors import InvalidArgument, NotFound
    ctx = make_context(tmp_path / "ctx", BASE + "COPY nothing-here /x\n", {})
    with pytest.raises(NotFound, match="nothing-here"):
        run.build(ctx)
    (ctx / "Dockerfile").write_text(BASE + "COPY busybox Dockerfile /notadir\n")
    with pytest.raises(InvalidArgument, match="Dockerfile:4:.*ending in /"):
        run.build(ctx)
    # as BuildKit: a source is cleaned and rooted at the context, never above it
    (ctx / "Dockerfile").write_text(BASE + "COPY ../../etc/passwd /x\n")
    with pytest.raises(NotFound, match="passwd"):
        run.build(ctx)
    os.symlink("/etc", ctx / "etc-link")
    (ctx / "Dockerfile").write_text(BASE + "COPY etc-link/passwd /x\n")
    with pytest.raises(InvalidArgument, match="symlink leading out of the build context"):
        run.build(ctx)


def _checkout(src: Path, dst: Path, umask: int, when: int) -> None:
    """A checkout of `src` as git would make it under `umask`, at time `when`."""
    old = os.umask(umask)
    try:
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src)
            if path.is_dir():
                (dst / rel).mkdir(parents=True, exist_ok=True)
            else:
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(dst / rel, os.O_WRONLY | os.O_CREAT, 0o777 if os.access(
                    path, os.X_OK) else 0o666)
                os.write(fd, path.read_bytes())
                os.close(fd)
        for path in dst.rglob("*"):
            os.utime(path, (when, when))
    finally:
        os.umask(old)


def test_two_umasks_and_checkout_times_give_all_copy_hits_with_chmod(tmp_path):
    base = BASE.replace("COPY busybox", "COPY --chmod=0755 busybox")
    src = make_context(tmp_path / "src", base + "COPY --chmod=0644 app/ /app/\n"
                       "COPY --chmod=0755 tool.sh /usr/bin/tool\n",
                       {"app/a.py": "a", "app/lib/b.py": "b", "tool.sh": "#!/bin/sh\n"})
    (src / "tool.sh").chmod(0o755)
    r = Run(tmp_path / "store")
    try:
        first = Path(tempfile.mkdtemp(dir=tmp_path))
        _checkout(src, first, 0o022, 1_600_000_000)
        res1 = r.build(first)
        second = Path(tempfile.mkdtemp(dir=tmp_path))
        _checkout(src, second, 0o002, 1_700_000_000)
        assert (second / "app" / "a.py").stat().st_mode & 0o777 == 0o664
        res2 = r.build(second)
        copies = [s for s in res2.steps if s.text.startswith("COPY")]
        assert copies and all(s.cached for s in copies)  # 100% COPY hits
        assert res2.layer_id == res1.layer_id
        # without --chmod the mode is an input: the same two checkouts miss
        for d in (first, second):
            (d / "Dockerfile").write_text(base + "COPY app/ /app/\n")
        r.build(first)
        res3 = r.build(second, explain=True)
        step = next(s for s in res3.steps if s.text == "COPY app/ /app/")
        assert not step.cached and "mode 0644 -> 0664" in step.explanation
    finally:
        r.close()


DOCKERFILE = BASE + """\
ENV PATH=/bin APP=demo
ARG VERSION=1.0
LABEL org.example.version=$VERSION
WORKDIR /srv
COPY site/ ./
RUN echo "$APP $VERSION" > build-info && mkdir -p /var/data
USER 1000:1000
EXPOSE 8080 53/udp
VOLUME /var/data
ENTRYPOINT ["/bin/httpd", "-f"]
CMD ["-p", "8080"]
"""


def test_same_layers_with_both_drivers_and_same_image_digest_in_two_stores(tmp_path):
    if DRIVERS["overlay"].unavailable():
        pytest.skip(f"overlay driver: {DRIVERS['overlay'].unavailable()}")
    out = []
    for i, driver in enumerate(("overlay", "copy")):
        ctx = make_context(tmp_path / f"ctx{i}", DOCKERFILE, {"site/index.html": "<p>"})
        os.utime(ctx / "site" / "index.html", (1000 + i, 1000 + i))
        r = Run(tmp_path / f"store{i}", driver)
        try:
            res = r.build(ctx, source_date_epoch=1_700_000_000)
            exp = export_image(r.layers, res.layer_id, f"oci:{tmp_path / f'img{i}'}:x",
                               "none", 1_700_000_000)
            out.append(([s.layer for s in res.steps], exp.manifest_digest,
                        exp.config_digest))
        finally:
            r.close()
    assert out[0] == out[1]


def test_image_config_exported(run, tmp_path):
    ctx = make_context(tmp_path / "ctx", DOCKERFILE, {"site/index.html": "<p>"})
    res = run.build(ctx, build_args={"VERSION": "2.5"})
    img = tmp_path / "img"
    exp = export_image(run.layers, res.layer_id, f"oci:{img}:x", "gzip")
    cfg = json.loads((img / "blobs" / "sha256" / exp.config_digest[7:]).read_bytes())
    c = cfg["config"]
    assert c["Env"] == ["PATH=/bin", "APP=demo"]
    assert c["Labels"] == {"org.example.version": "2.5"}
    assert c["WorkingDir"] == "/srv" and c["User"] == "1000:1000"
    assert c["ExposedPorts"] == {"8080/tcp": {}, "53/udp": {}}
    assert c["Volumes"] == {"/var/data": {}}
    assert c["Entrypoint"] == ["/bin/httpd", "-f"] and c["Cmd"] == ["-p", "8080"]
    assert cfg["os"] == "linux" and "created" not in cfg
    hist = cfg["history"]
    assert len(hist) == 13
    assert [h["created_by"] for h in hist if not h.get("empty_layer")] == [
        "COPY busybox /bin/busybox", 'RUN ["/bin/busybox", "--install", "-s", "/bin"]',
        "WORKDIR /srv", "COPY site/ ./",
        'RUN echo "$APP $VERSION" > build-info && mkdir -p /var/data']
    assert len(cfg["rootfs"]["diff_ids"]) == 5
    files = {e.path: e for e in run.layers.tree(res.layer_id)}
    assert run.layers.read_file(files[b"srv/build-info"]) == b"demo 2.5\n"


def test_from_a_tagged_layer_inherits_its_config(run, tmp_path):
    ctx = make_context(tmp_path / "ctx", DOCKERFILE, {"site/index.html": "<p>"})
    run.build(ctx, tags=("web",))
    (ctx / "Dockerfile").write_text("FROM web\nRUN id -u; echo $APP; pwd\nCMD [\"x\"]\n")
    out = bytearray()
    res = Builder(run.layers, on_output=out.extend).build(ctx)
    assert out.decode().split() == ["1000", "demo", "/srv"]  # USER, ENV, WORKDIR carried
    from pylayers.oci import config as image_config
    cfg = json.loads(image_config.load(run.store, res.layer_id))
    assert cfg["config"]["Entrypoint"] == ["/bin/httpd", "-f"]
    assert cfg["config"]["Cmd"] == ["x"]
    assert sum(1 for h in cfg["history"] if not h.get("empty_layer")) == 6


def test_two_hundred_instructions_build_and_mount_with_overlay(run, tmp_path):
    if DRIVERS["overlay"].unavailable():
        pytest.skip(f"overlay driver: {DRIVERS['overlay'].unavailable()}")
    lines = [BASE.rstrip("\n")]
    for i in range(197):
        lines.append(f"COPY f{i % 7} /data/f{i:03d}")
    lines.append("RUN ls /data | wc -l > /count")
    ctx = make_context(tmp_path / "ctx", "\n".join(lines) + "\n",
                       {f"f{i}": str(i) for i in range(7)})
    res = run.build(ctx, tags=("deep",))
    assert len(run.layers.chain(res.layer_id)) == 200
    snaps = Snapshotter(run.layers, "overlay")
    mounts = snaps.view("deep-view", "deep")
    target = tmp_path / "mnt"
    target.mkdir()
    mount_all(mounts, target)
    try:
        assert (target / "count").read_text().strip() == "197"
        assert (target / "data" / "f196").read_text() == str(196 % 7)
    finally:
        unmount(target)
        snaps.remove("deep-view")


def test_a_stage_without_files_of_its_own_never_replaces_its_base_config(run, tmp_path):
    from pylayers.oci import config as image_config
    ctx = make_context(tmp_path / "ctx", DOCKERFILE, {"site/index.html": "<p>"})
    web = run.build(ctx, tags=("web",)).layer_id
    before = image_config.load(run.store, web)
    (ctx / "Dockerfile").write_text('FROM web\nCMD ["other"]\n')
    res = run.build(ctx, tags=("other",))
    assert image_config.load(run.store, web) == before
    assert res.layer_id != web and run.layers.record(res.layer_id).parent == web
    assert run.layers.entries(res.layer_id) == []
    cfg = json.loads(image_config.load(run.store, res.layer_id))
    assert cfg["config"]["Cmd"] == ["other"]
    assert sum(1 for h in cfg["history"] if not h.get("empty_layer")) == \
        len(run.layers.chain(res.layer_id))
    assert run.build(ctx).layer_id == res.layer_id  # cached, the same id
