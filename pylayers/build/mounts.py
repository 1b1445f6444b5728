"""`RUN --mount` (BuildKit's mounts for a step) and `RUN --network`.

A mount is a comma-separated list of `key=value` (a bare `ro`/`rw`/`readonly`/
`readwrite`/`required` means true), `type` first or anywhere, defaulting to `bind`:

- `type=bind,target=T[,source=S][,from=STAGE|TAG|REF][,rw]`: S (default: the top)
  of the build context (after `.dockerignore`), or of a stage or image, at T,
  read-only; with `rw` writes are allowed and discarded after the step (the step sees a
  copy). The key counts a context source's content (as COPY does: content, mode,
  xattrs, link targets, not owners or mtimes), a stage's by its layer id.
- `type=cache,target=T[,id=ID][,sharing=shared|private|locked][,uid=N][,gid=N]
  [,mode=0755][,ro]`: a directory kept between builds in the store
  (`STORE/build/cache-mounts/`), one per ID (default: T). `shared` lets concurrent
  builds use it together, `locked` makes a step wait for the others, `private` gives a
  step its own instance while another holds the first. Created owned by uid:gid with
  `mode`. Its content is never in the key (the instruction's text is): a step is cached
  whatever the cache holds, as BuildKit does.
- `type=tmpfs,target=T[,size=BYTES]`: an empty tmpfs.
- `type=secret,id=ID[,target=T][,env=VAR][,required][,uid=N][,gid=N][,mode=0400]`: the
  secret ID given to the build (`--secret id=ID,src=FILE` or `env=VAR`) as the file T
  (default `/run/secrets/ID`), and/or the variable VAR; a missing secret is skipped
  unless `required`. Its content is never in a layer nor in the key; the key holds only
  whether it was given.
- `type=ssh` is refused (no agent forwarding).

Mount points the image lacks are made for the step and removed after it (with their
parent directories' times put back), and everything mounted lives in the step's mount
namespace: nothing of a mount reaches the committed layer.

`--network=default` (and `host`) runs the step in the builder's network, as a RUN
without the flag; `--network=none` in a new network namespace holding only `lo` (up).
"""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidArgument, NotFound
from . import fsops

TYPES = ("bind", "cache", "tmpfs", "secret", "ssh")
NETWORKS = ("default", "none", "host")
SHARING = ("shared", "private", "locked")
_BOOL = {"ro": "readonly", "readonly": "readonly", "rw": "readwrite",
         "readwrite": "readwrite", "required": "required"}
_KEYS = {
    "bind": {"target", "source", "from", "readonly", "readwrite"},
    "cache": {"target", "id", "sharing", "uid", "gid", "mode", "readonly", "readwrite",
              "source", "from"},
    "tmpfs": {"target", "size"},
    "secret": {"target", "id", "env", "required", "uid", "gid", "mode"},
    "ssh": {"target", "id", "required", "uid", "gid", "mode"},
}
_ALIASES = {"dst": "target", "destination": "target", "src": "source"}
CACHE_DIR = ("build", "cache-mounts")
MAX_PRIVATE = 64


class MountError(InvalidArgument):
    """A malformed or unusable --mount; the builder adds the line."""


class MountNotFound(NotFound):
    """A --mount source that does not exist; the builder adds the line."""


@dataclass
class MountSpec:
    type: str
    target: str | None = None
    source: str | None = None
    from_: str | None = None
    readonly: bool | None = None
    id: str | None = None
    sharing: str = "shared"
    uid: int | None = None
    gid: int | None = None
    mode: int | None = None
    size: int | None = None
    required: bool = False
    variable: str | None = None  # env=

    def key(self) -> dict:
        """What of the mount is in the step's key (never a secret's or cache's content)."""
        out: dict = {"type": self.type}
        for name, field_name in (("target", "target"), ("source", "source"),
                                 ("from", "from_"), ("id", "id"), ("env", "variable")):
            value = getattr(self, field_name)
            if value is not None:
                out[name] = value
        if self.type == "cache":
            out["sharing"] = self.sharing
        if self.readonly is not None:
            out["readonly"] = self.readonly
        return out


def _bool(key: str, value: str) -> bool:
    v = value.lower()
    if v in ("", "true", "1"):
        return True
    if v in ("false", "0"):
        return False
    raise MountError(f"{key}={value}: true or false")


