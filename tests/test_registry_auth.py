"""Registry authentication against real servers: docker-registry with htpasswd basic
auth behind TLS (a self-signed certificate the client trusts through --ca-file), and
docker-registry with token auth, its realm a small token server run by the test that
signs RS256 JWTs (with openssl) for the scopes asked, as Docker Hub's does. Credentials
from --user, the environment and docker's config.json; refusals are one line naming
authentication, exit 1."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import registryutil  # noqa: E402
from registryutil import Registry, htpasswd_line, make_cert  # noqa: E402
from treeutil import File, build, snapshot  # noqa: E402

USER, PASSWORD = "alice", "s3cret pass:word"


@pytest.fixture
def store(tmp_path) -> Path:
    store = tmp_path / "store"
    build(tmp_path / "src", [File("f", b"hello registry\n" * 1000)])
    snapshot(store, tmp_path / "src", "-t", "v1")
    return store


def cli(store: Path, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("PYLAYERS_REGISTRY")}
    full.update(env or {})
    argv = [sys.executable, "-m", "pylayers", "--store", str(store), *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, env=full, cwd=store.parent,
                          timeout=120)


def one_line_error(proc: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def basic_tls(tmp_path) -> tuple[Registry, Path]:
    root = tmp_path / "reg"
    root.mkdir()
    cert, key = make_cert(root)
    reg = Registry(root, htpasswd=htpasswd_line(USER, PASSWORD), tls=(cert, key))
    reg.start()
    try:
        yield reg, cert
    finally:
        reg.stop()


def test_basic_auth_over_tls(tmp_path, store, basic_tls) -> None:
    reg, cert = basic_tls
    dest = f"{reg.host}/private/app:v1"
    ca = ("--ca-file", cert)
    # no credentials, wrong ones: refused, naming authentication
    one_line_error(cli(store, "push", "v1", dest, *ca), 1, "authentication required")
    one_line_error(cli(store, "push", "v1", dest, *ca, "--user", f"{USER}:wrong"), 1,
                   "authentication failed", USER)
    # the certificate is not trusted without the CA file, unless --insecure
    one_line_error(cli(store, "push", "v1", dest, "--user", f"{USER}:{PASSWORD}"), 1, "TLS")
    proc = cli(store, "push", "v1", dest, *ca, "--user", f"{USER}:{PASSWORD}", "--json")
    assert proc.returncode == 0, proc.stderr
    digest = json.loads(proc.stdout)["digest"]
    # the password from the environment; the CA from $PYLAYERS_REGISTRY_CA
    proc = cli(tmp_path / "s2", "pull", dest, "--user", USER, "--json",
               env={"PYLAYERS_REGISTRY_PASSWORD": PASSWORD, "PYLAYERS_REGISTRY_CA": str(cert)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["digest"] == digest
    # user and password from the environment, certificate unchecked
    proc = cli(tmp_path / "s3", "pull", dest, "--insecure",
               env={"PYLAYERS_REGISTRY_USER": USER, "PYLAYERS_REGISTRY_PASSWORD": PASSWORD})
    assert proc.returncode == 0, proc.stderr
    # docker's config.json
    home = tmp_path / "home"
    (home / ".docker").mkdir(parents=True)
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (home / ".docker/config.json").write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
    proc = cli(tmp_path / "s4", "pull", dest, *ca, env={"HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    # --user without a password and none in the environment: said before any request
    one_line_error(cli(tmp_path / "s5", "pull", dest, *ca, "--user", USER), 6, "password")


# -- token auth ------------------------------------------------------------------------------
def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """The token endpoint of the distribution spec's token auth: Basic credentials in,
    a JWT signed with `key` (RS256, the certificate in its x5c header) granting the
    scopes asked for out; anonymous callers get tokens granting nothing."""

    def __init__(self, root: Path, issuer: str, service: str) -> None:
        self.cert, self.key = make_cert(root, "token")
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
                             check=True, capture_output=True).stdout
        self.x5c = base64.b64encode(der).decode()
        self.issuer, self.service = issuer, service
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                q = parse_qs(urlsplit(self.path).query)
                auth = self.headers.get("Authorization", "")
                user = None
                if auth.startswith("Basic "):
                    u, _, p = base64.b64decode(auth[6:]).decode().partition(":")
                    if (u, p) != (USER, PASSWORD):
                        self.send_response(401)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    user = u
                server.requests.append({"user": user, "scope": q.get("scope", []),
                                        "service": q.get("service", [])})
                body = json.dumps({"token": server.token(user, q.get("scope", [])),
                                   "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def token(self, user: str | None, scopes: list[str]) -> str:
        access = []
        for s in scopes:
            kind, _, rest = s.partition(":")
            name, _, actions = rest.rpartition(":")
            if user is not None:
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {"iss": self.issuer, "sub": user or "", "aud": self.service,
                  "exp": now + 300, "nbf": now - 10, "iat": now,
                  "jti": b64url(os.urandom(12)), "access": access}
        signing = (b64url(json.dumps(header).encode()) + "." +
                   b64url(json.dumps(claims).encode()))
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)],
                             input=signing.encode(), check=True, capture_output=True).stdout
        return signing + "." + b64url(sig)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def token_registry(tmp_path) -> tuple[Registry, TokenServer]:
    registryutil.need_registry()
    root = tmp_path / "reg"
    root.mkdir()
    tokens = TokenServer(root, "pylayers-test-issuer", "pylayers-test")
    reg = Registry(root, token={"realm": tokens.url, "service": "pylayers-test",
                                "issuer": "pylayers-test-issuer",
                                "rootcertbundle": str(tokens.cert)})
    reg.start()
    try:
        yield reg, tokens
    finally:
        reg.stop()
        tokens.close()


def test_bearer_token_auth(tmp_path, store, token_registry) -> None:
    reg, tokens = token_registry
    creds = ("--user", f"{USER}:{PASSWORD}", "--insecure")
    # anonymous: a token granting nothing, refused
    one_line_error(cli(store, "push", "v1", f"{reg.host}/app:v1", "--insecure"), 1,
                   "authentication failed")
    tokens.requests.clear()
    proc = cli(store, "push", "v1", f"{reg.host}/app:v1", *creds, "--json")
    assert proc.returncode == 0, proc.stderr
    first = json.loads(proc.stdout)
    # one token for the whole push, for the scope it needs, cached across its requests
    assert [r["scope"] for r in tokens.requests] == [["repository:app:pull,push"]]
    assert tokens.requests[0]["user"] == USER and tokens.requests[0]["service"] == [
        "pylayers-test"]
    # a push to another repository mounts from the first: a token for both scopes
    tokens.requests.clear()
    proc = cli(store, "push", "v1", f"{reg.host}/other:v1", *creds, "--json")
    assert proc.returncode == 0, proc.stderr
    other = json.loads(proc.stdout)
    assert other["blobs_mounted"] == 2 and other["blob_bytes_sent"] == 0
    assert ["repository:app:pull", "repository:other:pull,push"] in \
        [sorted(r["scope"]) for r in tokens.requests]
    # pull with a pull-only token
    tokens.requests.clear()
    proc = cli(tmp_path / "s2", "pull", f"{reg.host}/app:v1", *creds, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["digest"] == first["digest"]
    assert [r["scope"] for r in tokens.requests] == [["repository:app:pull"]]
    # wrong password: the token endpoint refuses
    one_line_error(cli(tmp_path / "s3", "pull", f"{reg.host}/app:v1", "--insecure",
                       "--user", f"{USER}:nope"), 1, "authentication failed")
