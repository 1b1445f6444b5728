"""OCI image layouts (the image-spec's `image-layout.md`): a directory with
`oci-layout`, `index.json` and `blobs/<alg>/<hex>`. Reading finds an image manifest by
its `org.opencontainers.image.ref.name` annotation (or the only one), following nested
indexes to this machine's platform; every blob is opened through a digest and size
check. Writing adds blobs by digest and puts the manifest into `index.json`, replacing
one with the same ref name and keeping the others."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import CorruptData, InvalidArgument, NotFound
from .config import GOARCH, MAX_JSON
from .streams import Verifying, parse_digest

REF_NAME = "org.opencontainers.image.ref.name"
INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
LAYER_TYPES = {"none": LAYER, "gzip": LAYER + "+gzip", "zstd": LAYER + "+zstd"}


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict
    platform: dict

    @classmethod
    def parse(cls, d: object, what: str) -> Descriptor:
        if not isinstance(d, dict):
            raise CorruptData(f"{what}: descriptor is not an object")
        digest, size, mt = d.get("digest"), d.get("size"), d.get("mediaType", "")
        if not isinstance(digest, str) or not isinstance(size, int) or size < 0 \
                or not isinstance(mt, str):
            raise CorruptData(f"{what}: descriptor lacks a digest or size")
        parse_digest(digest)
        ann = d.get("annotations") or {}
        plat = d.get("platform") or {}
        if not isinstance(ann, dict) or not isinstance(plat, dict):
            raise CorruptData(f"{what}: descriptor is malformed")
        return cls(mt, digest, size, ann, plat)

    def to_json(self) -> dict:
        d: dict = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            d["annotations"] = self.annotations
        if self.platform:
            d["platform"] = self.platform
        return d


def canonical(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


class Layout:
    """An image layout directory being read."""

    def __init__(self, root: Path) -> None:
        self.root = root
        marker = root / "oci-layout"
        if not marker.is_file():
            raise NotFound(f"{root}: not an OCI image layout (no oci-layout file)")
        doc = _json(marker.read_bytes()[:MAX_JSON], f"{root}/oci-layout")
        if not isinstance(doc, dict) or not str(doc.get("imageLayoutVersion", "")
                                                ).startswith("1."):
            raise CorruptData(f"{root}/oci-layout: unsupported imageLayoutVersion")

    def blob_path(self, digest: str) -> Path:
        algo, hexpart = parse_digest(digest)
        return self.root / "blobs" / algo / hexpart

    def open_blob(self, desc: Descriptor, what: str) -> Verifying:
        try:
            f = open(self.blob_path(desc.digest), "rb")  # noqa: SIM115 (closed by caller)
        except FileNotFoundError:
            raise NotFound(f"{what} blob {desc.digest} is missing from {self.root}") from None
        return Verifying(f, desc.digest, desc.size, f"{what} blob {desc.digest}")

    def read_blob(self, desc: Descriptor, what: str) -> bytes:
        if desc.size > MAX_JSON:
            raise CorruptData(f"{what} blob {desc.digest} is too large ({desc.size} bytes)")
        v = self.open_blob(desc, what)
        try:
            data = v.read(desc.size + 1)
            v.check()
        finally:
            v.raw.close()
        return data

    def manifest(self, ref: str | None) -> tuple[Descriptor, dict]:
        """The image manifest named `ref` (or the only one), as (descriptor, document)."""
        index = _json((self.root / "index.json").read_bytes()[:MAX_JSON], "index.json") \
            if (self.root / "index.json").is_file() else None
        if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
            raise CorruptData(f"{self.root}/index.json is missing or malformed")
        descs = [Descriptor.parse(d, "index.json") for d in index["manifests"]]
        if ref is not None:
            named = [d for d in descs if d.annotations.get(REF_NAME) == ref]
            if not named:
                known = sorted({str(d.annotations.get(REF_NAME)) for d in descs
                                if REF_NAME in d.annotations})
                raise NotFound(f"{self.root}: no image named {ref!r} "
                               f"(names: {', '.join(known) or 'none'})")
            descs = named[:1]
        return self._pick(descs, 0)

    def _pick(self, descs: list[Descriptor], depth: int) -> tuple[Descriptor, dict]:
        if depth > 4:
            raise CorruptData("image indexes nest too deeply")
        if len(descs) > 1:
            mine = [d for d in descs if d.platform.get("os", "linux") == "linux"
                    and d.platform.get("architecture") == GOARCH.get(platform.machine())]
            if len(mine) != 1:
                raise InvalidArgument(f"{self.root} holds {len(descs)} images: name one "
                                      "(oci:DIR:REF)")
            descs = mine
        if not descs:
            raise NotFound(f"{self.root} holds no image")
        d = descs[0]
        doc = _json(self.read_blob(d, "manifest"), f"manifest {d.digest}")
        if not isinstance(doc, dict):
            raise CorruptData(f"manifest {d.digest} is not an object")
        mt = doc.get("mediaType", d.media_type)
        if mt in (INDEX, DOCKER_LIST) or "manifests" in doc:
            sub = doc.get("manifests")
            if not isinstance(sub, list):
                raise CorruptData(f"index {d.digest} is malformed")
            return self._pick([Descriptor.parse(x, f"index {d.digest}") for x in sub],
                              depth + 1)
        if doc.get("schemaVersion") != 2 or not isinstance(doc.get("layers"), list):
            raise CorruptData(f"manifest {d.digest} is not an image manifest")
        return d, doc


class LayoutWriter:
    """Writes blobs into an image layout directory (made if absent)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        if root.exists() and not root.is_dir():
            raise InvalidArgument(f"{root} exists and is not a directory")
        if root.is_dir() and any(root.iterdir()) and not (root / "oci-layout").is_file():
            raise InvalidArgument(f"{root} is not empty and not an OCI image layout")
        self.blobs = root / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        marker = root / "oci-layout"
        if not marker.exists():
            _write_file(marker, canonical({"imageLayoutVersion": "1.0.0"}))

    def temp(self):
        return tempfile.NamedTemporaryFile(dir=self.blobs, prefix=".tmp-", delete=False)

    def add_file(self, tmp_path: str, digest: str) -> None:
        os.chmod(tmp_path, 0o644)
        dest = self.blobs / parse_digest(digest)[1]
        os.replace(tmp_path, dest)

    def add_bytes(self, data: bytes, media_type: str) -> Descriptor:
        import hashlib

        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        dest = self.blobs / digest[7:]
        if not dest.is_file() or dest.stat().st_size != len(data):
            _write_file(dest, data)
        return Descriptor(media_type, digest, len(data), {}, {})

    def set_ref(self, manifest: Descriptor, ref: str | None) -> None:
        path = self.root / "index.json"
        old = []
        if path.is_file():
            doc = _json(path.read_bytes()[:MAX_JSON], "index.json")
            if isinstance(doc, dict) and isinstance(doc.get("manifests"), list):
                old = [d for d in doc["manifests"] if isinstance(d, dict)]
        ann = {REF_NAME: ref} if ref else {}
        keep = [d for d in old if d.get("digest") != manifest.digest and (
            not ref or (d.get("annotations") or {}).get(REF_NAME) != ref)]
        desc = Descriptor(manifest.media_type, manifest.digest, manifest.size, ann, {})
        index = {"schemaVersion": 2, "mediaType": INDEX,
                 "manifests": keep + [desc.to_json()]}
        _write_file(path, canonical(index))


def _write_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _json(data: bytes, what: str) -> object:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptData(f"{what} is not JSON ({e})") from None
