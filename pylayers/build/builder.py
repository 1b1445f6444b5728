"""`build`: a Dockerfile into layers, one per instruction that changes files, each cached
by its key (cachekeys.py) and committed through the Snapshotter.

Stages run in order (only those the target needs). A stage starts FROM `scratch`, a
layer in the store (tag, id or prefix; its stored image config, if any, is inherited),
or an earlier stage. RUN, COPY, ADD, and WORKDIR of a directory the image lacks each
make one layer: the step's snapshot is prepared on the stage's current layer (overlay
driver where it can mount, else copy), mounted, changed, unmounted, its changed
entries' mtimes clamped (`SOURCE_DATE_EPOCH`, else 0), and committed. The other
instructions change the image config (env, cmd, ...), which is stored with the final
image (oci/config.py: per image, a tag names it) for `export`.

Keys: RUN by its text, its environment (ENV and ARG values), working directory, user
and shell; COPY/ADD also by their sources' records (content, mode unless --chmod,
xattrs, link targets; never owners, which COPY sets, nor mtimes), after
`.dockerignore`; variables a step substitutes count by value. Every key chains to the
previous step's, so a miss re-runs everything after it in its stage. With the same
Dockerfile, context and SOURCE_DATE_EPOCH the layer ids are the same, cached or not.

The library prints nothing: progress goes to `on_event` (StepEvent) and a RUN's output
to `on_output`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument, NotFound, PylayersError
from ..layers.manifest import DIR, SYMLINK
from ..layers.refs import check_tag
from ..layers.repo import Layers
from ..mounts import Kind, Snapshotter, is_mounted, mount_all, unmount
from ..oci import config as image_config
from . import download, fsops, heredoc, metadata, mounts, sandbox
from .bases import RegistryOptions, is_reference, pull_base
from .cachekeys import BuildCache, CacheKey, cache_key
from .context import Context
from .dockerfile import (
    Dockerfile,
    DockerfileError,
    Instruction,
    Stage,
    arg_decls,
    expand,
    expand_heredoc,
    expand_words,
    pairs,
    parse,
    parse_instruction,
    split_words,
)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_SHELL = ["/bin/sh", "-c"]
BUILD_LABEL = "pylayers.build"  # a build's snapshot: "step" or "view"
OWNER_LABEL = "pylayers.build.owner"  # pid:start time of the build's process
TARGET_LABEL = "pylayers.build.target"  # where it is mounted
CONFIG_STEP = "(an empty layer for the image config: the stage added no files)"
GOARCH = {"x86_64": "amd64", "aarch64": "arm64"}


class StepFailed(PylayersError):
    """A RUN exited non-zero: its exit code and its output's tail."""

    def __init__(self, message: str, exit_code: int, output: str) -> None:
        super().__init__(message)
        self.step_exit_code = exit_code
        self.output = output


@dataclass
class StepEvent:
    """One step, as it starts (`done` False) and as it ends."""

    stage: str  # the stage's name, or its index
    number: int  # 1-based within the stage (FROM is 1)
    total: int
    text: str
    done: bool = False
    cached: bool = False
    layer: bytes | None = None  # None: a metadata-only step
    seconds: float = 0.0
    explanation: str | None = None  # --explain: why it missed
    new_bytes: int = 0


@dataclass
class BuildResult:
    layer_id: bytes
    config: dict
    steps: list[StepEvent] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def cached(self) -> int:
        return sum(1 for s in self.steps if s.layer is not None and s.cached)

    @property
    def built(self) -> int:
        return sum(1 for s in self.steps if s.layer is not None and not s.cached)


@dataclass
class _State:
    """A stage as far as it has been built."""

    name: str
    layer: bytes | None
    key: CacheKey | bytes | None  # the next step's parent in the key chain
    config: dict  # the OCI config's `config` object
    history: list[dict]
    environ: dict[str, str]  # ENV, in order
    args: dict[str, str | None]  # ARGs declared in this stage
    cmd_set: bool = False
    own_layers: int = 0  # layers this stage made (not inherited from its base)


