"""HEALTHCHECK, STOPSIGNAL and ONBUILD (pylayers/build/metadata.py): parsed and checked
as Docker does, recorded in the image config (`Healthcheck`, `StopSignal`, `OnBuild`)
that export writes, and ONBUILD triggers run by the next build FROM the image, not by
the one after. The builds need root, busybox-static and namespaces (tests/buildutil.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from pylayers.build.dockerfile import DockerfileError, parse
from pylayers.build.metadata import healthcheck, parse_duration
from pylayers.errors import InvalidArgument
from pylayers.oci import export_image

sys.path.insert(0, os.path.dirname(__file__))
from buildutil import BUSYBOX_BASE, needs_build  # noqa: E402
from test_build import Run, cli, context, ran  # noqa: E402

BASE = BUSYBOX_BASE


@pytest.fixture
def run(tmp_path: Path):
    r = Run(tmp_path / "store")
    yield r
    r.close()


@pytest.mark.parametrize("text, ns", [
    ("0", 0), ("30s", 30 * 10**9), ("1m30s", 90 * 10**9), ("500ms", 5 * 10**8),
    ("1.5h", 5400 * 10**9), ("2us", 2000), ("1µs", 1000), ("10ns", 10), (".5s", 5 * 10**8),
])
def test_go_durations(text, ns):
    assert parse_duration(text) == ns


@pytest.mark.parametrize("text", ["", "30", "1x", "s", "-1s", "1s2", "1.s.s"])
def test_not_durations(text):
    with pytest.raises(InvalidArgument):
        parse_duration(text)


def test_healthcheck_forms():
    assert healthcheck("NONE", {}) == {"Test": ["NONE"]}
    assert healthcheck('CMD ["curl", "-f", "http://x/"]', {}) == {
        "Test": ["CMD", "curl", "-f", "http://x/"]}
    assert healthcheck("cmd curl -f http://x/ || exit 1", {"interval": "5s", "retries": "0"}) \
        == {"Test": ["CMD-SHELL", "curl -f http://x/ || exit 1"], "Interval": 5 * 10**9}
    full = healthcheck("CMD true", {"interval": "1m", "timeout": "3s", "start-period": "1ms",
                                    "start-interval": "0", "retries": "4"})
    assert full == {"Test": ["CMD-SHELL", "true"], "Interval": 60 * 10**9,
                    "Timeout": 3 * 10**9, "StartPeriod": 10**6, "Retries": 4}


@pytest.mark.parametrize("text, says", [
    ("FROM scratch\nHEALTHCHECK NONE x\n", "takes no arguments"),
    ("FROM scratch\nHEALTHCHECK CMD\n", "missing command"),
    ("FROM scratch\nHEALTHCHECK PING x\n", "unknown type"),
    ("FROM scratch\nHEALTHCHECK --interval=10 CMD true\n", "not a duration"),
    ("FROM scratch\nHEALTHCHECK --timeout=10us CMD true\n", "less than 1ms"),
    ("FROM scratch\nHEALTHCHECK --retries=-1 CMD true\n", "cannot be negative"),
    ("FROM scratch\nHEALTHCHECK --retries=many CMD true\n", "not a number"),
    ("FROM scratch\nHEALTHCHECK --every=1s CMD true\n", "no flag --every"),
    ("FROM scratch\nONBUILD ONBUILD RUN x\n", "ONBUILD ONBUILD"),
    ("FROM scratch\nONBUILD from scratch\n", "FROM is not allowed"),
    ("FROM scratch\nONBUILD MAINTAINER me\n", "MAINTAINER is not allowed"),
    ("FROM scratch\nONBUILD FROBNICATE\n", "unknown instruction"),
    ("FROM scratch\nONBUILD COPY onlyone\n", "source and a destination"),
    ("FROM scratch\nONBUILD\n", "needs arguments"),
])
def test_malformed_healthcheck_and_onbuild_name_their_line(text, says):
    with pytest.raises(DockerfileError) as ei:
        parse(text, "Dfile")
    assert ei.value.line == 2 and says in str(ei.value), str(ei.value)
    assert str(ei.value).startswith("Dfile:2: ")


def exported_config(run, layer: bytes, where: Path) -> dict:
    exp = export_image(run.layers, layer, f"oci:{where}:x", "none")
    return json.loads((where / "blobs" / "sha256" / exp.config_digest[7:]).read_bytes())


PARENT = BASE + """\
HEALTHCHECK --interval=30s --timeout=1m30s --start-period=500ms --start-interval=2s \\
  --retries=3 CMD wget -q http://localhost/ || exit 1