def _int(key: str, value: str, base: int = 10) -> int:
    try:
        n = int(value, base)
    except ValueError:
        raise MountError(f"{key}={value}: not a{'n octal' if base == 8 else ''} number") \
            from None
    if n < 0:
        raise MountError(f"{key}={value}: negative")
    return n


def _size(value: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    v = value.strip().lower().removesuffix("b")
    mult = units.get(v[-1:], 1)
    if v[-1:] in units:
        v = v[:-1]
    try:
        n = int(v)
    except ValueError:
        raise MountError(f"size={value}: bytes, or a number with k, m or g") from None
    return n * mult


def parse_mount(text: str) -> MountSpec:
    """One `--mount=...` value (variables already substituted)."""
    try:
        (fields,) = list(csv.reader([text]))
    except (csv.Error, ValueError):
        raise MountError(f"--mount={text}: not a comma-separated list") from None
    pairs: list[tuple[str, str]] = []
    for f in fields:
        key, eq, value = f.strip().partition("=")
        key = key.strip().lower()
        if not key:
            raise MountError(f"--mount={text}: an empty field")
        if not eq:
            if key not in _BOOL:
                raise MountError(f"--mount={text}: {key!r} needs a value ({key}=...)")
            value = "true"
        pairs.append((_ALIASES.get(key, key), value))
    kinds = [v for k, v in pairs if k == "type"]
    if len(kinds) > 1:
        raise MountError(f"--mount={text}: type given twice")
    kind = kinds[0].lower() if kinds else "bind"
    if kind not in TYPES:
        raise MountError(f"--mount type={kind}: bind, cache, tmpfs or secret")
    if kind == "ssh":
        raise MountError("--mount type=ssh is not supported by pylayers build (no SSH "
                         "agent forwarding); pass what the step needs as a secret")
    spec = MountSpec(kind)
    seen: set[str] = set()
    for key, value in pairs:
        if key == "type":
            continue
        name = _BOOL.get(key, key)
        if name not in _KEYS[kind]:
            raise MountError(f"--mount type={kind} has no option {key!r}")
        if name in seen:
            raise MountError(f"--mount: {key} given twice")
        seen.add(name)
        if name == "readonly":
            spec.readonly = _bool(key, value)
        elif name == "readwrite":
            spec.readonly = not _bool(key, value)
        elif name == "required":
            spec.required = _bool(key, value)
        elif name in ("uid", "gid"):
            setattr(spec, name, _int(name, value))
        elif name == "mode":
            spec.mode = _int("mode", value, 8)
            if spec.mode > 0o7777:
                raise MountError(f"mode={value}: at most 7777")
        elif name == "size":
            spec.size = _size(value)
        elif name == "sharing":
            if value not in SHARING:
                raise MountError(f"sharing={value}: shared, private or locked")
            spec.sharing = value
        elif name == "from":
            spec.from_ = value
        else:
            if not value:
                raise MountError(f"--mount: {key}= is empty")
            setattr(spec, "variable" if name == "env" else name, value)
    if kind == "cache" and (spec.from_ is not None or spec.source is not None):
        raise MountError("--mount type=cache: from= and source= (a cache seeded from a "
                         "stage) are not supported by pylayers build")
    if kind == "secret":
        if spec.id is None and spec.target is None:
            raise MountError("--mount type=secret needs id= (or a target to take it from)")
        if spec.id is None:
            spec.id = os.path.basename(spec.target.rstrip("/"))  # type: ignore[union-attr]
        if spec.target is None and spec.variable is None:
            spec.target = f"/run/secrets/{spec.id}"
    elif spec.target is None:
        raise MountError(f"--mount type={kind} needs target=")
    return spec


def from_refs(specs: list[str]) -> list[str]:
    """The `from=` of each RUN --mount as written (the stages it needs built first);
    malformed ones are left for the step to refuse."""
    out = []
    for text in specs:
        try:
            spec = parse_mount(text)
        except InvalidArgument:
            continue
        if spec.from_ is not None:
            out.append(spec.from_)
    return out


def parse_network(value: str) -> str:
    if value not in NETWORKS:
        raise MountError(f"--network={value}: none, default or host")
    return value


# -- running -------------------------------------------------------------------------------


@dataclass
class Sources:
    """What the builder lends the mounts: the context, the secrets, the store's path, and
    how to see a stage or image (`resolve` gives its layer id, `view` mounts it
    read-only and gives (handle, path), `drop` unmounts it)."""

    context_root: Path
    context_skip: Callable[[bytes], bool] | None
    secrets: Mapping[str, bytes]
    store_path: Path
    resolve: Callable[[str], bytes]
    view: Callable[[bytes], tuple[object, Path]]
    drop: Callable[[object], None]


def context_path(root: Path, source: str | None) -> Path:
    """The context path a bind's `source` names (never out of the context)."""
    norm = os.path.normpath("/" + (source or "")).lstrip("/")
    path = root / norm if norm else root
    real = Path(os.path.realpath(path))
    if os.path.commonpath([real, root]) != str(root):
        raise MountError(f"--mount source={source}: leads out of the build context")
    if not os.path.lexists(real):
        raise MountNotFound(f"--mount source={source}: no such file or directory in the build "
                       "context")
    return real


@dataclass
class StepMounts:
    """The mounts of one RUN: `key_options()` and `key_inputs()` for its cache key,
    then, around the step, `enter(root)` (the sandbox's mount list) and `exit()`."""

    specs: list[MountSpec]
    workdir: str
    sources: Sources
    variables: dict[str, str] = field(default_factory=dict)  # secrets given as env=
    _cleanup: list[Callable[[], None]] = field(default_factory=list)

    def target(self, spec: MountSpec) -> str:
        assert spec.target is not None
        return fsops.image_path(self.workdir, spec.target).rstrip("/") or "/"

    def key_options(self) -> dict:
        out: dict = {}
        for i, spec in enumerate(self.specs):
            k = spec.key()
            if spec.type == "bind" and spec.from_ is not None:
                k["layer"] = self.sources.resolve(spec.from_).hex()
            if spec.type == "secret":
                k["given"] = spec.id in self.sources.secrets
            out[f"mount{i}"] = k
        return out

    def key_inputs(self) -> list[tuple[str, str]]:
        """(context path, name) of each bind of the context: its content counts."""
        return [(str(context_path(self.sources.context_root, s.source)),
                 f"mount:{self.target(s)}")
                for s in self.specs if s.type == "bind" and s.from_ is None]

    # -- around the step ---------------------------------------------------------------
    def enter(self, root: str) -> list[dict]:
        """Prepare every mount for the step in `root`; the sandbox's list (in order,
        parents first). `exit()` undoes it all, even after a failure here."""
        out = []
        for spec in self.specs:
            if spec.type == "secret":
                data = self.sources.secrets.get(spec.id or "")
                if data is None:
                    if spec.required:
                        raise MountError(f"secret {spec.id!r} is required but was not "
                                         f"given (--secret id={spec.id},src=FILE)")
                    continue
                if spec.variable is not None:
                    self.variables[spec.variable] = data.decode("utf-8", "surrogateescape")
                if spec.target is None:
                    continue
                src = self._secret_file(data, spec)
                out.append(self._bind(root, src, spec, readonly=True))
            elif spec.type == "tmpfs":
                host = self._stub(root, self.target(spec), True)
                out.append({"type": "tmpfs", "target": host, "size": spec.size})
            elif spec.type == "cache":
                src = self._cache_dir(spec)
                out.append(self._bind(root, src, spec, readonly=bool(spec.readonly)))
            else:
                src = self._bind_source(spec)
                out.append(self._bind(root, src, spec, readonly=spec.readonly is not False))
        out.sort(key=lambda m: m["target"].count("/"))
        return out

    def exit(self) -> None:
        errors = []
        while self._cleanup:
            try:
                self._cleanup.pop()()
            except OSError as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def _bind(self, root: str, src: str, spec: MountSpec, readonly: bool) -> dict:
        is_dir = os.path.isdir(src)
        host = self._stub(root, self.target(spec), is_dir)
        return {"type": "bind", "source": src, "target": host, "readonly": readonly}

    def _stub(self, root: str, target: str, is_dir: bool) -> str:
        """The host path of `target` in `root`, made (with its parents) if missing; what
        was made is removed by exit(), and the times of the directory it was made in
        put back."""
        if target == "/":
            raise MountError("--mount target=/: cannot mount over the root")
        host = fsops.resolve(root, target)
        if os.path.lexists(host):
            return host
        parts = [p for p in os.path.relpath(host, root).split("/") if p]
        cur = root
        made: list[tuple[str, bool]] = []
        for i, part in enumerate(parts):
            nxt = os.path.join(cur, part)
            if not os.path.lexists(nxt):
                if not made:
                    st = os.stat(cur)
                    times = (cur, st.st_atime_ns, st.st_mtime_ns)
                last = i == len(parts) - 1
                if last and not is_dir:
                    os.close(os.open(nxt, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                else:
                    os.mkdir(nxt, 0o755)
                made.append((nxt, last and not is_dir))
            cur = nxt

        def undo() -> None:
            for path, is_file in reversed(made):
                try:
                    if is_file:
                        if os.path.getsize(path) == 0:
                            os.unlink(path)
                    else:
                        os.rmdir(path)
                except OSError as e:
                    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT,
                                       errno.EBUSY):
                        raise
            where, atime, mtime = times
            os.utime(where, ns=(atime, mtime))
        if made:
            self._cleanup.append(undo)
        return host

    def _tempdir(self) -> str:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        path = tempfile.mkdtemp(prefix="pylayers-mount-", dir=base)
        self._cleanup.append(lambda: shutil.rmtree(path, ignore_errors=True))
        return path

    def _secret_file(self, data: bytes, spec: MountSpec) -> str:
        path = os.path.join(self._tempdir(), "secret")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.chown(path, spec.uid or 0, spec.gid or 0)
        os.chmod(path, 0o400 if spec.mode is None else spec.mode)
        return path

    def _bind_source(self, spec: MountSpec) -> str:
        if spec.from_ is not None:
            layer = self.sources.resolve(spec.from_)
            handle, top = self.sources.view(layer)
            self._cleanup.append(lambda: self.sources.drop(handle))
            src = fsops.resolve(str(top), spec.source or "/")
            if not os.path.lexists(src):
                raise MountNotFound(f"--mount from={spec.from_},source={spec.source}: no such "
                               "file or directory there")
            skip = None
        else:
            src = str(context_path(self.sources.context_root, spec.source))
            skip = self.sources.context_skip
        if spec.readonly is False or (skip is not None and os.path.isdir(src)):
            # rw: the step writes to a copy, discarded after it; a context directory
            # with .dockerignore exclusions: a copy without them
            copy = os.path.join(self._tempdir(), "src")
            if os.path.isdir(src):
                shutil.copytree(src, copy, symlinks=True, ignore=_ignore(skip))
            else:
                shutil.copy2(src, copy, follow_symlinks=False)
            return copy
        return src

    def _cache_dir(self, spec: MountSpec) -> str:
        """An instance of the cache `spec.id` (default: its target), locked as its
        `sharing` says until exit()."""
        cid = spec.id or self.target(spec)
        base = self.sources.store_path.joinpath(*CACHE_DIR,
                                                hashlib.sha256(cid.encode()).hexdigest()[:32])
        base.mkdir(parents=True, exist_ok=True)
        (base / "id").write_text(cid + "\n")
        for n in range(MAX_PRIVATE if spec.sharing == "private" else 1):
            fd = os.open(base / f"{n}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            how = {"shared": fcntl.LOCK_SH, "locked": fcntl.LOCK_EX,
                   "private": fcntl.LOCK_EX | fcntl.LOCK_NB}[spec.sharing]
            try:
                fcntl.flock(fd, how)
            except BlockingIOError:
                os.close(fd)
                continue
            self._cleanup.append(lambda fd=fd: os.close(fd))
            path = base / str(n)
            if not path.is_dir():
                tmp = base / f"{n}.new{os.getpid()}"
                tmp.mkdir(exist_ok=True)
                os.chown(tmp, spec.uid or 0, spec.gid or 0)
                os.chmod(tmp, 0o755 if spec.mode is None else spec.mode)
                os.rename(tmp, path)
            return str(path)
        raise MountError(f"--mount type=cache,id={cid},sharing=private: {MAX_PRIVATE} "
                         "instances are in use")


def _ignore(skip: Callable[[bytes], bool] | None):
    if skip is None:
        return None

    def ignore(directory: str, names: list[str]) -> set[str]:
        return {n for n in names if skip(os.fsencode(os.path.join(directory, n)))}
    return ignore


__all__ = ["MountError", "MountNotFound", "MountSpec", "Sources", "StepMounts", "from_refs",
           "parse_mount", "parse_network"]