def _iso(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _env_list(env: Mapping[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in env.items()]


def _env_dict(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        k, _, v = item.partition("=")
        out[k] = v
    return out


def _waits_for_removals(method: Callable[..., BuildResult]) -> Callable[..., BuildResult]:
    """A build returns (or fails) once the snapshot directories its steps left are
    deleted: the Snapshotter deletes them in the background while later steps run."""

    @functools.wraps(method)
    def build(self: Builder, *args: Any, **kwargs: Any) -> BuildResult:
        try:
            return method(self, *args, **kwargs)
        finally:
            self.snapshots.wait_removals()

    return build


class Builder:
    def __init__(self, layers: Layers, *, driver: str | None = None,
                 on_event: Callable[[StepEvent], None] | None = None,
                 on_output: Callable[[bytes], None] | None = None,
                 registry: RegistryOptions | None = None) -> None:
        self.layers = layers
        self.registry = registry
        self.store = layers.store
        self.snapshots = Snapshotter(layers, driver, background_removal=True)
        self.driver = driver
        self.cache = BuildCache(self.store)
        self.remote = None  # a registrycache.RegistryCache while it runs a build
        self.on_event = on_event or (lambda e: None)
        self.on_output = on_output

    # -- the build ---------------------------------------------------------------------
    @_waits_for_removals
    def build(self, context: str | os.PathLike[str], dockerfile: str | None = None, *,
              dockerfile_text: str | None = None, tags: tuple[str, ...] = (),
              target: str | None = None, build_args: Mapping[str, str] | None = None,
              no_cache: bool = False, explain: bool = False,
              source_date_epoch: int | None = None,
              secrets: Mapping[str, bytes] | None = None) -> BuildResult:
        """Build the Dockerfile (`dockerfile_text`, else the file `dockerfile`, else
        CONTEXT/Dockerfile) with the build context `context`; tag the result with
        `tags`. `secrets`: id -> content, for RUN --mount=type=secret. Returns the
        final layer and what each step did."""
        for t in tags:
            check_tag(t)
        ctx = Context(context)
        remove_stale_snapshots(self.snapshots)
        if dockerfile_text is None:
            dockerfile_text, name = ctx.read_dockerfile(dockerfile)
        else:
            name = dockerfile or "Dockerfile"
        df = parse(dockerfile_text, name)
        self.df = df
        self.ctx = ctx
        self.no_cache, self.explain = no_cache, explain
        self.epoch = source_date_epoch
        self.epoch_ns = (source_date_epoch or 0) * 10**9
        self.build_args = dict(build_args or {})
        self.secrets = dict(secrets or {})
        self._pulled: dict[tuple[str, str | None], tuple[bytes, bytes]] = {}
        self.used_args: set[str] = set()
        self.result_steps: list[StepEvent] = []
        self.entries: list[tuple[CacheKey, bytes]] = []  # each layer step's key, layer
        self.global_args = self._global_args(df)
        final = df.stages[-1] if target is None else df.stage(target)
        if final is None:
            raise NotFound(f"--target {target!r}: no such stage in {df.path}")
        states: dict[int, _State] = {}
        for stage in self._needed(df, final):
            states[stage.index] = self._run_stage(stage, states)
        state = states[final.index]
        if state.layer is None:
            raise InvalidArgument(f"stage {state.name!r} has no layers (FROM scratch and no "
                                  "instruction that adds files): nothing to store")
        if state.own_layers == 0:
            # The image's top layer is its base's: storing this image's config there
            # would replace the base's. An empty layer of its own carries it (as
            # `docker commit` of an unchanged container makes one).
            inst = final.from_instruction
            assert inst is not None
            ev = StepEvent(state.name, len(final.instructions) + 1,
                           len(final.instructions) + 1, CONFIG_STEP, done=True)
            self._fs_step(state, inst, ev, CONFIG_STEP, {}, None, lambda root: None)
            self._history(state, inst, CONFIG_STEP, False)
            self.result_steps.append(ev)
            self.on_event(ev)
        self._need(state.layer)
        config = self._image_config(state)
        data = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
        image_config.save(self.store, state.layer, data, tags)
        warnings = []
        unused = sorted(set(self.build_args) - self.used_args)
        if unused:
            warnings.append(f"build-args not consumed: {', '.join(unused)}")
        return BuildResult(state.layer, config, self.result_steps, warnings)

    def _global_args(self, df: Dockerfile) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for inst in df.global_args:
            for name, default in arg_decls(inst, df.path, df.escape):
                env = {k: v for k, v in out.items() if v is not None}
                out[name] = self._arg_value(name, default, env, inst)
        return out

    def _arg_value(self, name: str, default: str | None, env: Mapping[str, str],
                   inst: Instruction) -> str | None:
        if name in self.build_args:
            self.used_args.add(name)
            return self.build_args[name]
        if default is None:
            return None
        return self._expand(default, env, inst, set())

    def _expand(self, word: str, env: Mapping[str, str], inst: Instruction,
                used: set[str]) -> str:
        from .dockerfile import ExpandError
        try:
            return expand(word, env, self.df.escape, used)
        except ExpandError as e:
            raise DockerfileError(str(e), inst.line, self.df.path) from None

    def _expand_words(self, text: str, env: Mapping[str, str], inst: Instruction,
                      used: set[str]) -> list[str]:
        from .dockerfile import ExpandError
        try:
            return expand_words(text, env, self.df.escape, used)
        except (ExpandError, ValueError) as e:
            raise DockerfileError(str(e), inst.line, self.df.path) from None

    def _base_ref(self, stage: Stage) -> str:
        env = {k: v for k, v in self.global_args.items() if v is not None}
        return self._expand(stage.base, env, stage.from_instruction, set())  # type: ignore[arg-type]

    def _needed(self, df: Dockerfile, final: Stage) -> list[Stage]:
        """The stages `final` depends on (FROM a stage, COPY --from or RUN --mount from= a
        stage), in order."""
        need = {final.index}
        todo = [final]
        while todo:
            s = todo.pop()
            refs = [self._base_ref(s)] + [i.flags["from"] for i in s.instructions
                                          if i.cmd == "COPY" and "from" in i.flags]
            refs += [r for i in s.instructions for r in mounts.from_refs(i.mounts)]
            for ref in refs:
                dep = df.stage(ref)
                if dep is not None and dep.index < s.index and dep.index not in need:
                    need.add(dep.index)
                    todo.append(dep)
        return [s for s in df.stages if s.index in need]

    # -- a stage -------------------------------------------------------------------------
    def _run_stage(self, stage: Stage, states: dict[int, _State]) -> _State:
        label = stage.name or f"stage-{stage.index}"
        total = len(stage.instructions) + 1
        base = self._base_ref(stage)
        start = time.monotonic()
        from_text = f"FROM {base}" + (f" AS {stage.name}" if stage.name else "")
        self.on_event(StepEvent(label, 1, total, from_text))
        state = self._from(stage, base, states, label)
        triggers = self._triggers(stage, base, state)
        total += len(triggers)
        ev = StepEvent(label, 1, total, from_text, done=True, cached=True, layer=None,
                       seconds=time.monotonic() - start)
        self.result_steps.append(ev)
        self.on_event(ev)
        for n, inst in enumerate([*triggers, *stage.instructions], 2):
            text = inst.original + (f"  (ONBUILD of {base})" if inst in triggers else "")
            self.on_event(StepEvent(label, n, total, text))
            start = time.monotonic()
            ev = StepEvent(label, n, total, text, done=True)
            self._step(state, inst, ev, states)
            ev.seconds = time.monotonic() - start
            self.result_steps.append(ev)
            self.on_event(ev)
        return state

    def _triggers(self, stage: Stage, base: str, state: _State) -> list[Instruction]:
        """The base image's ONBUILD triggers (taken out of the new image's config), as
        instructions to run first; a malformed one is an error naming the FROM line."""
        out = []
        for text in metadata.take_triggers(state.config):
            try:
                inst = parse_instruction(text, stage.line, self.df.path, self.df.escape)
                why = metadata.trigger_refused(inst.cmd)
                if why is not None:
                    raise DockerfileError(why, stage.line, self.df.path)
            except DockerfileError as e:
                raise DockerfileError(f"FROM {base}: its ONBUILD trigger {text!r}: "
                                      f"{str(e).split(': ', 1)[-1]}", stage.line,
                                      self.df.path) from None
            out.append(inst)
        return out

    def _from(self, stage: Stage, base: str, states: dict[int, _State], label: str) -> _State:
        inst = stage.from_instruction
        want = None
        if inst is not None and "platform" in inst.flags:
            env = {k: v for k, v in self.global_args.items() if v is not None}
            want = self._expand(inst.flags["platform"], env, inst, set()).rstrip("/")
            here = "linux/" + GOARCH.get(platform.machine(), platform.machine())
            if want in ("$BUILDPLATFORM", "$TARGETPLATFORM"):
                want = None
            elif want != here and not want.startswith(here + "/"):
                raise DockerfileError(f"FROM --platform={want}: this builder builds for "
                                      f"{here} only", inst.line, self.df.path)
        if base == "scratch":
            return _State(label, None, None, {}, [], {}, {})
        dep = self.df.stage(base)
        if dep is not None and dep.index < stage.index:
            prev = states[dep.index]
            return _State(label, prev.layer, prev.layer, json.loads(json.dumps(prev.config)),
                          list(prev.history), dict(prev.environ), {})
        if is_reference(base):
            layer, stored = self._pull(base, f"{self.df.path}:{stage.line}: FROM {base}",
                                       want)
        else:
            try:
                layer, stored = image_config.for_ref(self.layers, base)
            except NotFound:
                raise NotFound(f"{self.df.path}:{stage.line}: FROM {base}: no stage, tag or "
                               "layer of that name (an image in a registry is named with "
                               "its host: REGISTRY/REPO[:TAG|@DIGEST])") from None
        config: dict = {}
        history: list[dict] = []
        if stored is not None:
            doc = image_config.parse(stored)
            config = doc.get("config") or {}
            if not isinstance(config, dict):
                config = {}
            history = [h for h in doc.get("history") or [] if isinstance(h, dict)]
        chain = self.layers.chain(layer)
        if sum(1 for h in history if not h.get("empty_layer")) != len(chain):
            history = [{"created_by": f"pylayers layer {lid.hex()[:12]}"}
                       for lid in reversed(chain)]
        return _State(label, layer, layer, config, history,
                      _env_dict(config.get("Env")), {})

    def _pull(self, ref: str, where: str, want: str | None = None) -> tuple[bytes, bytes]:
        """(top layer, config) of the registry image `ref`, pulled into the store; an
        error names `where` (the Dockerfile line)."""
        pulled = self._pulled.get((ref, want))
        if pulled is not None:
            return pulled
        try:
            base = pull_base(self.layers, ref, platform=want, options=self.registry)
        except PylayersError as e:
            e.args = (f"{where}: {e}",)
            raise
        self._pulled[(ref, want)] = base.layer, base.config
        return base.layer, base.config

    def _vars(self, state: _State) -> dict[str, str]:
        """What substitution sees: the stage's ARGs with values, then ENV over them."""
        out = {k: v for k, v in state.args.items() if v is not None}
        out.update(state.environ)
        return out

    def _history(self, state: _State, inst: Instruction, created_by: str,
                 empty: bool) -> None:
        item: dict = {"created_by": created_by, "comment": "pylayers build"}
        if self.epoch is not None:
            item["created"] = _iso(self.epoch)
        if empty:
            item["empty_layer"] = True
        state.history.append(item)

    def _step(self, state: _State, inst: Instruction, ev: StepEvent,
              states: dict[int, _State]) -> None:
        cmd = inst.cmd
        cfg = state.config
        used: set[str] = set()
        env = self._vars(state)
        if cmd == "ARG":
            for name, default in arg_decls(inst, self.df.path, self.df.escape):
                if name in self.build_args or default is not None:
                    state.args[name] = self._arg_value(name, default, env, inst)
                else:
                    state.args[name] = self.global_args.get(name)
        elif cmd == "ENV":
            new = {k: self._expand(v, env, inst, used)
                   for k, v in pairs(inst, self.df.path, self.df.escape)}
            state.environ.update(new)
            cfg["Env"] = _env_list({**_env_dict(cfg.get("Env")), **new})
        elif cmd == "LABEL":
            labels = cfg.setdefault("Labels", {})
            for k, v in pairs(inst, self.df.path, self.df.escape):
                labels[self._expand(k, env, inst, used)] = self._expand(v, env, inst, used)
        elif cmd == "USER":
            cfg["User"] = self._expand(inst.text, env, inst, used)
        elif cmd == "WORKDIR":
            path = fsops.image_path(cfg.get("WorkingDir") or "/",
                                    self._expand(inst.text, env, inst, used)).rstrip("/") or "/"
            cfg["WorkingDir"] = path
            if not self._exists_dir(state.layer, path):
                self._fs_step(state, inst, ev, f"WORKDIR {path}", {}, None,
                              lambda root: fsops.makedirs(root, path))
                self._history(state, inst, inst.original, False)
                return
        elif cmd in ("CMD", "ENTRYPOINT"):
            argv = inst.json if inst.json is not None else (
                self._shell(state) + [inst.text] if inst.text else [])
            key = "Cmd" if cmd == "CMD" else "Entrypoint"
            cfg[key] = argv or None
            if cmd == "CMD":
                state.cmd_set = True
            elif not state.cmd_set:
                cfg.pop("Cmd", None)
        elif cmd == "EXPOSE":
            ports = cfg.setdefault("ExposedPorts", {})
            for p in self._expand_words(inst.text, env, inst, used):
                port, _, proto = p.partition("/")
                if not port.replace("-", "").isdigit() or proto not in ("", "tcp", "udp",
                                                                         "sctp"):
                    raise DockerfileError(f"EXPOSE: invalid port {p!r}", inst.line,
                                          self.df.path)
                ports[f"{port}/{proto or 'tcp'}"] = {}
        elif cmd == "VOLUME":
            vols = cfg.setdefault("Volumes", {})
            words = inst.json if inst.json is not None else self._expand_words(
                inst.text, env, inst, used)
            for v in words:
                if not v:
                    raise DockerfileError("VOLUME: an empty path", inst.line, self.df.path)
                vols[v] = {}
        elif cmd == "SHELL":
            cfg["Shell"] = list(inst.json or [])
        elif cmd == "STOPSIGNAL":
            cfg["StopSignal"] = self._expand(inst.text, env, inst, used)
        elif cmd == "HEALTHCHECK":
            cfg["Healthcheck"] = metadata.healthcheck(inst.text, inst.flags)
        elif cmd == "ONBUILD":
            cfg["OnBuild"] = [*(cfg.get("OnBuild") or []), inst.text]
        elif cmd == "MAINTAINER":
            state.config.setdefault("Labels", {})["maintainer"] = inst.text
        elif cmd == "RUN":
            self._run(state, inst, ev, states)
            return
        elif cmd in ("COPY", "ADD"):
            self._copy(state, inst, ev, states)
            return
        self._history(state, inst, inst.original, True)

    def _shell(self, state: _State) -> list[str]:
        return list(state.config.get("Shell") or DEFAULT_SHELL)

    def _exists_dir(self, layer: bytes | None, path: str) -> bool:
        if layer is None:
            return path == "/"
        self._need(layer)
        want = path.strip("/").encode()
        for e in self.layers.tree(layer):
            if e.path == want:
                return e.kind in (DIR, SYMLINK)
        return False

    # -- RUN -----------------------------------------------------------------------------
    def _run(self, state: _State, inst: Instruction, ev: StepEvent,
             states: dict[int, _State]) -> None:
        cfg = state.config
        if inst.json is not None:
            argv = list(inst.json)
            if not argv:
                raise DockerfileError("RUN: an empty command", inst.line, self.df.path)
            shell = None
            files: tuple = ()
        else:
            shell = self._shell(state)
            argv, files = heredoc.run_command(inst.text, inst.heredocs, shell) \
                if inst.heredocs else ([*shell, inst.text], ())
        args = {k: v for k, v in state.args.items() if v is not None and k not in state.environ}
        for k in args:
            if k in self.build_args:
                self.used_args.add(k)
        env = {**args, **state.environ}
        workdir = cfg.get("WorkingDir") or "/"
        user = cfg.get("User") or "root"
        options: dict = {"workdir": workdir, "user": user}
        if shell is not None:
            options["shell"] = shell
        options.update({f"env:{k}": v for k, v in state.environ.items()})
        options.update({f"arg:{k}": v for k, v in args.items()})
        with self._at(inst):
            step_mounts, network = self._mounts(state, inst, states, workdir)
            key_inputs = None
            if step_mounts is not None:
                options.update(step_mounts.key_options())
                inputs = step_mounts.key_inputs()
                if inputs:
                    key_inputs = {"inputs": inputs, "ignore": {"owner"},
                                  "exclude": self.ctx.walk_exclude if self.ctx.exclusions
                                  else None}
        if network != "default":
            options["network"] = network

        def action(root: str) -> None:
            uid, gid, groups, home = fsops.lookup_user(root, user)
            run_env = dict(env)
            run_env.setdefault("PATH", DEFAULT_PATH)
            run_env.setdefault("HOME", home or "/")
            fsops.makedirs(root, workdir)
            made = []
            root_times = os.stat(root)
            for d in ("proc", "dev"):
                host = os.path.join(root, d)
                if os.path.islink(host) or (os.path.lexists(host) and not os.path.isdir(host)):
                    raise PylayersError(f"/{d} in the image is not a directory: cannot run "
                                        f"{inst.original!r}")
                if not os.path.lexists(host):
                    os.mkdir(host, 0o755)
                    made.append(host)
            try:
                with self._at(inst):
                    mounted = step_mounts.enter(root) if step_mounts is not None else []
                    run_env.update(step_mounts.variables if step_mounts is not None else {})
                res = sandbox.run(sandbox.RunSpec(root, argv, run_env, workdir, uid, gid,
                                                  groups, files, tuple(mounted), network),
                                  self.on_output)
            finally:
                if step_mounts is not None:
                    step_mounts.exit()
                for host in made:
                    try:
                        os.rmdir(host)
                    except OSError:
                        pass
                if made:
                    os.utime(root, ns=(root_times.st_atime_ns, root_times.st_mtime_ns))
            if res.exit_code != 0:
                tail = res.tail.rstrip()
                raise StepFailed(
                    f"{self.df.path}:{inst.line}: {inst.original!r} failed with exit code "
                    f"{res.exit_code}" + (f"; its output ends: {tail[-2000:]}" if tail
                                          else " (no output)"),
                    res.exit_code, res.tail)

        self._fs_step(state, inst, ev, inst.key_text, options, key_inputs, action)
        self._history(state, inst, inst.original, False)

    def _mounts(self, state: _State, inst: Instruction, states: dict[int, _State],
                workdir: str) -> tuple[mounts.StepMounts | None, str]:
        """RUN --mount and --network (build/mounts.py), variables substituted."""
        env = self._vars(state)
        network = mounts.parse_network(self._expand(inst.flags["network"], env, inst, set())) \
            if "network" in inst.flags else "default"
        if not inst.mounts:
            return None, network
        specs = [mounts.parse_mount(self._expand(m, env, inst, set())) for m in inst.mounts]
        sources = mounts.Sources(
            self.ctx.root, self.ctx.walk_exclude if self.ctx.exclusions else None,
            self.secrets, self.store.path,
            lambda ref: self._from_layer(ref, states, inst), self._view, self._drop_view)
        return mounts.StepMounts(specs, workdir, sources), network

    @contextlib.contextmanager
    def _at(self, inst: Instruction):
        """A --mount's or an ADD URL's error names the instruction's line."""
        try:
            yield
        except (mounts.MountError, mounts.MountNotFound, download.DownloadFailed,
                download.BadURL) as e:
            e.args = (f"{self.df.path}:{inst.line}: {inst.cmd}: {e}",)
            raise

    # -- COPY / ADD ----------------------------------------------------------------------
    def _copy(self, state: _State, inst: Instruction, ev: StepEvent,
              states: dict[int, _State]) -> None:
        env = self._vars(state)
        used: set[str] = set()
        words = list(inst.json) if inst.json is not None else self._expand_words(
            inst.text, env, inst, used)
        if inst.json is not None:
            words = [self._expand(w, env, inst, used) for w in words]
        *srcs, dest_raw = words
        inline = heredoc.sources(split_words(inst.text, self.df.escape), inst.heredocs) \
            if inst.heredocs and inst.json is None else {}
        if len(srcs) in inline:
            raise DockerfileError(f"{inst.cmd}: a here-document cannot be the destination",
                                  inst.line, self.df.path)
        contents = [(doc.name, (expand_heredoc(doc.content, env, used)
                                if doc.expand else doc.content).encode("utf-8",
                                                                       "surrogateescape"))
                    for _, doc in sorted(inline.items())]
        srcs = [w for i, w in enumerate(srcs) if i not in inline]
        workdir = state.config.get("WorkingDir") or "/"
        dest = fsops.image_path(workdir, dest_raw)
        chown = self._expand(inst.flags["chown"], env, inst, used) \
            if "chown" in inst.flags else None
        chmod = None
        if "chmod" in inst.flags:
            text = self._expand(inst.flags["chmod"], env, inst, used)
            try:
                chmod = int(text, 8)
                if not 0 <= chmod <= 0o7777:
                    raise ValueError
            except ValueError:
                raise DockerfileError(f"{inst.cmd} --chmod={text}: an octal mode "
                                      "(e.g. 0755)", inst.line, self.df.path) from None
        options: dict = {"dest": dest, "chown": chown,
                         "chmod": f"{chmod:04o}" if chmod is not None else None}
        for name in sorted(used):
            if name in state.environ:
                options[f"env:{name}"] = state.environ[name]
            elif state.args.get(name) is not None:
                options[f"arg:{name}"] = state.args[name]
                if name in self.build_args:
                    self.used_args.add(name)
        source_from = inst.flags.get("from")
        view = None
        urls = [w for w in srcs if download.is_url(w) or download.is_git(w)]
        srcs = [w for w in srcs if w not in urls]
        tmp = tempfile.mkdtemp(prefix="pylayers-add-") if urls else None
        try:
            with self._at(inst):
                fetched = self._urls(inst, urls, len(srcs) + len(contents), options,
                                     tmp, env, used)
            if source_from is not None:
                source_from = self._expand(source_from, env, inst, used)
                layer = self._from_layer(source_from, states, inst)
                options["from"] = source_from
                view, src_root = self._view(layer)
                src_ctx = Context(src_root, [])
            else:
                src_ctx = self.ctx
            sources = src_ctx.sources(srcs) if srcs else []
            if len(sources) + len(contents) + len(urls) > 1 and not dest.endswith("/"):
                raise DockerfileError(f"{inst.cmd}: with more than one source the "
                                      "destination must be a directory ending in /",
                                      inst.line, self.df.path)
            inputs = [(str(s.path), s.rel or ".") for s in sources]
            ignore = {"owner"} | ({"mode"} if chmod is not None else set())
            exclude = src_ctx.walk_exclude if src_ctx.exclusions else None
            key_inputs = dict(inputs=inputs, exclude=exclude, ignore=ignore)

            def action(root: str) -> None:
                uid, gid = fsops.chown_ids(root, chown) if chown else (0, 0)
                copier = fsops.Copier(root, uid, gid, chmod, self.epoch_ns,
                                      (lambda p: src_ctx.walk_exclude(os.fsencode(p)))
                                      if src_ctx.exclusions else None)
                for s in sources:
                    if inst.cmd == "ADD" and not s.is_dir and fsops.is_archive(s.path):
                        fsops.unpack(root, s.path, dest)
                        continue
                    if s.is_dir:
                        target = dest
                    else:
                        host = fsops.resolve(root, dest)
                        if dest.endswith("/") or os.path.isdir(host):
                            target = dest.rstrip("/") + "/" + os.path.basename(s.rel or
                                                                               s.path.name)
                        else:
                            target = dest
                    copier.copy(s.path, target)
                for name, data in contents:
                    host = fsops.resolve(root, dest)
                    into = dest.endswith("/") or os.path.isdir(host)
                    copier.write(data, dest.rstrip("/") + "/" + name if into else dest)
                for url, got, checksum in fetched:
                    with self._at(inst):
                        if got is None:
                            assert tmp is not None
                            got = download.fetch(url, tmp, checksum=checksum).path
                        host = fsops.resolve(root, dest)
                        into = dest.endswith("/") or os.path.isdir(host)
                        target = dest.rstrip("/") + "/" + download.file_name(url) \
                            if into else dest
                    os.chmod(got, 0o600)  # Docker's mode for a download
                    copier.copy(Path(got), target)

            self._fs_step(state, inst, ev, inst.key_text, options, key_inputs, action)
        finally:
            if view is not None:
                self._drop_view(view)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        self._history(state, inst, inst.original, False)

    def _urls(self, inst: Instruction, urls: list[str], others: int, options: dict,
              tmp: str | None, env: Mapping[str, str],
              used: set[str]) -> list[tuple[str, str | None, str | None]]:
        """ADD's URL sources (build/download.py): (url, the file downloaded now or None,
        the --checksum); what of each is in the key goes into `options`."""
        checksum = None
        if "checksum" in inst.flags:
            checksum = download.parse_checksum(self._expand(inst.flags["checksum"], env,
                                                            inst, used))
            if len(urls) != 1 or others:
                raise download.BadURL("--checksum takes one source, an http(s) URL")
        if not urls:
            return []
        if inst.cmd != "ADD":
            raise download.BadURL("COPY does not take URLs (ADD does)")
        out: list[tuple[str, str | None, str | None]] = []
        for i, url in enumerate(urls):
            if download.is_git(url):
                raise download.BadURL(f"{url}: ADD of a git repository is not supported "
                                      "by pylayers build (clone it into the context)")
            if len(urls) > 1:
                download.file_name(url)  # saved in a directory: it needs a name
            if checksum is not None:
                options[f"url{i}"] = {"url": url, "checksum": f"sha256:{checksum}"}
                out.append((url, None, checksum))
            else:
                assert tmp is not None
                got = download.fetch(url, tmp)
                options[f"url{i}"] = {"url": url, "sha256": got.sha256}
                out.append((url, got.path, None))
        return out

    def _from_layer(self, ref: str, states: dict[int, _State], inst: Instruction) -> bytes:
        flag = "RUN --mount from" if inst.cmd == "RUN" else "COPY --from"
        dep = self.df.stage(ref)
        if dep is not None:
            state = states.get(dep.index)
            if state is None:
                raise DockerfileError(f"{flag}={ref}: that stage comes later",
                                      inst.line, self.df.path)
            if state.layer is None:
                raise DockerfileError(f"{flag}={ref}: that stage has no files",
                                      inst.line, self.df.path)
            return state.layer
        if is_reference(ref):
            return self._pull(ref, f"{self.df.path}:{inst.line}: {flag}={ref}")[0]
        try:
            return self.layers.resolve(ref)
        except NotFound:
            raise NotFound(f"{self.df.path}:{inst.line}: {flag}={ref}: no stage, tag "
                           "or layer of that name") from None

    def _view(self, layer: bytes) -> tuple[tuple[str, str], Path]:
        self._need(layer)
        key = f"build-view-{os.urandom(8).hex()}"
        target = tempfile.mkdtemp(prefix="pylayers-build-from-")
        try:
            mounts = self.snapshots.view(key, layer.hex(), labels=_labels("view", target),
                                         driver=self.driver)
        except BaseException:
            os.rmdir(target)
            raise
        try:
            mount_all(mounts, target)
        except BaseException:
            os.rmdir(target)
            self.snapshots.remove(key)
            raise
        return (key, target), Path(target)

    def _drop_view(self, view: tuple[str, str]) -> None:
        key, target = view
        try:
            unmount(target)
        finally:
            try:
                os.rmdir(target)
            except OSError:
                pass
            self.snapshots.remove(key)

    # -- one layer -------------------------------------------------------------------------
    def _fs_step(self, state: _State, inst: Instruction, ev: StepEvent, text: str,
                 options: dict, key_inputs: dict | None,
                 action: Callable[[str], None]) -> None:
        kw = key_inputs or {}
        key = cache_key(state.key, text, kw.get("inputs"), options, store=self.store,
                        exclude=kw.get("exclude"), ignore=kw.get("ignore", ()))
        layer = None if self.no_cache else self.cache.get(key)
        if layer is None and self.remote is not None and not self.no_cache:
            layer = self.remote.lookup(key, state.layer)  # pulled when needed
        if layer is not None:
            ev.cached, ev.layer = True, layer
        else:
            if self.explain and not self.no_cache:
                ev.explanation = self.cache.explain_miss(
                    key, self.remote.candidates if self.remote is not None else None)
            started = time.time()
            layer = self._commit_step(state.layer, text.split("\n", 1)[0], action)
            self.cache.put(key, layer)
            ev.layer = layer
            rec = self.layers.record(layer)
            # a layer made again (--no-cache, or another path to the same tree) added
            # nothing: its record keeps what its first commit added
            ev.new_bytes = rec.new_bytes if rec.created >= started else 0
        state.layer, state.key = layer, key
        state.own_layers += 1
        self.entries.append((key, layer))

    def _need(self, layer: bytes | None) -> None:
        """A layer a registry cache hit gave is pulled when the build reads it."""
        if self.remote is not None:
            self.remote.need(layer)

    def _commit_step(self, parent: bytes | None, message: str,
                     action: Callable[[str], None]) -> bytes:
        self._need(parent)
        key = f"build-{os.urandom(8).hex()}"
        target = tempfile.mkdtemp(prefix="pylayers-build-")
        committed = False
        try:
            mounts = self.snapshots.prepare(key, parent.hex() if parent else None,
                                            labels=_labels("step", target),
                                            driver=self.driver)
        except BaseException:
            os.rmdir(target)
            raise
        try:
            mount_all(mounts, target)
            try:
                action(target)
            finally:
                unmount(target)
            before = {}
            if parent is not None:
                before = {e.path: e.mtime_ns for e in self.layers.tree(parent)}
            fsops.clamp_mtimes(str(self.snapshots.content_dir(key)), before, self.epoch_ns)
            layer = self.snapshots.commit(None, key, message=message)
            committed = True
            return layer
        finally:
            try:
                os.rmdir(target)
            except OSError:
                pass
            if not committed:
                try:
                    self.snapshots.remove(key)
                except PylayersError:
                    pass

    # -- the image config --------------------------------------------------------------------
    def _image_config(self, state: _State) -> dict:
        doc: dict = {"architecture": GOARCH.get(platform.machine(), platform.machine()),
                     "os": "linux", "config": state.config,
                     "rootfs": {"type": "layers", "diff_ids": []},
                     "history": state.history}
        if self.epoch is not None:
            doc["created"] = _iso(self.epoch)
        return doc


def _start_time(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].split()[19].decode()


def _labels(kind: str, target: str) -> dict[str, str]:
    """A build snapshot's labels: what it is, the process that made it (pid and start
    time, so a reused pid is not taken for it) and where it is mounted."""
    pid = os.getpid()
    return {BUILD_LABEL: kind, OWNER_LABEL: f"{pid}:{_start_time(pid)}",
            TARGET_LABEL: target}


def remove_stale_snapshots(snapshots: Snapshotter) -> list[str]:
    """Remove the active snapshots and views of builds whose process is gone (killed
    mid-step), unmounting them first; the keys removed. A running build's are kept."""
    gone = []
    for info in list(snapshots.walk(labels={BUILD_LABEL: "*"})):
        if info.kind == Kind.COMMITTED:
            continue
        pid, _, started = info.labels.get(OWNER_LABEL, "").partition(":")
        if pid.isdigit() and _start_time(int(pid)) == started:
            continue
        target = info.labels.get(TARGET_LABEL)
        if target and os.path.isdir(target):
            while is_mounted(target):
                unmount(target)
            try:
                os.rmdir(target)
            except OSError:
                pass
        snapshots.remove(info.key)
        gone.append(info.key)
    return gone


__all__ = ["BuildResult", "Builder", "StepEvent", "StepFailed", "remove_stale_snapshots"]
