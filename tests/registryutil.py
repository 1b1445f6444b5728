"""A real OCI registry for tests: Debian's `docker-registry` (the CNCF distribution
server) on 127.0.0.1, a free port, its own config.yml and a temporary storage
directory. Optional: htpasswd basic auth, TLS with a self-signed certificate made by
openssl, token auth pointing at a realm the test runs.

    import registryutil
    registry = registryutil.registry  # the fixture, under its name in the test module

    def test_x(registry):            # started, plain HTTP, anonymous
        registry.host                # "127.0.0.1:PORT"
        registry.blob_path(digest)   # the blob's data file in the storage directory
        registry.stop(); registry.start()

Tests that need it skip (with the reason) where the binary is absent.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

BINARY = "docker-registry"


def need_registry() -> str:
    path = shutil.which(BINARY)
    if path is None:
        pytest.skip(f"{BINARY} is not installed (Debian: docker-registry)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cert(directory: Path, name: str = "registry") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost: (cert, key)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (Debian: openssl)")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def htpasswd_line(user: str, password: str) -> str:
    """A bcrypt htpasswd line (the registry takes no other hash)."""
    if shutil.which("htpasswd") is None:
        pytest.skip("htpasswd is not installed (Debian: apache2-utils)")
    out = subprocess.run(["htpasswd", "-nbB", user, password], check=True,
                         capture_output=True, text=True).stdout
    return out.strip() + "\n"


class Registry:
    """One docker-registry process; `start()`/`stop()` may be repeated (same port and
    storage)."""

    def __init__(self, root: Path, *, htpasswd: str | None = None,
                 tls: tuple[Path, Path] | None = None, token: dict | None = None) -> None:
        self.binary = need_registry()
        self.root = root
        self.storage = root / "storage"
        self.storage.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.tls = tls
        self.scheme = "https" if tls else "http"
        self.log = root / "registry.log"
        self.proc: subprocess.Popen | None = None
        lines = ["version: 0.1", "log:", "  level: warn", "  accesslog:", "    disabled: true",
                 "storage:", "  filesystem:", f"    rootdirectory: {self.storage}",
                 "  delete:", "    enabled: true", "  maintenance:", "    uploadpurging:",
                 "      enabled: false", "http:", f"  addr: {self.host}",
                 "  secret: pylayers-test-secret"]
        if tls:
            lines += ["  tls:", f"    certificate: {tls[0]}", f"    key: {tls[1]}"]
        if htpasswd is not None:
            (root / "htpasswd").write_text(htpasswd)
            lines += ["auth:", "  htpasswd:", "    realm: pylayers-test",
                      f"    path: {root / 'htpasswd'}"]
        elif token is not None:
            lines += ["auth:", "  token:"] + [f"    {k}: {v}" for k, v in token.items()]
        self.config = root / "config.yml"
        self.config.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 15) -> None:
        assert self.proc is None
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.binary, "serve", str(self.config)],
                                         stdout=log, stderr=log,
                                         env={**os.environ, "OTEL_TRACES_EXPORTER": "none"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("docker-registry did not start listening")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def blob_path(self, digest: str) -> Path:
        algo, _, hexpart = digest.partition(":")
        return (self.storage / "docker/registry/v2/blobs" / algo / hexpart[:2] / hexpart
                / "data")

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.host}{path}"

    def get(self, path: str) -> bytes:
        """An anonymous GET (for a plain-HTTP registry without auth)."""
        with urllib.request.urlopen(self.url(path), timeout=10) as r:
            return r.read()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    """A started plain-HTTP registry without auth; stopped at the test's end."""
    reg = Registry(tmp_path / "registry")
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of a registry, for network faults: `cut_after`
    bytes sent to clients in all (then every connection is closed and new ones are
    refused, as if the registry went away), `rate` bytes per second to clients.
    `received` counts the bytes it passed to clients."""

    def __init__(self, upstream: str, cut_after: int | None = None,
                 rate: float | None = None) -> None:
        import threading

        self.upstream = upstream
        self.cut_after = cut_after
        self.rate = rate
        self.received = 0
        self.dead = threading.Event()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.host = f"127.0.0.1:{self.server.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.dead.is_set():
                client.close()
                continue
            host, _, port = self.upstream.partition(":")
            try:
                up = socket.create_connection((host, int(port)))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, up]
            threading.Thread(target=self._pump, args=(client, up, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        try:
            while not self.dead.is_set():
                data = src.recv(16384)
                if not data:
                    break
                if down:
                    with self._lock:
                        if self.cut_after is not None and \
                                self.received + len(data) > self.cut_after:
                            data = data[:max(self.cut_after - self.received, 0)]
                            self.received += len(data)
                            dst.sendall(data)
                            self.kill()
                            return
                        self.received += len(data)
                    if self.rate:
                        time.sleep(len(data) / self.rate)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def kill(self) -> None:
        """Close every connection; refuse new ones."""
        self.dead.set()
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.kill()
        self.server.close()
        for s in self._socks:
            s.close()
