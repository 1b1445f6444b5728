"""`pylayers build` end to end, on a busybox-static rootfs built FROM scratch: steps run
in real mounted snapshots and namespaces, cached by key, committed as layers.

Needs root (the steps mount), /bin/busybox (Debian: busybox-static) and mount+PID
namespaces; each test skips with the reason when one is missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pylayers import Layers, Store
from pylayers.build.builder import Builder, StepFailed
from pylayers.mounts import Kind, Snapshotter

sys.path.insert(0, os.path.dirname(__file__))
from buildutil import BUSYBOX, needs_build  # noqa: E402

pytestmark = needs_build

MULTI = """\
# syntax=docker/dockerfile:1
FROM scratch AS base
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
ENV GREETING=hello

FROM base AS build
ARG FLAVOUR=plain
WORKDIR /src
COPY src/ ./
RUN cat a.txt b.txt > out.txt && echo "$GREETING $FLAVOUR" >> out.txt
RUN echo built > /src/stamp

FROM base
COPY --from=build /src/out.txt /app/out.txt
CMD ["cat", "/app/out.txt"]
"""


def context(tmp_path: Path, dockerfile: str = MULTI) -> Path:
    ctx = tmp_path / "ctx"
    (ctx / "src").mkdir(parents=True)
    shutil.copy(BUSYBOX, ctx / "busybox")
    (ctx / "src" / "a.txt").write_text("a\n")
    (ctx / "src" / "b.txt").write_text("b\n")
    (ctx / "Dockerfile").write_text(dockerfile)
    return ctx


def cli(store: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pylayers", "--store", str(store), *args],
                          capture_output=True, text=True, timeout=300, cwd=store.parent)


class Run:
    def __init__(self, store_path: Path) -> None:
        self.store = Store.open(store_path)
        self.layers = Layers(self.store)
        self.output = bytearray()

    def build(self, ctx: Path, **kw):
        b = Builder(self.layers, on_output=self.output.extend)
        return b.build(ctx, **kw)

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def run(tmp_path: Path):
    r = Run(tmp_path / "store")
    yield r
    r.close()


def ran(res) -> list[str]:
    """The instructions of the steps that ran (not cached), layer steps only."""
    return [s.text for s in res.steps if s.layer is not None and not s.cached]


def cached(res) -> list[str]:
    return [s.text for s in res.steps if s.layer is not None and s.cached]


def test_multi_stage_first_build_runs_everything_and_rebuild_is_all_cached(run, tmp_path):
    ctx = context(tmp_path)
    first = run.build(ctx, tags=("app",))
    assert ran(first) == ["COPY busybox /bin/busybox",
                          'RUN ["/bin/busybox", "--install", "-s", "/bin"]',
                          "WORKDIR /src", "COPY src/ ./",
                          'RUN cat a.txt b.txt > out.txt && echo "$GREETING $FLAVOUR" >> '
                          "out.txt",
                          "RUN echo built > /src/stamp",
                          "COPY --from=build /src/out.txt /app/out.txt"]
    assert cached(first) == []
    assert run.layers.resolve("app") == first.layer_id
    tree = {e.path: e for e in run.layers.tree(first.layer_id)}
    assert run.layers.read_file(tree[b"app/out.txt"]) == b"a\nb\nhello plain\n"
    # the final stage holds only what it copied from the build stage
    assert b"src" not in tree and b"src/stamp" not in tree and b"src/a.txt" not in tree
    assert b"bin/busybox" in tree and tree[b"bin/sh"].target == b"/bin/busybox"
    # no trace of the step's /proc, /dev mounts
    assert b"proc" not in tree and b"dev" not in tree

    again = run.build(ctx)
    assert ran(again) == [] and len(cached(again)) == 7
    assert again.layer_id == first.layer_id
    assert [s.layer for s in again.steps] == [s.layer for s in first.steps]


def test_touch_keeps_copy_cached_and_an_edit_reruns_from_copy_on(run, tmp_path):
    ctx = context(tmp_path)
    first = run.build(ctx)
    os.utime(ctx / "src" / "a.txt", ns=(5 * 10**9, 5 * 10**9))
    os.utime(ctx / "busybox")
    touched = run.build(ctx)
    assert ran(touched) == [] and touched.layer_id == first.layer_id

    (ctx / "src" / "a.txt").write_text("A\n")
    edited = run.build(ctx, explain=True)
    assert ran(edited) == ["COPY src/ ./",
                           'RUN cat a.txt b.txt > out.txt && echo "$GREETING $FLAVOUR" >> '
                           "out.txt",
                           "RUN echo built > /src/stamp",
                           "COPY --from=build /src/out.txt /app/out.txt"]
    assert cached(edited) == ["COPY busybox /bin/busybox",
                              'RUN ["/bin/busybox", "--install", "-s", "/bin"]',
                              "WORKDIR /src"]
    copy = next(s for s in edited.steps if s.text == "COPY src/ ./")
    assert "src/a.txt: content changed" in copy.explanation
    tree = {e.path: e for e in run.layers.tree(edited.layer_id)}
    assert run.layers.read_file(tree[b"app/out.txt"]) == b"A\nb\nhello plain\n"


def test_build_arg_value_counts_for_run_and_is_explained(run, tmp_path):
    ctx = context(tmp_path)
    run.build(ctx)
    res = run.build(ctx, build_args={"FLAVOUR": "spicy"}, explain=True)
    assert ran(res)[0].startswith("RUN cat a.txt")
    step = next(s for s in res.steps if s.text.startswith("RUN cat"))
    assert 'option arg:FLAVOUR: "plain" -> "spicy"' in step.explanation
    tree = {e.path: e for e in run.layers.tree(res.layer_id)}
    assert run.layers.read_file(tree[b"app/out.txt"]).endswith(b"hello spicy\n")


def test_same_context_same_layer_ids_in_another_store(tmp_path):
    ids = []
    for name in ("one", "two"):
        ctx = context(tmp_path / name)
        os.utime(ctx / "src" / "a.txt", ns=(len(name) * 10**9, 10**9 * 7))
        r = Run(tmp_path / name / "store")
        try:
            ids.append([s.layer for s in r.build(ctx).steps])
        finally:
            r.close()
    assert ids[0] == ids[1]


def test_failing_run_reports_output_and_exit_code_and_leaves_no_active_snapshot(
        run, tmp_path):
    ctx = context(tmp_path, "FROM scratch\nCOPY busybox /bin/busybox\n"
                            'RUN ["/bin/busybox", "sh", "-c", "echo oops-output; exit 7"]\n')
    with pytest.raises(StepFailed) as ei:
        run.build(ctx)
    assert ei.value.step_exit_code == 7
    assert "oops-output" in str(ei.value) and "exit code 7" in str(ei.value)
    assert "Dockerfile:3" in str(ei.value)
    snaps = Snapshotter(run.layers)
    assert [i.key for i in snaps.walk() if i.kind != Kind.COMMITTED] == []
    assert not any(Path(run.store.path, "snapshots").iterdir()) \
        if Path(run.store.path, "snapshots").exists() else True


def test_cli_build_and_history(tmp_path):
    ctx = context(tmp_path)
    store = tmp_path / "store"
    res = cli(store, "build", str(ctx), "-t", "app", "-t", "app2")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    final = lines[-1]
    assert len(final) == 64
    assert any(line.startswith("[base 2/4] COPY busybox /bin/busybox") for line in lines)
    res = cli(store, "build", str(ctx), "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["id"] == final and doc["built"] == 0 and doc["cached"] == 7
    assert all(s["cached"] for s in doc["steps"] if s["layer"])
    assert "CACHED" in res.stderr
    hist = cli(store, "history", "app", "--json")
    assert hist.returncode == 0, hist.stderr
    rows = json.loads(hist.stdout)
    assert [r["created_by"] for r in rows] == [
        "COPY --from=build /src/out.txt /app/out.txt",
        'RUN ["/bin/busybox", "--install", "-s", "/bin"]', "COPY busybox /bin/busybox"]
    assert rows[2]["file_bytes"] == BUSYBOX.stat().st_size
    assert 0 < rows[2]["new_bytes"]
    text = cli(store, "history", "app")
    assert text.returncode == 0 and "COPY busybox /bin/busybox" in text.stdout


def test_cli_failing_run_exit_status_and_one_line(tmp_path):
    ctx = context(tmp_path, "FROM scratch\nCOPY busybox /bin/busybox\n"
                            "RUN [\"/bin/busybox\", \"false\"]\n")
    res = cli(tmp_path / "store", "build", str(ctx))
    assert res.returncode == 1
    assert "exit code 1" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_cli_bad_dockerfile_is_exit_6_naming_the_line(tmp_path):
    ctx = context(tmp_path, "FROM scratch\nCOPY busybox /bin/busybox\nFROBNICATE x\n")
    res = cli(tmp_path / "store", "build", str(ctx))
    assert res.returncode == 6
    assert res.stderr.strip() == "pylayers: Dockerfile:3: unknown instruction 'FROBNICATE'"


def test_killed_build_leaves_nothing_running_and_the_next_build_cleans_up(tmp_path):
    ctx = context(tmp_path, "FROM scratch\nCOPY busybox /bin/busybox\n"
                            'RUN ["/bin/busybox", "sh", "-c", "echo started; exec sleep 60"]\n')
    store = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "pylayers", "--store", str(store), "build",
                             str(ctx)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == "started":
            break
    proc.kill()
    proc.wait()
    with Store.open(store) as st:
        left = [i for i in Snapshotter(Layers(st)).walk() if i.kind != Kind.COMMITTED]
    assert len(left) == 1  # the killed step's snapshot, still mounted
    target = left[0].labels["pylayers.build.target"]
    mounted = Path("/proc/self/mountinfo").read_text()
    assert target in mounted
    # the step's processes died with the build
    for _ in range(50):
        busy = subprocess.run(["pgrep", "-f", "exec sleep 60"], capture_output=True)
        if busy.returncode:
            break
        time.sleep(0.1)
    assert busy.returncode == 1, busy.stdout

    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY busybox /bin/busybox\n")
    res = cli(store, "build", str(ctx))
    assert res.returncode == 0, res.stderr
    with Store.open(store) as st:
        assert [i for i in Snapshotter(Layers(st)).walk() if i.kind != Kind.COMMITTED] == []
    assert target not in Path("/proc/self/mountinfo").read_text()
    assert not os.path.exists(target)


def test_target_builds_only_up_to_that_stage(run, tmp_path):
    ctx = context(tmp_path)
    res = run.build(ctx, target="build")
    assert {s.stage for s in res.steps} == {"base", "build"}
    files = {e.path for e in run.layers.tree(res.layer_id)}
    assert b"src/stamp" in files and b"app/out.txt" not in files
    from pylayers.errors import NotFound
    with pytest.raises(NotFound, match="--target 'nope'"):
        run.build(ctx, target="nope")


def test_cli_refusals_are_one_line_with_their_exit_codes(tmp_path):
    ctx = context(tmp_path)
    store = tmp_path / "store"
    cases = [
        (["build", str(tmp_path / "missing")], 6, "is not a directory"),
        (["build", "-f", str(tmp_path / "none"), str(ctx)], 3, "no such Dockerfile"),
        (["build", "--build-arg", "=x", str(ctx)], 2, "NAME=VALUE"),
        (["build", "-t", "bad tag!", str(ctx)], 2, "tag"),
        (["build", "--target", "nope", str(ctx)], 3, "nope"),
        (["history", "nothing-here"], 3, "nothing-here"),
    ]
    (ctx / "latin1").write_bytes(b"FROM scratch\nLABEL x=\xe9\n")
    cases.append((["build", "-f", str(ctx / "latin1"), str(ctx)], 6, "not UTF-8"))
    cli(store, "build", str(ctx), "--target", "base")  # the store exists for `history`
    for args, code, says in cases:
        res = cli(store, *args)
        assert res.returncode == code, (args, res.stderr)
        assert says in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, (args, res.stderr)


def test_moving_a_rarely_changing_step_above_a_frequent_one_keeps_it_cached(run, tmp_path):
    ctx = context(tmp_path, "")
    (ctx / "deps").mkdir()
    (ctx / "deps" / "lib.txt").write_text("a library\n")
    base = 'FROM scratch\nCOPY busybox /bin/busybox\n'
    frequent, rare = "COPY src/ /app/src/\n", "COPY deps/ /app/deps/\n"
    (ctx / "Dockerfile").write_text(base + frequent + rare)
    run.build(ctx)
    (ctx / "src" / "a.txt").write_text("edit 1\n")
    assert ran(run.build(ctx)) == [frequent.strip(), rare.strip()]  # both, in this order
    (ctx / "Dockerfile").write_text(base + rare + frequent)
    assert ran(run.build(ctx)) == [rare.strip(), frequent.strip()]  # the new order, once
    (ctx / "src" / "a.txt").write_text("edit 2\n")
    res = run.build(ctx)
    assert ran(res) == [frequent.strip()] and cached(res) == ["COPY busybox /bin/busybox",
                                                             rare.strip()]


def test_run_sees_its_own_pid_namespace_a_minimal_dev_and_clamped_mtimes(run, tmp_path):
    ctx = context(tmp_path, "FROM scratch\nCOPY busybox /bin/busybox\n"
                            'RUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
                            "ENV WHO=me\nWORKDIR /work\n"
                            "RUN echo pid=$$ who=$WHO pwd=$(pwd) > /work/report && ls /dev "
                            ">> /work/report && touch -d @5 /work/old\n")
    res = run.build(ctx, source_date_epoch=1_600_000_000)
    tree = {e.path: e for e in run.layers.tree(res.layer_id)}
    report = run.layers.read_file(tree[b"work/report"]).decode().split()
    assert report[:3] == ["pid=1", "who=me", "pwd=/work"]  # PID 1 of a new PID namespace
    assert set(report[3:]) == {"fd", "full", "null", "random", "shm", "stderr", "stdin",
                               "stdout", "tty", "urandom", "zero"}
    epoch = 1_600_000_000 * 10**9
    assert tree[b"work/report"].mtime_ns == epoch  # made by a step: clamped
    assert tree[b"work"].mtime_ns == epoch
    assert tree[b"bin/busybox"].mtime_ns == epoch  # COPY: the epoch, not the source's
    assert tree[b"work/old"].mtime_ns == 5 * 10**9  # older than the epoch: kept


def test_global_arg_in_from_platform_and_unconsumed_build_args(run, tmp_path):
    import platform as pf

    from pylayers.build.dockerfile import DockerfileError
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(pf.machine(), pf.machine())
    ctx = context(tmp_path, "ARG BASE=scratch\nARG PLAT=linux/" + arch + "\n"
                            "FROM --platform=$PLAT $BASE AS one\nCOPY busybox /bin/busybox\n"
                            "FROM one\nARG BASE\nCOPY src/$BASE.txt /picked\n")
    (ctx / "src" / "scratch.txt").write_text("from the global default\n")
    res = run.build(ctx, build_args={"UNUSED": "1"})
    tree = {e.path: e for e in run.layers.tree(res.layer_id)}
    assert run.layers.read_file(tree[b"picked"]) == b"from the global default\n"
    assert res.warnings == ["build-args not consumed: UNUSED"]
    with pytest.raises(DockerfileError, match="Dockerfile:3: FROM --platform=linux/nope"):
        run.build(ctx, build_args={"PLAT": "linux/nope"})
