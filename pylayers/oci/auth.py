"""Registry credentials and the distribution spec's authentication: anonymous, HTTP
Basic, and bearer tokens (a `WWW-Authenticate: Bearer realm=...,service=...,scope=...`
challenge sends the client to the token endpoint; the token it returns is cached per
set of scopes until it expires).

Credentials, the first found (README, "Registries"):

1. `--user USER[:PASS]` (the password, when left out, from `$PYLAYERS_REGISTRY_PASSWORD`);
2. `$PYLAYERS_REGISTRY_USER` and `$PYLAYERS_REGISTRY_PASSWORD`;
3. the `auths` of docker's `config.json` (`$DOCKER_CONFIG/config.json`, else
   `~/.docker/config.json`) for the registry's host: `auth` (base64 `user:pass`) or
   `username` and `password`. Credential helpers (`credsStore`, `credHelpers`) and
   identity tokens are not read.

Without credentials requests go anonymously (a token endpoint gives anonymous pull
tokens for public images).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from ..errors import InvalidArgument, PylayersError

USER_ENV = "PYLAYERS_REGISTRY_USER"
PASSWORD_ENV = "PYLAYERS_REGISTRY_PASSWORD"


class AuthError(PylayersError):
    """The registry refused our credentials or wants some we do not have (401/403)."""

    exit_code = 1


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def __repr__(self) -> str:  # never show a password in a traceback
        return f"Credentials({self.username!r}, ***)"


def parse_user(text: str, env: Mapping[str, str] | None = None) -> Credentials:
    """`USER[:PASS]`; without `:PASS` the password comes from $PYLAYERS_REGISTRY_PASSWORD."""
    env = os.environ if env is None else env
    user, sep, password = text.partition(":")
    if not user:
        raise InvalidArgument("--user: empty user name (USER[:PASS])")
    if not sep:
        if PASSWORD_ENV not in env:
            raise InvalidArgument(f"--user {user}: no password (give USER:PASS or set "
                                  f"${PASSWORD_ENV})")
        password = env[PASSWORD_ENV]
    return Credentials(user, password)


def _docker_config_path(env: Mapping[str, str]) -> Path:
    if env.get("DOCKER_CONFIG"):
        return Path(env["DOCKER_CONFIG"]) / "config.json"
    return Path(env.get("HOME") or Path.home()) / ".docker" / "config.json"


def _docker_keys(host: str) -> list[str]:
    keys = [host, f"https://{host}", f"http://{host}", f"https://{host}/v1/",
            f"https://{host}/v2/"]
    if host in ("docker.io", "registry-1.docker.io", "index.docker.io"):
        keys += ["https://index.docker.io/v1/", "index.docker.io", "docker.io",
                 "registry-1.docker.io"]
    return keys


def docker_config_credentials(host: str, env: Mapping[str, str] | None = None
                              ) -> Credentials | None:
    """The credentials docker's config.json holds for `host`, if any."""
    env = os.environ if env is None else env
    path = _docker_config_path(env)
    try:
        doc = json.loads(path.read_bytes()[: 4 << 20])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"{path}: cannot read docker's config ({e})") from None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        return None
    for key in _docker_keys(host):
        entry = auths.get(key)
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise InvalidArgument(f"{path}: auths[{key!r}].auth is not base64 "
                                      "user:password") from None
            if sep:
                return Credentials(user, password)
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return Credentials(entry["username"], entry["password"])
    return None


def find_credentials(host: str, user: str | None = None,
                     env: Mapping[str, str] | None = None) -> Credentials | None:
    """The credentials to use for `host` (see the module's docstring), or None."""
    env = os.environ if env is None else env
    if user is not None:
        return parse_user(user, env)
    if env.get(USER_ENV):
        return Credentials(env[USER_ENV], env.get(PASSWORD_ENV, ""))
    return docker_config_credentials(host, env)


def parse_challenge(header: str) -> list[tuple[str, dict[str, str]]]:
    """The challenges of a WWW-Authenticate header: [(scheme lowercased, params)]."""
    out: list[tuple[str, dict[str, str]]] = []
    i, n = 0, len(header)
    while i < n:
        while i < n and header[i] in " ,":
            i += 1
        j = i
        while j < n and header[j] not in " ,=":
            j += 1
        token = header[i:j]
        if not token:
            break
        k = j
        while k < n and header[k] == " ":
            k += 1
        if k < n and header[k] == "=" and out:  # a parameter of the current challenge
            k += 1
            while k < n and header[k] == " ":
                k += 1
            if k < n and header[k] == '"':
                k += 1
                val = []
                while k < n and header[k] != '"':
                    if header[k] == "\\" and k + 1 < n:
                        k += 1
                    val.append(header[k])
                    k += 1
                value, k = "".join(val), k + 1
            else:
                e = k
                while e < n and header[e] != ",":
                    e += 1
                value, k = header[k:e].strip(), e
            out[-1][1][token.lower()] = value
            i = k
        else:  # a new scheme
            out.append((token.lower(), {}))
            i = j
    return out


