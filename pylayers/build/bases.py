"""`FROM` (and `COPY --from`) an image in a registry: which names are references, and
pulling one into the store as a build's base.

The rule (README, "Building images from Dockerfiles"): a name with a digest
(`name@sha256:...`) or whose first path component is a registry host (it holds a `.` or
a `:`, or is `localhost`, and a `/` follows it: `127.0.0.1:5000/busybox:1`,
`docker.io/library/busybox`) is a registry reference; any other name (`base`,
`app:v2`, a layer id or prefix) is a tag or layer in the store and never goes to the
network. What a name means so never depends on what the store holds.

A reference by tag is resolved at the registry on every build (as `docker build
--pull`), so a tag moved to another image gives another base layer, and the steps after
FROM miss the cache (their keys chain to the base's layer id). Layers the store has are
not fetched again (registry_transfer's known chains), and the chunk artifact is used
when the registry has one. A reference by digest is resolved once: the image it named
is recorded in STORE/registry/bases.json (digest and platform -> top layer and config
digest; only a cache, checked against the store before use), so a later build of it
makes no request at all.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import CorruptData
from ..layers.repo import Layers
from ..oci import config as image_config
from ..oci.auth import find_credentials
from ..oci.reference import Reference, parse_reference

_MAX_RECORDS = 10_000


def is_reference(name: str) -> bool:
    """True when `name` names an image in a registry rather than the store (the rule
    above)."""
    if "@" in name:
        return True
    first, slash, _ = name.partition("/")
    return bool(slash) and ("." in first or ":" in first or first == "localhost")


@dataclass(frozen=True)
class RegistryOptions:
    """How a build reaches registries: push and pull's `--insecure`, `--ca-file`,
    `--user USER[:PASS]` (credentials otherwise as those commands find them)."""

    insecure: bool = False
    ca_file: str | None = None
    user: str | None = None


@dataclass(frozen=True)
class Base:
    layer: bytes  # the image's top layer in the store
    config: bytes  # its image config, exact bytes
    manifest_digest: str | None  # None: found by digest in the store, no request made
    reference: str


class _Records:
    """STORE/registry/bases.json: {"DIGEST|PLATFORM": [top layer hex, config digest]}."""

    def __init__(self, store_path: Path) -> None:
        self.path = store_path / "registry" / "bases.json"

    def _load(self) -> dict:
        try:
            doc = json.loads(self.path.read_bytes()[:16 << 20])
        except (OSError, ValueError, UnicodeDecodeError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def get(self, key: str) -> tuple[bytes, str] | None:
        e = self._load().get(key)
        if not (isinstance(e, list) and len(e) == 2 and all(isinstance(x, str) for x in e)):
            return None
        try:
            layer = bytes.fromhex(e[0])
        except ValueError:
            return None
        return layer, e[1]

    def put(self, key: str, layer: bytes, config_digest: str) -> None:
        doc = self._load()
        doc.pop(key, None)
        doc[key] = [layer.hex(), config_digest]
        while len(doc) > _MAX_RECORDS:
            del doc[next(iter(doc))]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc, separators=(",", ":")))
        os.replace(tmp, self.path)


def _stored(layers: Layers, layer: bytes, config_digest: str) -> bytes | None:
    """The config `config_digest` of the image on `layer`, if the store still has both."""
    if not layers.exists(layer):
        return None
    return image_config.by_digest(layers.store, config_digest)


def pull_base(layers: Layers, name: str, *, platform: str | None = None,
              options: RegistryOptions | None = None) -> Base:
    """The image `name` (a registry reference) in the store: pulled (only what the store
    lacks), or, for a digest the store has, found without a request. Errors are the
    pull's (one line each: NotFound for an unknown tag or digest, RegistryError for an
    unreachable registry, UsageError for a malformed reference)."""
    from ..oci.registry_transfer import pull_image

    opts = options or RegistryOptions()
    ref: Reference = parse_reference(name)
    records = _Records(layers.store.path)
    key = f"{ref.digest}|{platform or ''}" if ref.digest else None
    if key is not None and (known := records.get(key)) is not None:
        cfg = _stored(layers, *known)
        if cfg is not None:
            return Base(known[0], cfg, None, str(ref))
    res = pull_image(layers, ref, platform=platform, insecure=opts.insecure,
                     credentials=find_credentials(ref.host, opts.user),
                     ca_file=opts.ca_file)
    cfg = _stored(layers, res.top, res.config_digest)
    if cfg is None:  # a gc between the pull's commit and here
        raise CorruptData(f"{ref}: its config {res.config_digest} is not in the store after "
                          "the pull")
    if key is not None:
        records.put(key, res.top, res.config_digest)
    return Base(res.top, cfg, res.manifest_digest, str(ref))


__all__ = ["Base", "RegistryOptions", "is_reference", "pull_base"]
