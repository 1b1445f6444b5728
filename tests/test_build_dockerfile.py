"""The Dockerfile parser and Docker's variable substitution (pylayers/build/dockerfile.py),
on many small Dockerfiles: forms, flags, continuations, comments, directives, and each
malformed line refused with its line number."""

from __future__ import annotations

import pytest

from pylayers.build.dockerfile import (
    DockerfileError,
    ExpandError,
    arg_decls,
    expand,
    expand_words,
    pairs,
    parse,
)
from pylayers.errors import InvalidArgument


def insts(text: str):
    df = parse(text)
    return [i for s in df.stages for i in [s.from_instruction, *s.instructions]]


def test_every_instruction_parses():
    df = parse("""\
ARG BASE=scratch
FROM $BASE AS Build
COPY --from=x --chown=1:2 --chmod=0644 a b /dst/
ADD --chown=app x.tar /opt/
RUN echo hi
RUN ["/bin/sh", "-c", "echo hi"]
WORKDIR /app
ENV A=1 B="two words"
ARG V=1 W
USER app:app
LABEL org.example="x y" other=z
CMD ["run"]
ENTRYPOINT /bin/app --flag
EXPOSE 80 53/udp
VOLUME ["/data"]
SHELL ["/bin/bash", "-c"]
STOPSIGNAL SIGTERM
MAINTAINER me
""")
    assert [a.text for a in df.global_args] == ["BASE=scratch"]
    (stage,) = df.stages
    assert stage.name == "build" and stage.base == "$BASE"
    cmds = [i.cmd for i in stage.instructions]
    assert cmds == ["COPY", "ADD", "RUN", "RUN", "WORKDIR", "ENV", "ARG", "USER", "LABEL",
                    "CMD", "ENTRYPOINT", "EXPOSE", "VOLUME", "SHELL", "STOPSIGNAL",
                    "MAINTAINER"]
    copy = stage.instructions[0]
    assert copy.flags == {"from": "x", "chown": "1:2", "chmod": "0644"}
    assert copy.text == "a b /dst/"
    assert stage.instructions[2].json is None and stage.instructions[2].text == "echo hi"
    assert stage.instructions[3].json == ["/bin/sh", "-c", "echo hi"]
    assert stage.instructions[10].json is None  # ENTRYPOINT shell form
    assert df.stage("BUILD") is stage and df.stage("0") is stage


def test_keywords_any_case_and_line_numbers():
    got = insts("from scratch\n\n# c\ncopy a /a\n  Run true\n")
    assert [(i.cmd, i.line) for i in got] == [("FROM", 1), ("COPY", 4), ("RUN", 5)]


def test_continuations_join_and_drop_inner_comments_and_blank_lines():
    (_, run) = insts("FROM scratch\nRUN echo a \\\n# a comment\n\n    && echo b \\  \n  c\n")
    assert run.text == "echo a     && echo b   c"
    assert run.line == 2


def test_escape_directive_backtick():
    df = parse("# escape=`\nFROM scratch\nRUN echo a `\n  b\nCOPY a\\b c\n")
    assert df.escape == "`"
    run, copy = df.stages[0].instructions
    assert run.text == "echo a   b"
    assert copy.text == "a\\b c"  # a backslash is an ordinary character now


def test_syntax_directive_and_directives_end_at_first_other_line():
    df = parse("# syntax=docker/dockerfile:1\n# escape=\\\n\n# escape=`\nFROM scratch\n")
    assert df.directives == {"syntax": "docker/dockerfile:1", "escape": "\\"}
    assert df.escape == "\\"


def test_bad_escape_directive_refused():
    with pytest.raises(DockerfileError, match=":1:"):
        parse("# escape=x\nFROM scratch\n")


def test_json_form_only_for_a_list_of_strings():
    (_, a, b, c) = insts('FROM scratch\nCMD ["a", "b"]\nCMD [1, 2]\nCMD [not json\n')
    assert a.json == ["a", "b"] and b.json is None and c.json is None


def test_multi_stage_names_and_indexes():
    df = parse("FROM scratch AS one\nRUN x\nFROM one AS two\nFROM two\n")
    assert [(s.index, s.name, s.base) for s in df.stages] == [
        (0, "one", "scratch"), (1, "two", "one"), (2, None, "two")]
    assert df.stage("1") is df.stages[1] and df.stage("nope") is None


