"""ADD from an http(s) URL: the download, its size limit and its checksum.

`ADD [--checksum=sha256:HEX] URL DEST` (Docker's rules): the file is saved as DEST, or
as DEST/NAME when DEST ends in `/` (NAME: the URL path's last component), mode 0600
unless --chmod, owned by root or --chown, never unpacked. Its key: with --checksum, the
URL and the checksum (a cached step downloads nothing); without, the URL and the
downloaded content's SHA-256 (the file is fetched on every build, as BuildKit does, and
the step stays cached while the content is the same). A download over the limit
(`PYLAYERS_MAX_DOWNLOAD` bytes, default 4 GiB), an HTTP error, a connection that fails
or a checksum that differs is one line naming the instruction. Git URLs (`git@...`,
`git://`, `https://.../repo.git`) are refused: cloning is not supported.

Proxies come from the environment (`https_proxy`, `no_proxy`...), as urllib reads them.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from ..errors import InvalidArgument, PylayersError

DEFAULT_MAX = 4 << 30
TIMEOUT = 60.0
_CHECKSUM = re.compile(r"sha256:([0-9a-f]{64})\Z")


class DownloadFailed(PylayersError):
    """An ADD URL could not be fetched, was too large, or did not match --checksum."""


class BadURL(InvalidArgument):
    """An ADD URL or --checksum that cannot be used as written."""


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def is_git(source: str) -> bool:
    if source.startswith(("git@", "git://", "ssh://")):
        return True
    if not is_url(source):
        return False
    path = urllib.parse.urlsplit(source).path
    return path.endswith(".git") or path.endswith(".git/")


def max_bytes() -> int:
    text = os.environ.get("PYLAYERS_MAX_DOWNLOAD")
    if not text:
        return DEFAULT_MAX
    try:
        value = int(text)
        if value <= 0:
            raise ValueError
    except ValueError:
        raise InvalidArgument(f"PYLAYERS_MAX_DOWNLOAD={text!r}: a number of bytes") from None
    return value


def parse_checksum(text: str) -> str:
    """`--checksum`'s `sha256:HEX`: the hex digest."""
    m = _CHECKSUM.match(text.strip().lower())
    if m is None:
        raise BadURL(f"--checksum={text}: sha256: and 64 hex digits")
    return m.group(1)


def file_name(url: str) -> str:
    """The name a download gets in a directory: the URL path's last component."""
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if not name or name in (".", ".."):
        raise BadURL(f"{url}: no file name in the URL; give a destination file "
                              "(not a directory ending in /)")
    return name


@dataclass
class Download:
    path: str
    sha256: str
    size: int


def fetch(url: str, directory: str, limit: int | None = None,
          checksum: str | None = None) -> Download:
    """Download `url` into a new file in `directory`; DownloadFailed (one line) when it
    cannot, when it is over `limit` bytes, or when its SHA-256 is not `checksum`."""
    limit = max_bytes() if limit is None else limit
    path = os.path.join(directory, f"download-{os.urandom(6).hex()}")
    h = hashlib.sha256()
    size = 0
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "pylayers-build"})
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise DownloadFailed(f"{url}: {int(length)} bytes, over the limit of {limit} "
                                     "(PYLAYERS_MAX_DOWNLOAD)")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                while chunk := resp.read(1 << 20):
                    size += len(chunk)
                    if size > limit:
                        raise DownloadFailed(f"{url}: over the limit of {limit} bytes "
                                             "(PYLAYERS_MAX_DOWNLOAD)")
                    h.update(chunk)
                    out.write(chunk)
    except urllib.error.HTTPError as e:
        raise DownloadFailed(f"{url}: download failed: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        reason = e.reason.strerror if isinstance(e.reason, OSError) and e.reason.strerror \
            else e.reason
        raise DownloadFailed(f"{url}: download failed: {reason}") from None
    except (OSError, ValueError) as e:  # a reset connection, a timeout, a bad URL
        raise DownloadFailed(f"{url}: download failed: {e}") from None
    digest = h.hexdigest()
    if checksum is not None and digest != checksum:
        raise DownloadFailed(f"{url}: checksum mismatch: expected sha256:{checksum}, got "
                             f"sha256:{digest}")
    return Download(path, digest, size)


__all__ = ["BadURL", "DEFAULT_MAX", "Download", "DownloadFailed", "fetch", "file_name", "is_git",
           "is_url", "max_bytes", "parse_checksum"]
