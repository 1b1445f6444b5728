"""`pylayers build --explain`: every cache miss says what changed, down to the file and
the attribute (buildkit#2567). One store, one context, one change after another: each
build's first miss must be the step the change affects, and its explanation must name
the change; changes that must not miss (mtime, a source's owner, its mode under
--chmod) must keep every step cached.

Needs root, /bin/busybox and mount+PID namespaces (as tests/test_build.py)."""

from __future__ import annotations

import errno
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pylayers import Layers, Store
from pylayers.build.builder import Builder

sys.path.insert(0, os.path.dirname(__file__))
from buildutil import BUSYBOX, BUSYBOX_BASE, needs_build  # noqa: E402

pytestmark = needs_build

BASE = BUSYBOX_BASE

DOCKERFILE = """\
FROM bb AS gen
COPY gen.txt /gen.txt

FROM bb
ARG V=1
ENV E=1
WORKDIR /w
SHELL ["/bin/sh", "-c"]
COPY src/ /app/
COPY --chown=1:1 --chmod=0644 conf/ /conf/
COPY one.txt /one-$V.txt
COPY --from=gen /gen.txt /gen.txt
RUN echo run-$E
"""


class Scenario:
    def __init__(self, tmp_path: Path) -> None:
        self.ctx = tmp_path / "ctx"
        self.store = Store.open(tmp_path / "store")
        self.layers = Layers(self.store)
        self.dockerfile = DOCKERFILE
        self.build_args: dict[str, str] = {}
        c = self.ctx
        (c / "src" / "sub").mkdir(parents=True)
        (c / "conf").mkdir()
        shutil.copy(BUSYBOX, c / "busybox")
        for name, text in {"src/a.txt": "a", "src/b.txt": "b", "src/sub/deep.txt": "deep",
                           "src/x.log": "log", "src/secret.txt": "secret",
                           "conf/app.conf": "k=v", "one.txt": "1", "two.txt": "2",
                           "gen.txt": "gen"}.items():
            (c / name).write_text(text)
            (c / name).chmod(0o644)
        os.symlink("a.txt", c / "src" / "link")
        (c / ".dockerignore").write_text("src/secret.txt\n")
        (c / "Dockerfile").write_text(BASE)
        self.builder().build(c, tags=("bb",))
        (c / "Dockerfile").write_text(BASE + "COPY one.txt /extra\n")
        self.builder().build(c, tags=("bb2",))

    def builder(self) -> Builder:
        return Builder(self.layers)

    def build(self):
        (self.ctx / "Dockerfile").write_text(self.dockerfile)
        return self.builder().build(self.ctx, build_args=self.build_args, explain=True)

    def edit(self, old: str, new: str) -> None:
        assert old in self.dockerfile, old
        self.dockerfile = self.dockerfile.replace(old, new, 1)


def _xattr(path: Path, name: str, value: bytes | None) -> None:
    try:
        if value is None:
            os.removexattr(path, name)
        else:
            os.setxattr(path, name, value)
    except OSError as e:
        if e.errno == errno.ENOTSUP:
            pytest.skip(f"{path.parent} holds no user xattrs")
        raise


def _retag(s: Scenario, tag: str) -> None:
    s.layers.set_tag("bb", s.layers.resolve(tag))


# (what changes, the change, the step that must miss first, what its explanation says)
Case = tuple[str, Callable[[Scenario], None], str, str]


def w(rel: str, text: str) -> Callable[[Scenario], None]:
    return lambda s: (s.ctx / rel).write_text(text)


