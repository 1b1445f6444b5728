"""`docker save` archives: a tar holding `manifest.json` (a list of images, each with
`Config`, `RepoTags` and `Layers`, paths inside the archive), the config and the
layer tars (classic `ID/layer.tar`, or `blobs/sha256/HEX` as Docker 25+ writes them,
which are an OCI image layout too). Read with random access (manifest.json comes last
in Docker's archives); each member is streamed. Writing packs an image layout made by
the exporter into such a tar, reproducibly."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from pathlib import Path
from typing import BinaryIO

from ..errors import CorruptData, InvalidArgument, NotFound
from .config import MAX_JSON
from .tarread import _Info, clean_path

MAX_MEMBERS = 100_000


class DockerArchive:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.tf = tarfile.open(path, "r:", tarinfo=_Info, encoding="utf-8",
                                   errors="surrogateescape")
        except tarfile.TarError as e:
            raise CorruptData(f"{path}: not a docker archive ({e})") from None
        except IsADirectoryError:
            raise InvalidArgument(f"{path} is a directory (oci:DIR for an image layout)"
                                  ) from None
        self.members: dict[bytes, tarfile.TarInfo] = {}
        try:
            while (info := self.tf.next()) is not None:
                if len(self.members) >= MAX_MEMBERS:
                    raise CorruptData(f"{path}: more than {MAX_MEMBERS} members")
                self.members[clean_path(info.name.encode("utf-8", "surrogateescape"))] = info
        except tarfile.TarError as e:
            raise CorruptData(f"{path}: corrupt archive ({e})") from None
        self.tf.members = []

    def close(self) -> None:
        self.tf.close()

    def _member(self, name: object, what: str) -> tarfile.TarInfo:
        if not isinstance(name, str):
            raise CorruptData(f"{self.path}: manifest.json names no {what}")
        path = clean_path(name.encode("utf-8", "surrogateescape"))
        for _ in range(8):  # older `docker save` links repeated layers to the first
            info = self.members.get(path)
            if info is None:
                raise NotFound(f"{self.path}: {what} {name!r} is missing")
            if not info.issym():
                break
            target = info.linkname.encode("utf-8", "surrogateescape")
            path = clean_path(path.rpartition(b"/")[0] + b"/" + target)
        if not info.isreg():
            raise CorruptData(f"{self.path}: {what} {name!r} is not a file")
        return info

    def open(self, name: object, what: str) -> tuple[BinaryIO, str | None]:
        """The member's stream and the digest its name claims (blobs/sha256/HEX or
        HEX.json), if any."""
        info = self._member(name, what)
        f = self.tf.extractfile(info)
        assert f is not None
        m = re.search(r"(?:^|/)(?:blobs/sha256/)?([0-9a-f]{64})(?:\.json)?$", str(name))
        claimed = f"sha256:{m[1]}" if m and ("blobs/" in str(name) or
                                             str(name).endswith(".json")) else None
        return f, claimed

    def read(self, name: object, what: str) -> bytes:
        info = self._member(name, what)
        if info.size > MAX_JSON:
            raise CorruptData(f"{self.path}: {what} is too large ({info.size} bytes)")
        f, claimed = self.open(name, what)
        data = f.read()
        if claimed and "sha256:" + hashlib.sha256(data).hexdigest() != claimed:
            raise CorruptData(f"{self.path}: {what} does not match its digest {claimed}")
        return data

    def image(self, ref: str | None) -> dict:
        try:
            doc = json.loads(self.read("manifest.json", "manifest.json"))
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptData(f"{self.path}: manifest.json is not JSON ({e})") from None
        if not isinstance(doc, list) or not doc or not all(isinstance(d, dict) for d in doc):
            raise CorruptData(f"{self.path}: manifest.json lists no image")
        if ref is not None:
            doc = [d for d in doc if ref in (d.get("RepoTags") or [])]
            if not doc:
                raise NotFound(f"{self.path}: no image tagged {ref!r}")
        elif len(doc) > 1:
            raise InvalidArgument(f"{self.path} holds {len(doc)} images: name one "
                                  "(docker-archive:FILE:NAME:TAG)")
        image = doc[0]
        if not isinstance(image.get("Layers"), list):
            raise CorruptData(f"{self.path}: manifest.json lists no layers")
        return image


def pack_layout(layout: Path, dest: Path, mtime: int, manifest_entry: dict) -> None:
    """Write the image layout directory `layout` and `manifest.json` (a list holding
    `manifest_entry`) as the tar `dest`, entries sorted, owners 0, fixed mtime."""
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as out, tarfile.open(fileobj=out, mode="w",
                                                  format=tarfile.PAX_FORMAT) as tf:
            names = sorted(str(p.relative_to(layout)) for p in layout.rglob("*"))
            extra = {"manifest.json": json.dumps([manifest_entry], sort_keys=True,
                                                 separators=(",", ":")).encode()}
            for name in sorted(set(names) | set(extra)):
                info = tarfile.TarInfo(name)
                info.mtime, info.uid, info.gid, info.uname, info.gname = mtime, 0, 0, "", ""
                if name in extra:
                    info.size, info.mode = len(extra[name]), 0o644
                    import io

                    tf.addfile(info, io.BytesIO(extra[name]))
                    continue
                p = layout / name
                if p.is_dir():
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    info.name = name + "/"
                    tf.addfile(info)
                else:
                    info.size, info.mode = p.stat().st_size, 0o644
                    with open(p, "rb") as f:
                        tf.addfile(info, f)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
