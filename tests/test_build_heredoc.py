"""Here-documents (BuildKit's dockerfile 1.4 syntax): parsed with their bodies, run by
RUN (as the shell's script, as a `#!` script, or as the shell's own here-documents),
written as files by COPY, and part of the step's cache key. The parser tests need
nothing; the builds need root, busybox-static and namespaces (tests/buildutil.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from pylayers.build.dockerfile import DockerfileError, expand_heredoc, parse
from pylayers.build.heredoc import parse_marker

sys.path.insert(0, os.path.dirname(__file__))
from buildutil import BUSYBOX_BASE, needs_build  # noqa: E402
from test_build import Run, cached, cli, context, ran  # noqa: E402

BASE = BUSYBOX_BASE


@pytest.fixture
def run(tmp_path: Path):
    r = Run(tmp_path / "store")
    yield r
    r.close()


def stage_insts(text: str):
    return parse(text).stages[-1].instructions


# -- parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize("word, name, chomp, expand", [
    ("<<EOF", "EOF", False, True),
    ("<<-EOF", "EOF", True, True),
    ('<<"EOF"', "EOF", False, False),
    ("<<'EOF'", "EOF", False, False),
    ('<<-"a.txt"', "a.txt", True, False),
    ("2<<EOF", "EOF", False, True),
])
def test_markers(word, name, chomp, expand):
    doc = parse_marker(word)
    assert doc is not None and (doc.name, doc.chomp, doc.expand) == (name, chomp, expand)


@pytest.mark.parametrize("word", ["<<", "<<<EOF", '"<<EOF"', "x<<EOF", "<<a/b", "<<..",
                                  "<<'open"])
def test_not_markers(word):
    assert parse_marker(word) is None


def test_bodies_follow_the_line_in_order_and_are_not_instructions():
    (run_, copy, env) = stage_insts(
        "FROM scratch\n"
        "RUN <<A cat > /a && \\\n   <<-B cat > /b\n"
        "FROM looks like an instruction\n# not a comment here\n\nA\n"
        "\tsecond\n\tB\n"
        'COPY <<x.txt <<"y.txt" /dir/\n$X\nx.txt\n$Y\ny.txt\n'
        "ENV after=1\n")
    assert run_.cmd == "RUN" and run_.line == 2
    a, b = run_.heredocs
    assert (a.name, a.raw, a.content) == ("A", "FROM looks like an instruction\n"
                                          "# not a comment here\n\n",
                                          "FROM looks like an instruction\n"
                                          "# not a comment here\n\n")
    assert (b.name, b.raw, b.content, b.terminator) == ("B", "\tsecond\n", "second\n", "\tB")
    assert [(d.name, d.expand) for d in copy.heredocs] == [("x.txt", True), ("y.txt", False)]
    assert copy.line == 10 and env.cmd == "ENV" and env.line == 15
    # the bodies are in the key's text, not in the line shown
    assert run_.original == "RUN <<A cat > /a &&    <<-B cat > /b"
    assert "FROM looks like an instruction" in run_.key_text
    assert run_.key_text.endswith("\tsecond\n\tB")


def test_heredocs_only_for_run_copy_add_and_not_in_quotes():
    insts = stage_insts("FROM scratch\nENV A=<<EOF\nRUN echo '<<EOF'\nLABEL x=y\n")
    assert [i.heredocs for i in insts] == [[], [], []]


@pytest.mark.parametrize("text, line", [
    ("FROM scratch\nRUN <<EOF\necho hi\n", 2),
    ("FROM scratch\nRUN true\nCOPY <<a <<b /d/\nA\na\nB\n", 3),
    ("FROM scratch\nRUN <<EOF\n  EOF\n", 2),  # the terminator is the whole line
    ("FROM scratch\nRUN <<-EOF\n  EOF\n", 2),  # <<- strips tabs, not spaces
])
def test_unclosed_heredoc_is_an_error_naming_its_line(text, line):
    with pytest.raises(DockerfileError) as ei:
        parse(text, "Dfile")
    assert ei.value.line == line and "never closed" in str(ei.value)
    assert str(ei.value).startswith(f"Dfile:{line}: ")


def test_onbuild_trigger_with_a_heredoc_refused():
    with pytest.raises(DockerfileError) as ei:
        parse("FROM scratch\nONBUILD RUN <<EOF\necho hi\nEOF\n", "Dfile")
    assert ei.value.line == 2 and "here-document is not supported" in str(ei.value)


def test_copy_body_expansion_is_a_shell_heredoc():
    used: set[str] = set()
    got = expand_heredoc('a=$A b=${B:-dflt} "$A" \'$A\' \\$A \\\\ \\x c\\\nd\n',
                         {"A": "1"}, used)
    assert got == 'a=1 b=dflt "1" \'1\' $A \\ \\x cd\n'
    assert used == {"A", "B"}


# -- building ------------------------------------------------------------------------------


HEREDOCS = BASE + """\
ARG WHO=world
RUN <<EOF
echo "hello $WHO" > /greet
echo second >> /greet
EOF
RUN <<-EOT sh
\techo tabbed > /tab
\tEOT
RUN <<EOF
#!/bin/sh
echo "script $0 $WHO" > /script
EOF
RUN <<A cat > /a && <<"B" cat > /b
first $WHO
A
second $WHO
B
COPY <<x.txt <<"y.txt" /dir/
x $WHO \\$HOME
x.txt
y $WHO
y.txt
COPY --chmod=0755 <<-EOF /one
\tone ${WHO:-none} "q"
\tEOF
"""


def files(r, layer) -> dict[str, bytes]:
    return {e.path.decode(): r.layers.read_file(e) for e in r.layers.tree(layer)
            if e.kind == 1}


@needs_build
def test_heredoc_build_runs_scripts_and_copies_bodies(run, tmp_path):
    ctx = context(tmp_path, HEREDOCS)
    res = run.build(ctx)
    got = files(run, res.layer_id)
    assert got["greet"] == b"hello world\nsecond\n"
    assert got["tab"] == b"tabbed\n"
    assert got["script"] == b"script /dev/pipes/EOF world\n"  # run as a file, via #!
    assert got["a"] == b"first world\n"
    assert got["b"] == b"second $WHO\n"  # quoted: the shell expanded nothing
    assert got["dir/x.txt"] == b"x world $HOME\n"
    assert got["dir/y.txt"] == b"y $WHO\n"  # quoted: no substitution
    assert got["one"] == b'one world "q"\n'
    tree = {e.path: e for e in run.layers.tree(res.layer_id)}
    assert tree[b"dir/x.txt"].mode & 0o7777 == 0o644 and tree[b"one"].mode & 0o7777 == 0o755
    assert b"dev" not in tree and b"dev/pipes" not in tree  # the script is never committed
    assert ran(res)[2:] == ["RUN <<EOF", "RUN <<-EOT sh", "RUN <<EOF",
                            'RUN <<A cat > /a && <<"B" cat > /b',
                            'COPY <<x.txt <<"y.txt" /dir/', "COPY --chmod=0755 <<-EOF /one"]
    assert ran(run.build(ctx)) == []


@needs_build
def test_heredoc_body_and_the_args_it_uses_are_in_the_key(run, tmp_path):
    ctx = context(tmp_path, HEREDOCS)
    first = run.build(ctx)
    # a body edited: that step and what follows run again, nothing before
    (ctx / "Dockerfile").write_text(HEREDOCS.replace("echo tabbed", "echo TABBED"))
    res = run.build(ctx, explain=True)
    assert ran(res)[0] == "RUN <<-EOT sh" and len(ran(res)) == 5
    assert cached(res)[-1] == "RUN <<EOF"
    why = [s.explanation for s in res.steps if s.text == "RUN <<-EOT sh"][0]
    assert "instruction text differs" in why and "TABBED" in why
    assert files(run, res.layer_id)["tab"] == b"TABBED\n"
    # an ARG used in an unquoted COPY body changes that step's key
    (ctx / "Dockerfile").write_text(HEREDOCS)
    assert ran(run.build(ctx)) == []
    res = run.build(ctx, build_args={"WHO": "you"})
    assert "COPY <<x.txt <<\"y.txt\" /dir/" in ran(res)
    assert files(run, res.layer_id)["dir/x.txt"] == b"x you $HOME\n"
    assert res.layer_id != first.layer_id


@needs_build
def test_cli_unclosed_heredoc_is_one_line_exit_6(tmp_path):
    ctx = context(tmp_path, BASE + "RUN true\nCOPY <<EOF /x\nbody\nEOF \n")
    res = cli(tmp_path / "store", "build", str(ctx))
    assert res.returncode == 6, res.stderr
    assert res.stderr.strip() == ("pylayers: Dockerfile:5: here-document <<EOF is never "
                                  "closed (no line 'EOF' after it)")


@needs_build
def test_copy_heredoc_as_destination_or_to_a_file_with_two_sources_refused(tmp_path):
    for df, says in [(BASE + "COPY busybox <<EOF\nx\nEOF\n", "cannot be the destination"),
                     (BASE + "COPY <<a <<b /file\nA\na\nB\nb\n", "must be a directory")]:
        ctx = context(tmp_path / str(len(says)), df)
        res = cli(tmp_path / "store", "build", str(ctx))
        assert res.returncode == 6 and says in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1

