"""RUN --mount (cache, bind, tmpfs, secret) and RUN --network (pylayers/build/mounts.py):
parsed and refused as BuildKit does, mounted for the step only (nothing of a mount in the
committed layer), cache directories kept in the store between builds, keys as BuildKit
has them (a cache's or secret's content never counts; a context bind's content does).
The builds need root, busybox-static and namespaces (tests/buildutil.py)."""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

import pytest

from pylayers.build.dockerfile import DockerfileError, parse
from pylayers.build.mounts import MountError, parse_mount, parse_network

sys.path.insert(0, os.path.dirname(__file__))
from buildutil import needs_build  # noqa: E402
from test_build import Run, cached, cli, context, ran  # noqa: E402

BASE = """\
FROM scratch AS base
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
"""


@pytest.fixture
def run(tmp_path: Path):
    r = Run(tmp_path / "store")
    yield r
    r.close()


# -- parsing -------------------------------------------------------------------------------


def test_mount_specs_as_buildkit_spells_them():
    m = parse_mount("type=cache,target=/root/.cache,id=pip,sharing=locked,uid=1000,gid=1000,"
                    "mode=0700")
    assert (m.type, m.target, m.id, m.sharing, m.uid, m.gid, m.mode) == (
        "cache", "/root/.cache", "pip", "locked", 1000, 1000, 0o700)
    m = parse_mount("target=/src,source=app,ro")  # bind is the default type
    assert (m.type, m.target, m.source, m.readonly) == ("bind", "/src", "app", True)
    m = parse_mount("type=bind,dst=/w,src=.,from=build,rw")
    assert (m.target, m.source, m.from_, m.readonly) == ("/w", ".", "build", False)
    m = parse_mount("type=secret,id=npmrc")
    assert (m.target, m.required) == ("/run/secrets/npmrc", False)
    m = parse_mount("type=secret,target=/root/.npmrc,required")
    assert (m.id, m.required) == (".npmrc", True)
    m = parse_mount("type=secret,id=tok,env=TOKEN")
    assert (m.target, m.variable) == (None, "TOKEN")
    assert parse_mount("type=tmpfs,target=/t,size=64m").size == 64 << 20
    assert parse_network("none") == "none"


@pytest.mark.parametrize("spec, says", [
    ("type=ssh", "type=ssh is not supported"),
    ("type=volume,target=/x", "bind, cache, tmpfs or secret"),
    ("type=cache", "needs target="),
    ("type=cache,target=/x,sharing=sometimes", "shared, private or locked"),
    ("type=cache,target=/x,uid=me", "not a number"),
    ("type=cache,target=/x,mode=999", "not an octal number"),
    ("type=cache,target=/x,from=base", "not supported"),
    ("type=tmpfs,target=/x,size=lots", "bytes"),
    ("type=tmpfs,target=/x,id=y", "has no option 'id'"),
    ("type=bind,target=/x,bogus=1", "has no option 'bogus'"),
    ("type=bind,type=cache,target=/x", "type given twice"),
    ("type=bind,target=/x,target=/y", "target given twice"),
    ("type=bind,target", "needs a value"),
    ("type=secret", "needs id="),
    ("type=bind,target=/x,ro=maybe", "true or false"),
])
def test_bad_mount_specs(spec, says):
    with pytest.raises(MountError) as ei:
        parse_mount(spec)
    assert says in str(ei.value)


@pytest.mark.parametrize("line, says", [
    ("RUN --mount=type=ssh true", "type=ssh is not supported"),
    ("RUN --mount=type=cache,target=/x,sharing=no true", "shared, private or locked"),
    ("RUN --network=bridge true", "none, default or host"),
    ("RUN --mount true", "needs a value"),
    ("RUN --security=insecure true", "not supported"),
])
def test_bad_run_flags_name_their_line(line, says):
    with pytest.raises(DockerfileError) as ei:
        parse(f"FROM scratch\n{line}\n", "Dfile")
    assert ei.value.line == 2 and says in str(ei.value), str(ei.value)
    assert str(ei.value).startswith("Dfile:2: RUN")


def test_several_mounts_kept_in_order():
    (inst,) = parse("FROM scratch\nRUN --mount=type=tmpfs,target=/a --network=none \\\n"
                    "  --mount=target=/b,source=x true\n").stages[0].instructions
    assert inst.mounts == ["type=tmpfs,target=/a", "target=/b,source=x"]
    assert inst.flags == {"network": "none"} and inst.text == "true"


# -- building ------------------------------------------------------------------------------


def tree(run, layer) -> dict[bytes, object]:
    return {e.path: e for e in run.layers.tree(layer)}


def content(run, layer, path: str) -> bytes:
    return run.layers.read_file(tree(run, layer)[path.encode()])


CACHE = BASE + """\
FROM base
RUN --mount=type=cache,target=/var/cache/app,uid=7,gid=8,mode=0750 \\
  n=$(cat /var/cache/app/n 2>/dev/null || echo 0); echo $((n+1)) > /var/cache/app/n; \\
  cp /var/cache/app/n /runs; stat -c '%u %g %a' /var/cache/app > /owner
"""