@pytest.mark.parametrize("text, line, what", [
    ("FROM scratch\nFOO bar\n", 2, "unknown instruction"),
    ("FROM scratch\nRUN true\n\n  BOGUS\n", 4, "unknown instruction"),
    ("RUN true\nFROM scratch\n", 1, "before the first FROM"),
    ("# just a comment\n", None, "no FROM"),
    ("FROM scratch AS\n", 1, "AS name"),
    ("FROM a b c d\n", 1, "AS name"),
    ("FROM scratch AS 1x\n", 1, "invalid stage name"),
    ("FROM scratch AS a\nFROM scratch AS A\n", 2, "duplicate stage name"),
    ("FROM scratch\nCOPY onlyone\n", 2, "source and a destination"),
    ("FROM scratch\nCOPY --bogus=1 a b\n", 2, "no flag --bogus"),
    ("FROM scratch\nCOPY --from a b\n", 2, "needs a value"),
    ("FROM scratch\nCOPY --from=a --from=b a b\n", 2, "twice"),
    ("FROM scratch\nRUN --mount=type=cache true\n", 2, "needs target="),
    ("FROM scratch\nADD --from=x a b\n", 2, "no flag --from"),
    ("FROM scratch\nSHELL /bin/sh -c\n", 2, "JSON array"),
    ("FROM scratch\nENV\n", 2, "needs arguments"),
    ("FROM scratch\nENV A\n", 2, "needs a value"),
    ("FROM scratch\nENV A=1 =2\n", 2, "not key=value"),
    ("FROM scratch\nENV A=\"unterminated\n", 2, "unterminated"),
    ("FROM scratch\nARG 1BAD\n", 2, "invalid name"),
    ("FROM scratch\nUSER a b\n", 2, "one argument"),
    ("FROM scratch\nWORKDIR\n", 2, "needs arguments"),
    ("FROM scratch\nONBUILD ONBUILD RUN x\n", 2, "not allowed"),
    ("FROM scratch\nHEALTHCHECK NONE x\n", 2, "no arguments"),
    ("FROM scratch\n=oops\n", 2, "keyword"),
    ("FROM scratch\nRUN\n", 2, "needs a command"),
    ("# escape=\\\n# escape=`\nFROM scratch\n", 2, "twice"),
])
def test_malformed_lines_are_errors_with_their_line(text, line, what):
    with pytest.raises(DockerfileError) as ei:
        parse(text, "Dfile")
    assert isinstance(ei.value, InvalidArgument) and ei.value.exit_code == 6
    assert what in str(ei.value)
    assert ei.value.line == line
    assert str(ei.value).startswith(f"Dfile:{line}: " if line else "Dfile: ")


def test_env_and_label_pairs():
    (_, e1, e2, lab) = insts('FROM scratch\nENV A=1 B="x y" C=a\\ b\nENV OLD some value\n'
                             'LABEL "k 1"=v k2=\'w z\'\n')
    assert pairs(e1) == [("A", "1"), ("B", '"x y"'), ("C", "a\\ b")]
    assert pairs(e2) == [("OLD", "some value")]
    assert [(expand(k, {}), expand(v, {})) for k, v in pairs(lab)] == [("k 1", "v"),
                                                                        ("k2", "w z")]


def test_arg_declarations():
    (_, a) = insts("FROM scratch\nARG A B=2 C=\"x y\"\n")
    assert arg_decls(a) == [("A", None), ("B", "2"), ("C", '"x y"')]


ENV = {"A": "1", "EMPTY": "", "SP": "a b"}


@pytest.mark.parametrize("word, want", [
    ("$A", "1"), ("${A}", "1"), ("x${A}y", "x1y"), ("$NOPE", ""), ("${NOPE}", ""),
    ("${A:-d}", "1"), ("${NOPE:-d}", "d"), ("${EMPTY:-d}", "d"), ("${EMPTY-d}", ""),
    ("${NOPE-d}", "d"), ("${A:+alt}", "alt"), ("${EMPTY:+alt}", ""), ("${EMPTY+alt}", "alt"),
    ("${NOPE:+alt}", ""), ("${NOPE:-$A}", "1"), ("${NOPE:-${A:+n}}", "n"),
    ("'$A'", "$A"), ('"$A"', "1"), ('"\\$A"', "$A"), ("\\$A", "$A"), ("a\\ b", "a b"),
    ('"a\\"b"', 'a"b'), ("$", "$"), ("$$", "$$"), ("a$-b", "a$-b"), ("$1", ""),
    ('"${SP}"', "a b"), ("${A}${A}", "11"), ("'a'\"b\"c", "abc"),
])
def test_substitution_as_docker(word, want):
    assert expand(word, ENV) == want


def test_substitution_records_names_used():
    used: set[str] = set()
    expand("$A ${NOPE:-$EMPTY} '$NOT'", ENV, used=used)
    assert used == {"A", "NOPE", "EMPTY"}


@pytest.mark.parametrize("word", ["${A", "${}", "${A:x}", "'open", '"open', "${NOPE:?must set}",
                                  "${NOPE?}"])
def test_bad_substitution_raises(word):
    with pytest.raises(ExpandError):
        expand(word, ENV)


def test_words_split_outside_quotes_and_not_after_substitution():
    assert expand_words('a "b c" $SP d\\ e', ENV) == ["a", "b c", "a b", "d e"]


def test_backtick_escape_in_substitution():
    assert expand("`$A", ENV, "`") == "$A"
    assert expand("a\\b", ENV, "`") == "a\\b"


def test_crlf_line_endings():
    (_, run) = insts("FROM scratch\r\nRUN echo a \\\r\n  b\r\n")
    assert run.text == "echo a   b"


def test_backtick_escape_in_env_pairs():
    df = parse('# escape=`\nFROM scratch\nENV A=x` y B="q`"r"\n')
    (env,) = df.stages[0].instructions
    got = [(k, expand(v, {}, "`")) for k, v in pairs(env, escape="`")]
    assert got == [("A", "x y"), ("B", 'q"r')]