STOPSIGNAL SIGQUIT
ONBUILD RUN echo "triggered $(cat /bin/order 2>/dev/null)" > /triggered
ONBUILD COPY src/a.txt /from-child-context
"""


@needs_build
def test_healthcheck_stopsignal_onbuild_in_the_exported_config(run, tmp_path):
    res = run.build(context(tmp_path, PARENT), tags=("parent",))
    cfg = exported_config(run, res.layer_id, tmp_path / "img")["config"]
    assert cfg["Healthcheck"] == {
        "Test": ["CMD-SHELL", "wget -q http://localhost/ || exit 1"],
        "Interval": 30 * 10**9, "Timeout": 90 * 10**9, "StartPeriod": 5 * 10**8,
        "StartInterval": 2 * 10**9, "Retries": 3}
    assert cfg["StopSignal"] == "SIGQUIT"
    assert cfg["OnBuild"] == ['RUN echo "triggered $(cat /bin/order 2>/dev/null)" > '
                              "/triggered", "COPY src/a.txt /from-child-context"]
    # the parent ran none of its own triggers
    assert b"triggered" not in {e.path for e in run.layers.tree(res.layer_id)}


@needs_build
def test_onbuild_triggers_run_in_the_child_first_and_not_in_the_grandchild(run, tmp_path):
    run.build(context(tmp_path, PARENT), tags=("parent",))
    ctx = context(tmp_path / "child", "FROM parent\nHEALTHCHECK NONE\n"
                                      "RUN cat /triggered /from-child-context > /seen\n")
    (ctx / "src" / "a.txt").write_text("the child's a\n")
    child = run.build(ctx, tags=("child",))
    assert ran(child) == [
        'RUN echo "triggered $(cat /bin/order 2>/dev/null)" > /triggered  (ONBUILD of parent)',
        "COPY src/a.txt /from-child-context  (ONBUILD of parent)",
        "RUN cat /triggered /from-child-context > /seen"]
    tree = {e.path: e for e in run.layers.tree(child.layer_id)}
    assert run.layers.read_file(tree[b"seen"]) == b"triggered \nthe child's a\n"
    cfg = exported_config(run, child.layer_id, tmp_path / "img")["config"]
    assert "OnBuild" not in cfg or not cfg["OnBuild"]  # consumed: not for grandchildren
    assert cfg["Healthcheck"] == {"Test": ["NONE"]} and cfg["StopSignal"] == "SIGQUIT"
    assert ran(run.build(ctx)) == []  # the triggers' steps are cached like any other

    grand = run.build(context(tmp_path / "grand", "FROM child\nRUN test -e /seen\n"))
    assert ran(grand) == ["RUN test -e /seen"]


@needs_build
def test_onbuild_of_an_earlier_stage_runs_in_the_stage_from_it(run, tmp_path):
    df = BASE.replace("FROM scratch", "FROM scratch AS base") + (
        "ONBUILD RUN echo stage-trigger > /t\n"
        "FROM base AS next\nRUN cat /t > /copy\n"
        "FROM next\nRUN test -e /copy\n")
    res = run.build(context(tmp_path, df))
    assert [s.text for s in res.steps if "ONBUILD of" in s.text] == [
        "RUN echo stage-trigger > /t  (ONBUILD of base)"]
    tree = {e.path: e for e in run.layers.tree(res.layer_id)}
    assert run.layers.read_file(tree[b"copy"]) == b"stage-trigger\n"


@needs_build
def test_cli_bad_healthcheck_and_onbuild_one_line_exit_6(tmp_path):
    for n, (line, says) in enumerate([
            ("HEALTHCHECK --interval=1x CMD true", "Dockerfile:4: HEALTHCHECK: --interval"),
            ("ONBUILD ONBUILD RUN true", "Dockerfile:4: ONBUILD: chaining")]):
        ctx = context(tmp_path / str(n), BASE + line + "\n")
        res = cli(tmp_path / "store", "build", str(ctx))
        assert res.returncode == 6, res.stderr
        assert res.stderr.startswith("pylayers: " + says), res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