@needs_build
def test_cache_mount_persists_in_the_store_not_in_the_layer_nor_the_key(run, tmp_path):
    ctx = context(tmp_path, CACHE)
    first = run.build(ctx)
    t = tree(run, first.layer_id)
    assert content(run, first.layer_id, "runs") == b"1\n"
    assert content(run, first.layer_id, "owner") == b"7 8 750\n"
    assert not any(p.startswith(b"var") for p in t)  # the mount point was not committed
    (cache,) = (tmp_path / "store" / "build" / "cache-mounts").iterdir()
    assert (cache / "id").read_text() == "/var/cache/app\n"
    assert (cache / "0" / "n").read_text() == "1\n"
    # the cache's content is not in the key: cached although the cache changed
    assert ran(run.build(ctx)) == []
    again = run.build(ctx, no_cache=True)
    assert content(run, again.layer_id, "runs") == b"2\n"
    assert (cache / "0" / "n").read_text() == "2\n"


@needs_build
def test_cache_mount_sharing_private_takes_another_instance_shared_does_not(run, tmp_path):
    ctx = context(tmp_path, CACHE.replace("mode=0750", "mode=0750,id=c,sharing=private"))
    run.build(ctx)
    (cache,) = (tmp_path / "store" / "build" / "cache-mounts").iterdir()
    fd = os.open(cache / "0.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another build holds instance 0
        res = run.build(ctx, no_cache=True)
        assert content(run, res.layer_id, "runs") == b"1\n"  # a fresh instance
        assert (cache / "1" / "n").read_text() == "1\n"
        assert (cache / "0" / "n").read_text() == "1\n"
        fcntl.flock(fd, fcntl.LOCK_SH)  # a shared user: shared steps go on using 0
        shared = context(tmp_path / "shared",
                         CACHE.replace("mode=0750", "mode=0750,id=c,sharing=shared"))
        res = run.build(shared, no_cache=True)
        assert content(run, res.layer_id, "runs") == b"2\n"
    finally:
        os.close(fd)


BIND = BASE + """\
RUN echo from-stage > /stagefile
FROM base
RUN --mount=type=bind,source=src,target=/mnt/src \\
  cat /mnt/src/a.txt /mnt/src/b.txt > /seen; ls /mnt/src > /listed; \\
  if touch /mnt/src/x 2>/dev/null; then echo writable; else echo read-only; fi > /ro
RUN --mount=type=bind,source=src,target=/mnt/rw,rw echo scribble > /mnt/rw/a.txt && \\
  cat /mnt/rw/a.txt > /rw
RUN --mount=type=bind,from=base,source=/stagefile,target=/etc/sf cat /etc/sf > /fromstage
RUN --mount=type=tmpfs,target=/scratch echo temp > /scratch/t && test ! -e /t
"""


@needs_build
def test_bind_mounts_read_only_rw_discarded_from_stage_and_nothing_committed(run, tmp_path):
    ctx = context(tmp_path, BIND)
    (ctx / "src" / "secret.key").write_text("excluded\n")
    (ctx / ".dockerignore").write_text("src/secret.key\n")
    res = run.build(ctx)
    lid = res.layer_id
    assert content(run, lid, "seen") == b"a\nb\n"
    assert content(run, lid, "listed") == b"a.txt\nb.txt\n"  # .dockerignore applies
    assert content(run, lid, "ro") == b"read-only\n"
    assert content(run, lid, "rw") == b"scribble\n"
    assert (ctx / "src" / "a.txt").read_text() == "a\n"  # rw wrote to a copy
    assert content(run, lid, "fromstage") == b"from-stage\n"
    paths = set(tree(run, lid))
    assert not {b"mnt", b"etc", b"scratch", b"scratch/t", b"etc/sf"} & paths


@needs_build
def test_a_context_bind_counts_its_content_in_the_key(run, tmp_path):
    ctx = context(tmp_path, BIND)
    (ctx / ".dockerignore").write_text("src/ignored\n")
    run.build(ctx)
    os.utime(ctx / "src" / "a.txt", ns=(1, 1))
    (ctx / "src" / "ignored").write_text("not seen\n")
    assert ran(run.build(ctx)) == []  # mtimes and excluded files do not count
    (ctx / "src" / "b.txt").write_text("B\n")
    res = run.build(ctx, explain=True)
    first = ran(res)[0]
    assert first.startswith("RUN --mount=type=bind,source=src,target=/mnt/src")
    assert len(ran(res)) == 4 and cached(res)[-1] == 'RUN echo from-stage > /stagefile'
    why = [s.explanation for s in res.steps if s.text == first][0]
    assert "b.txt: content changed" in why, why
    assert content(run, res.layer_id, "seen") == b"a\nB\n"


@needs_build
def test_bind_from_a_stage_only_a_mount_needs_and_from_a_later_stage(run, tmp_path):
    df = BASE + """\
RUN echo tool > /tool
FROM scratch AS final
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
RUN --mount=type=bind,from=base,source=/tool,target=/t cp /t /copied
"""
    res = run.build(context(tmp_path, df))
    assert content(run, res.layer_id, "copied") == b"tool\n"
    assert b"tool" not in tree(run, res.layer_id)
    later = df.replace("from=base", "from=after") + "FROM scratch AS after\nCOPY busybox /b\n"
    res = cli(tmp_path / "store", "build", "--target", "final",
              str(context(tmp_path / "later", later)))
    assert res.returncode == 6 and res.stderr.strip() == (
        "pylayers: Dockerfile:8: RUN --mount from=after: that stage comes later"), res.stderr


SECRET = BASE + """\
FROM base
RUN --mount=type=secret,id=tok --mount=type=secret,id=tok,env=TOK \\
  (cat /run/secrets/tok 2>/dev/null || echo absent; echo "env=${TOK:-unset}") \\
  | sed 's/hunt[e]r2-[0-9]*/SEEN/g' > /out
RUN --mount=type=secret,id=tok,target=/root/.tok,mode=0440,uid=3 stat -c '%a %u' /root/.tok \\
  > /mode || echo absent > /mode
"""


@needs_build
def test_secret_mount_never_in_a_layer_nor_the_key(run, tmp_path):
    ctx = context(tmp_path, SECRET)
    res = run.build(ctx, secrets={"tok": b"hunter2-1\n"})
    assert content(run, res.layer_id, "out") == b"SEEN\nenv=SEEN\n\n"  # ends in \n
    assert content(run, res.layer_id, "mode") == b"440 3\n"
    assert not {b"run", b"run/secrets", b"root"} & set(tree(run, res.layer_id))
    # another value: the steps are cached (only whether it was given is in the key)
    assert ran(run.build(ctx, secrets={"tok": b"hunter2-2\n"})) == []
    for f in (tmp_path / "store").rglob("*"):
        if f.is_file():
            assert b"hunter2-" not in f.read_bytes(), f
    # not given: not required, so the step runs without it
    res = run.build(ctx)
    assert len(ran(res)) == 2
    assert content(run, res.layer_id, "out") == b"absent\nenv=unset\n"


@needs_build
def test_missing_secrets_and_bad_mounts_one_line_with_the_line(tmp_path):
    store = tmp_path / "store"
    cases = [
        (BASE + "RUN --mount=type=secret,id=tok,required true\n", [], 6,
         "Dockerfile:4: RUN: secret 'tok' is required but was not given"),
        (BASE + "RUN --mount=type=bind,source=nope,target=/x true\n", [], 3,
         "Dockerfile:4: RUN: --mount source=nope: no such file or directory"),
        (BASE + "RUN --mount=type=bind,source=out,target=/x true\n", [], 6,
         "Dockerfile:4: RUN: --mount source=out: leads out"),
        (BASE + "ARG T=/x\nRUN --mount=type=cache,target=$T,sharing=$T true\n", [], 6,
         "Dockerfile:5: RUN: sharing=/x: shared, private or locked"),
        (BASE + "RUN --mount=type=secret,id=tok true\n",
         ["--secret", "id=tok,src=/nonexistent/file"], 3,
         "--secret id=tok: cannot read /nonexistent/file"),
        (BASE + "RUN true\n", ["--secret", "src=x"], 2, "--secret 'src=x': say id=ID"),
    ]
    for n, (df, extra, code, says) in enumerate(cases):
        ctx = context(tmp_path / str(n), df)
        (ctx / "out").symlink_to("/etc")  # a symlink leading out of the context
        res = cli(store, "build", *extra, str(ctx))
        assert res.returncode == code, (df, res.stderr)
        assert res.stderr.startswith(f"pylayers: {says}"), res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


@needs_build
def test_cli_secret_from_a_file_and_from_the_environment(tmp_path):
    ctx = context(tmp_path, SECRET)
    (tmp_path / "tok.txt").write_text("hunter2-9\n")
    store = tmp_path / "store"
    res = cli(store, "build", "--secret", f"id=tok,src={tmp_path / 'tok.txt'}", "-t", "a",
              str(ctx))
    assert res.returncode == 0, res.stderr
    assert cli(store, "cat", "a", "/out").stdout == "SEEN\nenv=SEEN\n\n"
    os.environ["PYLAYERS_TEST_TOK"] = "hunter2-8"
    try:
        res = cli(store, "build", "--secret", "id=tok,env=PYLAYERS_TEST_TOK", str(ctx))
    finally:
        del os.environ["PYLAYERS_TEST_TOK"]
    assert res.returncode == 0 and "CACHED" in res.stdout, res.stderr


NETWORK = BASE + """\
FROM base
RUN --network=none tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' > /ifaces; \\
  ip link show lo | grep -q 'UP' && echo lo-up > /lo
RUN --network=default tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort > /default
"""


@needs_build
def test_network_none_has_only_lo_up_default_is_the_builders(run, tmp_path):
    res = run.build(context(tmp_path, NETWORK))
    assert content(run, res.layer_id, "ifaces") == b"lo\n"
    assert content(run, res.layer_id, "lo") == b"lo-up\n"
    with open("/proc/net/dev") as f:
        host = sorted(line.split(":")[0].strip() for line in f.readlines()[2:])
    assert content(run, res.layer_id, "default").decode().split() == host

