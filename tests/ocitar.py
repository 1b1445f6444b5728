"""Layer tarballs for the OCI tests, written with the standard library's tarfile (an
implementation independent of pylayers' writer), member by member as a test lists
them: `Reg`, `DirM`, `Link`, `Sym`, `Dev`, `Fifo`, `Raw` (a header exactly as given)."""

from __future__ import annotations

import gzip
import io
import tarfile
from dataclasses import dataclass, field

import zstandard


@dataclass
class M:
    name: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float = 1_700_000_000
    pax: dict = field(default_factory=dict)


@dataclass
class Reg(M):
    data: bytes = b""


@dataclass
class DirM(M):
    mode: int = 0o755


@dataclass
class Link(M):
    target: str = ""


@dataclass
class Sym(M):
    target: str = ""
    mode: int = 0o777


@dataclass
class Dev(M):
    kind: bytes = tarfile.CHRTYPE
    major: int = 1
    minor: int = 3


@dataclass
class Fifo(M):
    pass


def make_tar(members: list, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt, encoding="utf-8",
                      errors="surrogateescape") as tf:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.mode, info.uid, info.gid, info.mtime = m.mode, m.uid, m.gid, m.mtime
            info.pax_headers = dict(m.pax)
            data = None
            if isinstance(m, Reg):
                info.size = len(m.data)
                data = io.BytesIO(m.data)
            elif isinstance(m, DirM):
                info.type = tarfile.DIRTYPE
            elif isinstance(m, Link):
                info.type, info.linkname = tarfile.LNKTYPE, m.target
            elif isinstance(m, Sym):
                info.type, info.linkname = tarfile.SYMTYPE, m.target
            elif isinstance(m, Dev):
                info.type, info.devmajor, info.devminor = m.kind, m.major, m.minor
            elif isinstance(m, Fifo):
                info.type = tarfile.FIFOTYPE
            tf.addfile(info, data)
    return out.getvalue()


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data)
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def members_of(blob: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tf:
        return tf.getmembers()
