"""Image references: `[REGISTRY/]REPO[:TAG][@DIGEST]`, as docker and the distribution
spec write them.

The first path component is the registry when it holds a `.` or a `:` or is
`localhost` (`127.0.0.1:5000/app:v1`, `ghcr.io/org/app`); otherwise the registry is
Docker Hub (`docker.io`, whose API host is `registry-1.docker.io`) and a one-component
name gets the `library/` prefix (`busybox` is `docker.io/library/busybox`). With
neither tag nor digest the tag is `latest`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UsageError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})")
_HOST = re.compile(r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
                   r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
                   r"|\[[0-9a-fA-F:.]+\])(?::[0-9]{1,5})?")


@dataclass(frozen=True)
class Reference:
    registry: str  # host[:port], as written (docker.io for Docker Hub)
    repository: str  # path components joined by "/"
    tag: str | None = None
    digest: str | None = None

    @property
    def ref(self) -> str:
        """What goes after `/manifests/`: the digest when there is one, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def host(self) -> str:
        """The host[:port] the API is reached at."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    def with_repository(self, repository: str) -> Reference:
        return Reference(self.registry, repository, self.tag, self.digest)

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> Reference:
    """The reference written `text`; UsageError (exit 2) when it is malformed."""
    if not text or len(text) > 4096 or any(c.isspace() for c in text):
        raise UsageError(f"{text!r} is not an image reference (REGISTRY/REPO[:TAG][@DIGEST])")
    name, digest = text, None
    if "@" in text:
        name, _, digest = text.partition("@")
        if not _DIGEST.fullmatch(digest):
            raise UsageError(f"{text!r}: malformed digest {digest!r} (sha256:<64 hex>)")
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, _, tag = name.rpartition(":")
        if not _TAG.fullmatch(tag):
            raise UsageError(f"{text!r}: malformed tag {tag!r}")
    parts = name.split("/")
    first = parts[0]
    if len(parts) > 1 and ("." in first or ":" in first or first == "localhost"
                           or first != first.lower()):
        registry, parts = first, parts[1:]
        if not _HOST.fullmatch(registry):
            raise UsageError(f"{text!r}: malformed registry {registry!r}")
    else:
        registry = DOCKER_HUB
    if not parts or not all(_COMPONENT.fullmatch(p) for p in parts):
        raise UsageError(f"{text!r}: malformed repository name (lowercase letters, digits "
                         "and . _ - separators, components joined by /)")
    if registry == DOCKER_HUB and len(parts) == 1:
        parts = ["library", *parts]
    repository = "/".join(parts)
    if len(repository) > 255:
        raise UsageError(f"{text!r}: repository name longer than 255 characters")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, repository, tag, digest)