CASES: list[Case] = [
    ("content", w("src/a.txt", "A"), "COPY src/ /app/", "src/a.txt: content changed"),
    ("size", w("src/a.txt", "AAAA"), "COPY src/ /app/",
     "src/a.txt: content changed (size 1 -> 4)"),
    ("nested content", w("src/sub/deep.txt", "DEEP"), "COPY src/ /app/",
     "src/sub/deep.txt: content changed"),
    ("mode", lambda s: (s.ctx / "src/a.txt").chmod(0o600), "COPY src/ /app/",
     "src/a.txt: mode 0644 -> 0600"),
    ("directory mode", lambda s: (s.ctx / "src/sub").chmod(0o700), "COPY src/ /app/",
     "src/sub: mode 0755 -> 0700"),
    ("xattr added", lambda s: (_xattr(s.ctx / "src/b.txt", "user.tag", b"1"),
                               _xattr(s.ctx / "src/b.txt", "user.keep", b"1")),
     "COPY src/ /app/", "src/b.txt: xattr 'user.keep' added, xattr 'user.tag' added"),
    ("xattr value", lambda s: _xattr(s.ctx / "src/b.txt", "user.tag", b"2"),
     "COPY src/ /app/", "src/b.txt: xattr 'user.tag' value changed"),
    ("xattr removed", lambda s: _xattr(s.ctx / "src/b.txt", "user.tag", None),
     "COPY src/ /app/", "src/b.txt: xattr 'user.tag' removed"),
    ("symlink target", lambda s: (os.unlink(s.ctx / "src/link"),
                                  os.symlink("b.txt", s.ctx / "src/link")),
     "COPY src/ /app/", "src/link: link target 'a.txt' -> 'b.txt'"),
    ("type", lambda s: (os.unlink(s.ctx / "src/b.txt"),
                        os.symlink("a.txt", s.ctx / "src/b.txt")),
     "COPY src/ /app/", "src/b.txt: type file -> symlink"),
    ("file added", w("src/new.txt", "new"), "COPY src/ /app/", "src/new.txt: file added"),
    ("file removed", lambda s: os.unlink(s.ctx / "src/sub/deep.txt"), "COPY src/ /app/",
     "src/sub/deep.txt: file removed"),
    ("empty directory added", lambda s: (s.ctx / "src/empty").mkdir(), "COPY src/ /app/",
     "src/empty: file added"),
    (".dockerignore excludes", w(".dockerignore", "src/secret.txt\nsrc/*.log\n"),
     "COPY src/ /app/", "src/x.log: file removed"),
    (".dockerignore lets in", w(".dockerignore", "src/*.log\n"), "COPY src/ /app/",
     "src/secret.txt: file added"),
    ("--chown value", lambda s: s.edit("--chown=1:1", "--chown=2:2"),
     "COPY --chown=2:2", 'option chown: "1:1" -> "2:2"'),
    ("--chmod value", lambda s: s.edit("--chmod=0644", "--chmod=0640"),
     "COPY --chown=2:2 --chmod=0640", 'option chmod: "0644" -> "0640"'),
    ("--chmod added", lambda s: s.edit("COPY src/ /app/", "COPY --chmod=0755 src/ /app/"),
     "COPY --chmod=0755 src/ /app/", 'option chmod: null -> "0755"'),
    ("single file content", w("one.txt", "one"), "COPY one.txt", "one.txt: content changed"),
    ("ARG default", lambda s: s.edit("ARG V=1", "ARG V=2"), "COPY one.txt",
     'option arg:V: "1" -> "2"'),
    ("--build-arg", lambda s: s.build_args.update(V="3"), "COPY one.txt",
     'option arg:V: "2" -> "3"'),
    ("source renamed", lambda s: s.edit("COPY one.txt", "COPY two.txt"), "COPY two.txt",
     "inputs differ: ['one.txt'] -> ['two.txt']"),
    ("destination", lambda s: s.edit("/one-$V.txt", "/uno-$V.txt"), "COPY two.txt",
     "instruction text differs"),
    ("other stage's file", w("gen.txt", "GEN"), "COPY --from=gen",
     "gen.txt: content changed"),
    ("ENV value", lambda s: s.edit("ENV E=1", "ENV E=2"), "RUN echo",
     'option env:E: "1" -> "2"'),
    ("RUN text", lambda s: s.edit("RUN echo run-$E", "RUN echo ran-$E"), "RUN echo",
     "instruction text differs: 'RUN echo run-$E' vs 'RUN echo ran-$E'"),
    ("RUN exec form", lambda s: s.edit("RUN echo ran-$E", 'RUN ["echo", "ran"]'),
     'RUN ["echo"', "instruction text differs"),
    ("SHELL", lambda s: s.edit('RUN ["echo", "ran"]', "RUN echo ran")
     or s.edit('SHELL ["/bin/sh", "-c"]', 'SHELL ["/bin/sh", "-ec"]'),
     "RUN echo ran", 'option shell: ["/bin/sh", "-c"] -> ["/bin/sh", "-ec"]'),
    ("USER", lambda s: s.edit("RUN echo ran", "USER 1:1\nRUN echo ran"), "RUN echo ran",
     'option user: "root" -> "1:1"'),
    ("WORKDIR", lambda s: s.edit("WORKDIR /w", "WORKDIR /w2"), "WORKDIR /w2",
     "instruction text differs: 'WORKDIR /w' vs 'WORKDIR /w2'"),
    ("base layer", lambda s: _retag(s, "bb2"), "COPY gen.txt /gen.txt",
     "differs: base layer"),
]

# changes that must keep every step cached
HITS = [
    ("mtime", lambda s: [os.utime(p, (1, 1)) for p in s.ctx.rglob("*") if not p.is_symlink()]),
    ("owner of a source", lambda s: [os.chown(p, 1234, 1234, follow_symlinks=False)
                                     for p in s.ctx.rglob("*")]),
    ("mode under --chmod", lambda s: (s.ctx / "conf/app.conf").chmod(0o600)),
    ("excluded file edited", w("src/x.log", "changed")),
]


def test_thirty_distinct_misses_each_explained(tmp_path: Path) -> None:
    s = Scenario(tmp_path)
    try:
        first = s.build()
        assert all(not st.cached for st in first.steps if st.layer is not None)
        explained = []
        for i, (what, change, step, says) in enumerate(CASES):
            change(s)
            res = s.build()
            missed = [st for st in res.steps if st.layer is not None and not st.cached]
            assert missed, f"case {i} ({what}): nothing missed"
            target = missed[0]
            if what == "other stage's file":  # after the other stage's own COPY
                assert missed[0].text == "COPY gen.txt /gen.txt", missed[0].text
                target = next(st for st in missed if st.stage != "gen")
            assert target.text.startswith(step), (what, target.text)
            assert target.explanation and says in target.explanation, (what,
                                                                        target.explanation)
            # every later step of its stage missed too, and said why
            later = [st for st in missed[1:] if st.stage == target.stage]
            for st in later:
                assert st.explanation, (what, st.text)
            explained.append(what)
            if what == "base layer":
                # the same change, seen from the final stage's first step
                final = next(st for st in missed if st.stage != "gen")
                assert final.text == "WORKDIR /w2", final.text
                assert "differs: base layer" in final.explanation, final.explanation
                explained.append("base layer of the final stage")
        assert len(set(explained)) >= 30
        for what, change in HITS:
            change(s)
            res = s.build()
            assert [st.text for st in res.steps if st.layer is not None and not st.cached] \
                == [], what
    finally:
        s.store.close()
