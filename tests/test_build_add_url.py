"""ADD from http(s) URLs (pylayers/build/download.py), against a real http.server on
127.0.0.1: the file as Docker saves it (mode 0600, named from the URL in a directory),
keyed by its content's digest (fetched each build) or by --checksum (a cached step
fetches nothing), the size limit, and each failure one line naming the ADD. The builds
need root, busybox-static and namespaces (tests/buildutil.py)."""

from __future__ import annotations

import hashlib
import http.server
import os
import sys
import threading
from pathlib import Path

import pytest

from pylayers.build.download import DownloadFailed, fetch, file_name, is_git, parse_checksum
from pylayers.errors import InvalidArgument

sys.path.insert(0, os.path.dirname(__file__))
from buildutil import needs_build  # noqa: E402
from test_build import Run, cli, context, ran  # noqa: E402

BASE = "FROM scratch\nCOPY busybox /bin/busybox\n"


class Server:
    """http.server serving `root` on 127.0.0.1, counting GET requests by path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(root), **kw)

            def do_GET(self):  # noqa: N802
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def www(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    root = tmp_path / "www"
    root.mkdir()
    (root / "tool.txt").write_text("version 1\n")
    s = Server(root)
    yield s
    s.close()


@pytest.fixture
def run(tmp_path: Path):
    r = Run(tmp_path / "store")
    yield r
    r.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the download alone ----------------------------------------------------------------


def test_names_git_urls_and_checksums():
    assert file_name("https://example.com/a/b/tool-1.2.tar.gz?x=1") == "tool-1.2.tar.gz"
    assert file_name("https://example.com/dir/my%20file") == "my file"
    with pytest.raises(InvalidArgument):
        file_name("https://example.com/")
    assert is_git("git@github.com:o/r.git") and is_git("https://github.com/o/r.git")
    assert is_git("git://host/r") and not is_git("https://example.com/r.tgz")
    assert parse_checksum("sha256:" + "Ab" * 32) == "ab" * 32
    for bad in ("md5:00", "sha256:12", "sha256:" + "g" * 64):
        with pytest.raises(InvalidArgument):
            parse_checksum(bad)


def test_fetch_limits_and_failures(www, tmp_path):
    got = fetch(www.url + "/tool.txt", str(tmp_path))
    assert Path(got.path).read_bytes() == b"version 1\n" and got.size == 10
    assert got.sha256 == sha(b"version 1\n")
    with pytest.raises(DownloadFailed, match="over the limit of 5"):
        fetch(www.url + "/tool.txt", str(tmp_path), limit=5)
    with pytest.raises(DownloadFailed, match="HTTP 404"):
        fetch(www.url + "/missing", str(tmp_path))
    with pytest.raises(DownloadFailed, match="checksum mismatch"):
        fetch(www.url + "/tool.txt", str(tmp_path), checksum="0" * 64)


# -- building --------------------------------------------------------------------------


@needs_build
def test_add_url_saved_as_docker_does_and_keyed_by_its_content(run, www, tmp_path):
    df = BASE + (f"ADD {www.url}/tool.txt /opt/\n"
                 f"ADD --chmod=0755 --chown=5:6 {www.url}/tool.txt /opt/renamed\n")
    ctx = context(tmp_path, df)
    res = run.build(ctx)
    tree = {e.path: e for e in run.layers.tree(res.layer_id)}
    one, two = tree[b"opt/tool.txt"], tree[b"opt/renamed"]
    assert run.layers.read_file(one) == b"version 1\n"
    assert (one.mode & 0o7777, one.uid, one.gid) == (0o600, 0, 0)
    assert (two.mode & 0o7777, two.uid, two.gid) == (0o755, 5, 6)
    assert len(www.requests) == 2
    # fetched again each build, cached while the content is the same
    again = run.build(ctx)
    assert ran(again) == [] and again.layer_id == res.layer_id and len(www.requests) == 4
    (www.root / "tool.txt").write_text("version 2\n")
    res = run.build(ctx, explain=True)
    assert ran(res) == [f"ADD {www.url}/tool.txt /opt/",
                        f"ADD --chmod=0755 --chown=5:6 {www.url}/tool.txt /opt/renamed"]
    why = res.steps[2].explanation
    assert "option url0" in why and sha(b"version 2\n") in why, why
    tree = {e.path: e for e in run.layers.tree(res.layer_id)}
    assert run.layers.read_file(tree[b"opt/tool.txt"]) == b"version 2\n"


@needs_build
def test_add_url_with_checksum_is_cached_without_a_request(run, www, tmp_path):
    digest = sha(b"version 1\n")
    ctx = context(tmp_path, BASE + f"ADD --checksum=sha256:{digest} {www.url}/tool.txt /tool\n")
    res = run.build(ctx)
    tree = {e.path: e for e in run.layers.tree(res.layer_id)}
    assert run.layers.read_file(tree[b"tool"]) == b"version 1\n"
    assert www.requests == ["/tool.txt"]
    assert ran(run.build(ctx)) == [] and www.requests == ["/tool.txt"]  # no download


@needs_build
def test_add_url_failures_are_one_line_naming_the_add(www, tmp_path):
    store = tmp_path / "store"
    (www.root / "big").write_bytes(b"x" * 4096)
    cases = [
        (f"ADD {www.url}/missing /x\n", {}, 1, f"Dockerfile:3: ADD: {www.url}/missing: "
         "download failed: HTTP 404"),
        (f"ADD --checksum=sha256:{'0' * 64} {www.url}/tool.txt /x\n", {}, 1,
         f"Dockerfile:3: ADD: {www.url}/tool.txt: checksum mismatch"),
        (f"ADD {www.url}/big /x\n", {"PYLAYERS_MAX_DOWNLOAD": "1000"}, 1,
         f"Dockerfile:3: ADD: {www.url}/big: 4096 bytes, over the limit of 1000"),
        ("ADD http://127.0.0.1:1/f /x\n", {}, 1,
         "Dockerfile:3: ADD: http://127.0.0.1:1/f: download failed: Connection refused"),
        ("ADD https://github.com/o/r.git /src\n", {}, 6,
         "Dockerfile:3: ADD: https://github.com/o/r.git: ADD of a git repository is not"),
        (f"COPY {www.url}/tool.txt /x\n", {}, 6,
         "Dockerfile:3: COPY: COPY does not take URLs (ADD does)"),
        (f"ADD {www.url}/ /x/\n", {}, 6, f"Dockerfile:3: ADD: {www.url}/: no file name"),
        (f"ADD --checksum=md5:1 {www.url}/tool.txt /x\n", {}, 6,
         "Dockerfile:3: ADD: --checksum=md5:1: sha256:"),
    ]
    for n, (line, env, code, says) in enumerate(cases):
        ctx = context(tmp_path / str(n), BASE + line)
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            res = cli(store, "build", str(ctx))
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        assert res.returncode == code, (line, res.stderr)
        assert res.stderr.startswith(f"pylayers: {says}"), res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