# a token request: (url, headers) -> (status, body)
Fetch = Callable[[str, dict[str, str]], tuple[int, bytes]]


class Authenticator:
    """What to send in `Authorization`, learnt from the registry's challenges.

    `authorization(scopes)` gives the header for a request needing `scopes` (None:
    anonymous); after a 401, `challenge(header, scopes)` obtains what the challenge asks
    for (a Basic login, a token for the scopes), and the request is sent again."""

    def __init__(self, host: str, credentials: Credentials | None, fetch: Fetch,
                 allow_http: bool = False) -> None:
        self.host = host
        self.credentials = credentials
        self.fetch = fetch
        self.allow_http = allow_http
        self._lock = threading.Lock()
        self._basic = False
        self._bearer: dict[str, str] | None = None  # the bearer challenge's params
        self._tokens: dict[tuple[str, ...], tuple[str, float]] = {}

    def authorization(self, scopes: tuple[str, ...]) -> str | None:
        with self._lock:
            bearer = self._bearer
            if bearer is None:
                return self.credentials.basic() \
                    if self._basic and self.credentials is not None else None
            tok = self._tokens.get(_key(scopes))
        if not tok or tok[1] <= time.monotonic():
            # the registry wants tokens: get one for these scopes before asking
            self._token(bearer, scopes)
            with self._lock:
                tok = self._tokens.get(_key(scopes))
        return "Bearer " + tok[0] if tok else None

    def challenge(self, header: str | None, scopes: tuple[str, ...]) -> None:
        """Answer a 401's challenge so that the next `authorization(scopes)` works;
        AuthError when it cannot be answered."""
        challenges = parse_challenge(header or "")
        schemes = {s: p for s, p in challenges}
        if "bearer" in schemes and "realm" in schemes["bearer"]:
            self._token(schemes["bearer"], scopes)
            return
        if "basic" in schemes:
            if self.credentials is None:
                raise AuthError(f"{self.host}: authentication required (give --user USER:PASS "
                                f"or set ${USER_ENV} and ${PASSWORD_ENV})")
            with self._lock:
                if self._basic:  # we sent them, and they were refused
                    raise AuthError(f"{self.host}: authentication failed for user "
                                    f"{self.credentials.username!r}")
                self._basic = True
            return
        raise AuthError(f"{self.host}: authentication required, and the registry's "
                        f"challenge is not one pylayers answers ({header or 'none'})")

    def _token(self, params: dict[str, str], scopes: tuple[str, ...]) -> None:
        realm = params["realm"]
        u = urlsplit(realm)
        if u.scheme not in ("https", "http") or not u.netloc:
            raise AuthError(f"{self.host}: the token realm {realm!r} is not an http(s) URL")
        if u.scheme == "http" and not self.allow_http:
            raise AuthError(f"{self.host}: the token realm {realm} is plain http "
                            "(allowed with --insecure)")
        wanted = merge_scopes([*scopes, *params.get("scope", "").split(" ")])
        query: list[tuple[str, str]] = []
        if params.get("service"):
            query.append(("service", params["service"]))
        query += [("scope", s) for s in wanted]
        url = realm + ("&" if u.query else "?") + urlencode(query)
        headers = {}
        if self.credentials is not None:
            headers["Authorization"] = self.credentials.basic()
        key = _key(scopes)
        status, body = self.fetch(url, headers)
        if status in (401, 403):
            who = f"user {self.credentials.username!r}" if self.credentials else "anonymous"
            raise AuthError(f"{self.host}: authentication failed ({who} refused by the "
                            f"token endpoint {u.netloc}, status {status})")
        if status != 200:
            raise AuthError(f"{self.host}: the token endpoint {u.netloc} answered {status}")
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
            expires = int(doc.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError, UnicodeDecodeError):
            token = None
        if not isinstance(token, str) or not token:
            raise AuthError(f"{self.host}: the token endpoint {u.netloc} gave no token")
        with self._lock:
            self._bearer = params
            # a little before it expires, so that no request goes out with a stale one
            self._tokens[key] = (token, time.monotonic() + max(expires - 10, 5))


def merge_scopes(scopes: list[str]) -> list[str]:
    """`type:name:actions` scopes with the actions of the same resource joined, sorted
    (`repository:a:pull` and `repository:a:pull,push` make `repository:a:pull,push`)."""
    merged: dict[str, set[str]] = {}
    for s in scopes:
        if not s:
            continue
        resource, sep, actions = s.rpartition(":")
        if not sep or ":" not in resource:
            merged.setdefault(s, set())
            continue
        merged.setdefault(resource, set()).update(a for a in actions.split(",") if a)
    return sorted(f"{r}:{','.join(sorted(a))}" if a else r for r, a in merged.items())


def _key(scopes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted(set(scopes)))
