"""A client of the OCI distribution API (`/v2/`): blobs (existence checks, monolithic
and chunked uploads, cross-repository mounts, streamed and ranged downloads) and
manifests (GET with the OCI and docker v2 media types, PUT), over `http.client`.

One `RegistryClient` talks to one repository of one registry. It keeps a few
keep-alive connections, authenticates as the registry asks (`auth.py`), follows
redirects of blob downloads (a storage backend's URL gets no `Authorization`), and
counts the body bytes it sends and receives (`bytes_sent`, `bytes_received`, and the
blob data alone, `blob_bytes_sent`, `blob_bytes_received`). HTTPS is the default
(`ca_file`, `$PYLAYERS_REGISTRY_CA`, or docker's `/etc/docker/certs.d/HOST/ca.crt` add a
trusted CA); `insecure=True` skips certificate checks and, when the registry does not
speak TLS, uses plain HTTP.

Every manifest read is checked against its digest (the one asked for, else the
registry's `Docker-Content-Digest`); blob streams are not checked here: callers pass
them through `streams.Verifying`. Errors: `NotFound` (404, exit 3), `AuthError` (401,
403), `RegistryError` (anything else the registry or the network says), one line each.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, urljoin, urlsplit

from ..errors import CorruptData, InvalidArgument, NotFound, PylayersError
from .auth import Authenticator, AuthError, Credentials
from .config import MAX_JSON
from .layout import DOCKER_LIST, DOCKER_MANIFEST, INDEX, MANIFEST
from .reference import Reference, parse_reference
from .streams import parse_digest

__all__ = ["ACCEPT_MANIFESTS", "AuthError", "BlobStream", "RegistryClient", "RegistryError"]

ACCEPT_MANIFESTS = (MANIFEST, INDEX, DOCKER_MANIFEST, DOCKER_LIST)
CA_ENV = "PYLAYERS_REGISTRY_CA"
TIMEOUT_ENV = "PYLAYERS_REGISTRY_TIMEOUT"
DEFAULT_CHUNK = 64 << 20  # blobs larger than this are uploaded in chunks of this size
_BLOCK = 1 << 20
_MAX_ERROR_BODY = 64 << 10
_IDLE_PER_HOST = 4


class RegistryError(PylayersError):
    """The registry answered something unexpected, or could not be reached."""

    exit_code = 1


class _Counted:
    """A request body: `size` bytes of `src`, counted as they are sent."""

    def __init__(self, src: BinaryIO, size: int, count: Callable[[int], None],
                 progress: Callable[[int], None] | None) -> None:
        self.src = src
        self.size = size
        self.left = size
        self.count = count
        self.progress = progress
        self.start = src.tell() if src.seekable() else None

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        if n <= 0:
            return b""
        data = self.src.read(n)
        if not data:
            raise CorruptData(f"upload source ended {self.left} bytes before its size "
                              f"{self.size}")
        self.left -= len(data)
        self.count(len(data))
        if self.progress is not None:
            self.progress(len(data))
        return data

    def rewind(self) -> bool:
        if self.start is None:
            return False
        self.src.seek(self.start)
        self.left = self.size
        return True


class BlobStream:
    """A blob being downloaded: `read(n)` as a file. `status` is the HTTP status; for a
    ranged request `partial` says whether the server honoured the range (206: the body
    is `[start, start + length)` of the blob) or sent the whole blob (200). `headers`
    are the response's (a multipart/byteranges answer says so in Content-Type).
    `total` is the blob's size when the server said it. Close it (or use `with`)."""

    def __init__(self, client: RegistryClient, resp: http.client.HTTPResponse,
                 conn: http.client.HTTPConnection, key: tuple[str, str]) -> None:
        self._client = client
        self._resp = resp
        self._conn = conn
        self._key = key
        self.status = resp.status
        self.headers = resp.headers
        self.partial = resp.status == 206
        self.start = 0
        self.total: int | None = None
        length = resp.getheader("Content-Length")
        self.length = int(length) if length and length.isdigit() else None
        if self.partial:
            crange = resp.getheader("Content-Range", "")
            unit, _, spec = crange.partition(" ")
            span, _, total = spec.partition("/")
            first, _, _last = span.partition("-")
            if unit == "bytes" and first.isdigit():
                self.start = int(first)
            if total.isdigit():
                self.total = int(total)
        elif self.length is not None:
            self.total = self.length
        self.read_bytes = 0

    def read(self, n: int = -1) -> bytes:
        if self._resp is None:
            return b""
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(_BLOCK), b""))
        try:
            data = self._resp.read(n)
        except (OSError, http.client.HTTPException) as e:
            self._abort()
            raise RegistryError(f"{self._key[1]}: the connection broke during a blob "
                                f"download ({_reason(e)})") from None
        self.read_bytes += len(data)
        self._client._count_received(len(data), blob=True)
        if not data and n != 0:
            if self.length is not None and self.read_bytes < self.length:
                self._abort()
                raise RegistryError(f"{self._key[1]}: a blob download ended after "
                                    f"{self.read_bytes} of {self.length} bytes")
            self.close()
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def _abort(self) -> None:
        if self._resp is not None:
            self._conn.close()
            self._resp = None

    def interrupt(self) -> None:
        """From another thread: make a `read` blocked on the network fail now."""
        sock = getattr(self._conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        if self._resp is None:
            return
        if self._resp.isclosed():
            self._client._release(self._key, self._conn)
        else:
            self._conn.close()
        self._resp = None

    def __enter__(self) -> BlobStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reason(e: BaseException) -> str:
    if isinstance(e, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(e, ssl.SSLError):
        return f"TLS: {e.reason or e}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _registry_error(body: bytes) -> str:
    """The first `errors[]` entry of a registry's error body, as `CODE: message`."""
    try:
        doc = json.loads(body)
        err = doc["errors"][0]
        code, msg = str(err.get("code", "")), str(err.get("message", ""))
        return f"{code}: {msg}" if code and msg else code or msg
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, UnicodeDecodeError):
        return ""


class RegistryClient:
    """The distribution API of `ref`'s repository (only its registry and repository are
    used: tags and digests are arguments of the calls)."""

    def __init__(self, ref: Reference | str, *, insecure: bool = False,
                 credentials: Credentials | None = None, ca_file: str | None = None,
                 push: bool = False, timeout: float | None = None) -> None:
        self.ref = parse_reference(ref) if isinstance(ref, str) else ref
        self.repository = self.ref.repository
        self.host = self.ref.host
        self.insecure = insecure
        self.push = push
        self.timeout = timeout if timeout is not None else float(
            os.environ.get(TIMEOUT_ENV, "60"))
        self.bytes_sent = 0
        self.bytes_received = 0
        self.blob_bytes_sent = 0
        self.blob_bytes_received = 0
        self.requests = 0
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, str], list[http.client.HTTPConnection]] = {}
        self._scheme: str | None = None if insecure else "https"
        self._ssl = self._context(ca_file or os.environ.get(CA_ENV) or None)
        self._pending: dict[str, str] = {}  # digest -> upload URL a refused mount opened
        self.auth = Authenticator(self.host, credentials, self._fetch_token,
                                  allow_http=insecure)

    # -- connections -------------------------------------------------------------------
    def _context(self, ca_file: str | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        docker_ca = Path("/etc/docker/certs.d") / self.host / "ca.crt"
        for ca in (ca_file, docker_ca if docker_ca.is_file() else None):
            if ca:
                try:
                    ctx.load_verify_locations(cafile=str(ca))
                except (OSError, ssl.SSLError) as e:
                    raise InvalidArgument(f"{ca}: cannot load the CA file ({_reason(e)})"
                                          ) from None
        return ctx

    def _base(self) -> str:
        if self._scheme is None:  # insecure: TLS (unchecked) if it speaks it, else http
            host, port = _split(self.host, 443)
            conn = http.client.HTTPSConnection(host, port, timeout=self.timeout,
                                               context=self._ssl)
            try:
                conn.connect()
                self._scheme = "https"
            except ssl.SSLError:
                self._scheme = "http"
            except OSError as e:
                raise RegistryError(f"cannot connect to {self.host}: {_reason(e)}") from None
            finally:
                conn.close()
        return f"{self._scheme}://{self.host}"

    def _connection(self, key: tuple[str, str]) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                return idle.pop(), True
        scheme, netloc = key
        if scheme == "https":
            host, port = _split(netloc, 443)
            return http.client.HTTPSConnection(host, port, timeout=self.timeout,
                                               context=self._ssl, blocksize=_BLOCK), False
        host, port = _split(netloc, 80)
        return http.client.HTTPConnection(host, port, timeout=self.timeout,
                                          blocksize=_BLOCK), False

    def _release(self, key: tuple[str, str], conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < _IDLE_PER_HOST:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            conns = [c for cs in self._idle.values() for c in cs]
            self._idle.clear()
        for c in conns:
            c.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- counters ----------------------------------------------------------------------
    def _count_sent(self, n: int, blob: bool = False) -> None:
        with self._lock:
            self.bytes_sent += n
            if blob:
                self.blob_bytes_sent += n

    def _count_received(self, n: int, blob: bool = False) -> None:
        with self._lock:
            self.bytes_received += n
            if blob:
                self.blob_bytes_received += n

    def counters(self) -> dict[str, int]:
        return {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "blob_bytes_sent": self.blob_bytes_sent,
                "blob_bytes_received": self.blob_bytes_received, "requests": self.requests}

    # -- one exchange ------------------------------------------------------------------
    def _send(self, method: str, url: str, headers: dict[str, str],
              body: bytes | _Counted | None, what: str
              ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection,
                         tuple[str, str]]:
        u = urlsplit(url)
        key = (u.scheme, u.netloc)
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        for attempt in (0, 1):
            conn, reused = self._connection(key)
            try:
                with self._lock:
                    self.requests += 1
                conn.request(method, path, body=body, headers=headers)
                if isinstance(body, bytes):
                    self._count_sent(len(body))
                return conn.getresponse(), conn, key
            except (http.client.RemoteDisconnected, ConnectionResetError,
                    BrokenPipeError) as e:
                conn.close()
                # a keep-alive connection the server had closed: once more on a new one
                if reused and attempt == 0 and (not isinstance(body, _Counted)
                                                or body.rewind()):
                    continue
                raise RegistryError(f"{what}: the connection to {u.netloc} broke "
                                    f"({_reason(e)})") from None
            except ssl.SSLError as e:
                conn.close()
                hint = "" if self.insecure else \
                    " (a registry serving plain HTTP needs --insecure)"
                raise RegistryError(f"{what}: TLS with {u.netloc} failed "
                                    f"({_reason(e)}){hint}") from None
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise RegistryError(f"{what}: cannot reach {u.netloc} ({_reason(e)})"
                                    ) from None
        raise AssertionError("unreachable")

    def _scopes(self, extra: Sequence[str] = ()) -> tuple[str, ...]:
        actions = "pull,push" if self.push else "pull"
        return (f"repository:{self.repository}:{actions}", *extra)

    def _open(self, method: str, url: str, *, headers: dict[str, str] | None = None,
              body: bytes | _Counted | None = None, expect: Sequence[int] = (200,),
              what: str, scopes: Sequence[str] = (), not_found: bool = True
              ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection,
                         tuple[str, str]]:
        """Send, answering auth challenges and following redirects; the response is
        returned unread when its status is in `expect`, else an error is raised."""
        if url.startswith("/"):
            url = self._base() + url
        scope = self._scopes(scopes)
        base_netloc = urlsplit(self._base()).netloc
        tried_auth = False
        for _hop in range(6):
            h = dict(headers or {})
            h.setdefault("User-Agent", "pylayers")
            same_host = urlsplit(url).netloc == base_netloc
            auth = self.auth.authorization(scope) if same_host else None
            if auth:
                h["Authorization"] = auth
            if body is None and method in ("POST", "PUT", "PATCH"):
                h["Content-Length"] = "0"
            elif body is not None:
                h["Content-Length"] = str(len(body) if isinstance(body, bytes) else body.size)
            resp, conn, key = self._send(method, url, h, body, what)
            status = resp.status
            if status in expect:
                return resp, conn, key
            err = self._drain(resp, conn, key)
            if status == 401 and same_host and not tried_auth:
                tried_auth = True
                self.auth.challenge(resp.getheader("WWW-Authenticate"), scope)
                if isinstance(body, _Counted) and not body.rewind():
                    raise AuthError(f"{what}: {self.host} asked for authentication in "
                                    "the middle of an upload")
                continue
            if status in (301, 302, 303, 307, 308) and method in ("GET", "HEAD") \
                    and resp.getheader("Location"):
                url = urljoin(url, resp.getheader("Location"))
                if urlsplit(url).scheme not in ("http", "https"):
                    raise RegistryError(f"{what}: redirected to {url!r}")
                continue
            detail = _registry_error(err)
            tail = f" ({detail})" if detail else ""
            if status == 401:
                who = f"user {self.auth.credentials.username!r}" \
                    if self.auth.credentials else "anonymous access"
                raise AuthError(f"{what}: authentication failed on {self.host} ({who}"
                                f"{'; ' + detail if detail else ''})")
            if status == 403:
                raise AuthError(f"{what}: access denied by {self.host}{tail}")
            if status == 404 and not_found:
                raise NotFound(f"{what}: not found on {self.host}{tail}")
            raise RegistryError(f"{what}: {self.host} answered {status} {resp.reason}{tail}")
        raise RegistryError(f"{what}: too many redirects")

    def _drain(self, resp: http.client.HTTPResponse, conn: http.client.HTTPConnection,
               key: tuple[str, str], limit: int = _MAX_ERROR_BODY) -> bytes:
        """Read a (small) response to its end; the connection goes back to the pool."""
        try:
            data = resp.read(limit + 1)
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise RegistryError(f"{key[1]}: the connection broke ({_reason(e)})") from None
        self._count_received(len(data))
        if len(data) > limit or not resp.isclosed():
            conn.close()
            return data[:limit]
        self._release(key, conn)
        return data

    def _call(self, method: str, path: str, what: str, **kw
              ) -> tuple[http.client.HTTPResponse, bytes]:
        limit = kw.pop("limit", _MAX_ERROR_BODY)
        resp, conn, key = self._open(method, path, what=what, **kw)
        body = b"" if method == "HEAD" else self._drain(resp, conn, key, limit)
        if method == "HEAD":
            resp.read()
            if resp.isclosed():
                self._release(key, conn)
            else:
                conn.close()
        return resp, body

    def _fetch_token(self, url: str, headers: dict[str, str]) -> tuple[int, bytes]:
        h = {"User-Agent": "pylayers", **headers}
        resp, conn, key = self._send("GET", url, h, None, "token request")
        return resp.status, self._drain(resp, conn, key, MAX_JSON)

    # -- the API -----------------------------------------------------------------------
    def _path(self, kind: str, ref: str) -> str:
        return f"/v2/{self.repository}/{kind}/{quote(ref, safe=':')}"

    def ping(self) -> None:
        """GET /v2/: the registry is there and lets us in (answers its challenge)."""
        self._call("GET", "/v2/", f"{self.host}/v2/")

    def stat_blob(self, digest: str) -> int | None:
        """The blob's size if the repository has it, else None (HEAD)."""
        parse_digest(digest)
        resp, _ = self._call("HEAD", self._path("blobs", digest), f"blob {digest}",
                             expect=(200, 404), not_found=False)
        if resp.status == 404:
            return None
        length = resp.getheader("Content-Length", "")
        return int(length) if length.isdigit() else 0

    def has_blob(self, digest: str) -> bool:
        return self.stat_blob(digest) is not None

    def mount_blob(self, digest: str, from_repo: str) -> bool:
        """Mount `digest` from `from_repo` (same registry) without sending it: True if
        the registry did. When it did not (202), the upload it opened is kept for the
        next `push_blob` of that digest."""
        parse_digest(digest)
        path = (f"/v2/{self.repository}/blobs/uploads/?mount={quote(digest, safe=':')}"
                f"&from={quote(from_repo, safe='/')}")
        resp, _ = self._call("POST", path, f"mount of blob {digest} from {from_repo}",
                             expect=(201, 202), scopes=(f"repository:{from_repo}:pull",))
        if resp.status == 201:
            return True
        loc = resp.getheader("Location")
        if loc:
            self._pending[digest] = urljoin(self._base() + path, loc)
        return False

    def _start_upload(self, digest: str) -> str:
        pending = self._pending.pop(digest, None)
        if pending:
            return pending
        path = f"/v2/{self.repository}/blobs/uploads/"
        resp, _ = self._call("POST", path, f"upload of blob {digest}", expect=(202,))
        loc = resp.getheader("Location")
        if not loc:
            raise RegistryError(f"upload of blob {digest}: {self.host} gave no Location")
        return urljoin(self._base() + path, loc)

    def push_blob(self, digest: str, data: bytes | BinaryIO, size: int | None = None, *,
                  chunk_size: int = DEFAULT_CHUNK,
                  progress: Callable[[int], None] | None = None) -> None:
        """Upload a blob: one PUT when it is at most `chunk_size` bytes, else PATCHes of
        `chunk_size` bytes (Content-Range) and a closing PUT. `data` is bytes or a
        binary file positioned at the blob's start (`size` bytes are read from it)."""
        parse_digest(digest)
        if isinstance(data, bytes | bytearray | memoryview):
            data = bytes(data)
            size = len(data)
            src: BinaryIO = io.BytesIO(data)
        else:
            if size is None:
                raise InvalidArgument("push_blob: the size of a stream is needed")
            src = data
        if chunk_size <= 0:
            raise InvalidArgument("chunk size must be positive")
        what = f"upload of blob {digest}"
        location = self._start_upload(digest)
        ctype = {"Content-Type": "application/octet-stream"}

        def count(n: int) -> None:
            self._count_sent(n, blob=True)

        if size > chunk_size:
            offset = 0
            while offset < size:
                n = min(chunk_size, size - offset)
                h = {**ctype, "Content-Range": f"{offset}-{offset + n - 1}"}
                resp, _ = self._call("PATCH", location, what, headers=h, expect=(202,),
                                     body=_Counted(src, n, count, progress))
                loc = resp.getheader("Location")
                if loc:
                    location = urljoin(location, loc)
                got = resp.getheader("Range", "")
                if got and got.rpartition("-")[2] != str(offset + n - 1):
                    raise RegistryError(f"{what}: {self.host} has {got} after a chunk "
                                        f"ending at {offset + n - 1}")
                offset += n
            body: _Counted | None = None
        else:
            body = _Counted(src, size, count, progress)
        sep = "&" if urlsplit(location).query else "?"
        put = f"{location}{sep}digest={quote(digest, safe=':')}"
        resp, _ = self._call("PUT", put, what, headers=ctype if body is not None else {},
                             body=body, expect=(201, 204))
        got = resp.getheader("Docker-Content-Digest")
        if got and got != digest:
            raise RegistryError(f"{what}: {self.host} stored it as {got}")

    def open_blob(self, digest: str, range: tuple[int, int | None] | None = None, *,
                  headers: dict[str, str] | None = None) -> BlobStream:
        """Stream a blob (or `range`, [start, end) with end None for "to the end");
        see `BlobStream` for whether a range was honoured. `headers` are added to the
        request (a caller may send its own Range)."""
        parse_digest(digest)
        h = dict(headers or {})
        if range is not None:
            start, end = range
            if start < 0 or (end is not None and end <= start):
                raise InvalidArgument(f"bad range {range!r}")
            h["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        resp, conn, key = self._open("GET", self._path("blobs", digest), headers=h,
                                     expect=(200, 206), what=f"blob {digest}")
        return BlobStream(self, resp, conn, key)

    def get_manifest(self, ref: str, accept: Sequence[str] | None = None
                     ) -> tuple[str, bytes, str]:
        """(media type, exact bytes, digest) of the manifest or index `ref` (a tag or a
        digest), checked against the digest asked for or the one the registry states."""
        h = {"Accept": ", ".join(accept or ACCEPT_MANIFESTS)}
        what = f"manifest {self.ref.registry}/{self.repository}{'@' if ':' in ref else ':'}{ref}"
        resp, data = self._call("GET", self._path("manifests", ref), what, headers=h,
                                limit=MAX_JSON)
        if len(data) >= MAX_JSON:
            raise CorruptData(f"{what} is larger than {MAX_JSON} bytes")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if ":" in ref:  # asked for by digest
            algo, _ = parse_digest(ref)
            got = f"{algo}:{hashlib.new(algo, data).hexdigest()}"
            if got != ref:
                raise CorruptData(f"{what} does not match its digest (it is {got})")
            digest = ref
        stated = resp.getheader("Docker-Content-Digest")
        if stated and stated.startswith("sha256:") and stated != digest:
            raise CorruptData(f"{what} does not match the digest the registry states "
                              f"({stated}; it is {digest})")
        mt = (resp.getheader("Content-Type") or "").split(";")[0].strip()
        if mt not in ACCEPT_MANIFESTS:
            try:
                doc = json.loads(data)
                mt = doc.get("mediaType") or mt if isinstance(doc, dict) else mt
            except (ValueError, UnicodeDecodeError):
                pass
        return str(mt), data, digest

    def head_manifest(self, ref: str, accept: Sequence[str] | None = None
                      ) -> str | None:
        """The digest of manifest `ref` if the registry has it (HEAD), else None."""
        h = {"Accept": ", ".join(accept or ACCEPT_MANIFESTS)}
        resp, _ = self._call("HEAD", self._path("manifests", ref), f"manifest {ref}",
                             headers=h, expect=(200, 404), not_found=False)
        if resp.status == 404:
            return None
        return resp.getheader("Docker-Content-Digest")

    def put_manifest(self, ref: str, media_type: str, data: bytes) -> str:
        """PUT a manifest or index under `ref` (a tag, or its own digest); its digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        what = f"manifest {self.ref.registry}/{self.repository}:{ref}"
        resp, _ = self._call("PUT", self._path("manifests", ref), what,
                             headers={"Content-Type": media_type}, body=data,
                             expect=(201, 200, 204))
        got = resp.getheader("Docker-Content-Digest")
        if got and got != digest:
            raise RegistryError(f"{what}: {self.host} stored it as {got}, not {digest}")
        return digest


def _split(netloc: str, default: int) -> tuple[str, int]:
    if netloc.startswith("["):
        host, _, rest = netloc[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = netloc.partition(":")
    return host, int(port) if port.isdigit() else default
