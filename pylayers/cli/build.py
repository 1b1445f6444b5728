"""`pylayers build` (a Dockerfile into layers) and `pylayers history`."""

from __future__ import annotations

import sys

import click

from ..build.bases import RegistryOptions
from ..build.builder import Builder, StepEvent
from ..errors import InvalidArgument, NotFound, UsageError
from ..layers.catalog import history as layer_history
from .app import cli, emit_json, human, open_layers, ref_param, tag_param, warn
from .registry import registry_options


def _build_args(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for v in values:
        name, eq, value = v.partition("=")
        if not name:
            raise click.BadParameter(f"{v!r}: say NAME=VALUE", param_hint="'--build-arg'")
        if not eq:
            # as docker: a bare NAME takes its value from the environment, if set there
            import os
            if name not in os.environ:
                continue
            value = os.environ[name]
        out[name] = value
    return out


def _secrets(values: tuple[str, ...]) -> dict[str, bytes]:
    """--secret id=ID,src=FILE (or env=VAR): id -> content, read now."""
    import os

    out: dict[str, bytes] = {}
    for v in values:
        fields = dict(f.partition("=")[::2] for f in v.split(",") if f)
        fields = {k.strip().lower(): val for k, val in fields.items()}
        sid = fields.pop("id", "")
        src = fields.pop("src", None) or fields.pop("source", None)
        env = fields.pop("env", None)
        fields.pop("type", None)
        if not sid or fields or (src is None) == (env is None):
            raise UsageError(f"--secret {v!r}: say id=ID,src=FILE or id=ID,env=VAR")
        if src is not None:
            try:
                with open(src, "rb") as f:
                    out[sid] = f.read(1 << 20 + 1)
            except OSError as e:
                raise NotFound(f"--secret id={sid}: cannot read {src}: {e.strerror}") \
                    from None
            if len(out[sid]) > 1 << 20:
                raise InvalidArgument(f"--secret id={sid}: {src} is over 1 MiB")
        else:
            if env not in os.environ:
                raise NotFound(f"--secret id={sid}: no variable {env} in the environment")
            out[sid] = os.fsencode(os.environ[env or ""])
    return out


def _tags(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]):
    for v in value:
        tag_param(ctx, param, v)
    return value


class _Printer:
    """Each step's line on `out`; a RUN's output as it comes, after its step's header."""

    def __init__(self, out, explain: bool) -> None:
        self.out = out
        self.explain = explain
        self.header: str | None = None
        self.shown = False
        self.at_line_start = True

    def _head(self, e: StepEvent) -> str:
        return f"[{e.stage} {e.number}/{e.total}] {e.text}"

    def event(self, e: StepEvent) -> None:
        if not e.done:
            self.header, self.shown = self._head(e), False
            return
        if e.layer is None:
            status = ""
        elif e.cached:
            status = "CACHED"
        else:
            status = f"{e.seconds:.2f}s, {human(e.new_bytes)} new"
        if self.shown:
            if not self.at_line_start:
                self.out.write("\n")
            line = f"  -> {status}" if status else ""
        else:
            line = self._head(e) + (f"  {status}" if status else "")
        if line:
            self.out.write(line + "\n")
        if self.explain and e.explanation:
            self.out.write(f"  why: {e.explanation}\n")
        self.out.flush()
        self.header, self.shown, self.at_line_start = None, False, True

    def output(self, data: bytes) -> None:
        if self.header is not None and not self.shown:
            self.out.write(self.header + "\n")
            self.shown = True
        text = data.decode("utf-8", "replace")
        self.out.write(text)
        self.at_line_start = text.endswith("\n")
        self.out.flush()


@cli.command()
@click.argument("context", type=click.Path(file_okay=False))
@click.option("-f", "--file", "dockerfile", type=click.Path(dir_okay=False),
              help="The Dockerfile (default: CONTEXT/Dockerfile).")
@click.option("-t", "--tag", "tags", multiple=True, callback=_tags,
              help="Tag the result (repeatable).")
@click.option("--target", help="Build up to this stage (default: the last).")
@click.option("--build-arg", "build_args", multiple=True, metavar="NAME=VALUE",
              help="Set an ARG (repeatable).")
@click.option("--no-cache", is_flag=True, help="Run every step (keys are still recorded).")
@click.option("--explain", is_flag=True, help="Say why each step missed the cache.")
@click.option("--driver", type=click.Choice(["overlay", "copy"]),
              help="Snapshot driver for the steps (default: overlay where it can mount).")
@click.option("--source-date-epoch", type=int, envvar="SOURCE_DATE_EPOCH",
              help="mtime of every file a step makes or changes, and the image's "
                   "creation time (default: $SOURCE_DATE_EPOCH, else 0 and none).")
@click.option("--cache-from", "cache_from", multiple=True, metavar="REGISTRY/REPO:TAG",
              help="Take CACHED steps from this registry build cache (repeatable); their "
                   "layers are pulled (missing chunks only) when the build needs them.")
@click.option("--cache-to", "cache_to", metavar="REGISTRY/REPO:TAG",
              help="Merge this build's cache keys and layers into this registry build "
                   "cache (chunk-level; nothing is sent when it has them all).")
@click.option("--secret", "secrets", multiple=True, metavar="id=ID,src=FILE|env=VAR",
              help="A secret for RUN --mount=type=secret (repeatable); never stored.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON document on stdout (docs/cli.md); step lines go to stderr.")
@registry_options
@click.pass_context
def build(ctx: click.Context, context: str, dockerfile: str | None, tags: tuple[str, ...],
          target: str | None, build_args: tuple[str, ...], no_cache: bool, explain: bool,
          driver: str | None, source_date_epoch: int | None, cache_from: tuple[str, ...],
          cache_to: str | None, secrets: tuple[str, ...], as_json: bool, insecure: bool,
          user: str | None, ca_file: str | None) -> None:
    """Build the Dockerfile in CONTEXT: one layer per RUN, COPY, ADD (and WORKDIR of a
    new directory), each CACHED when its key is known. Prints each step, and the final
    layer's id last. FROM REGISTRY/REPO[:TAG|@DIGEST] pulls the base first (the registry
    options are pull's)."""
    if source_date_epoch is not None and source_date_epoch < 0:
        raise UsageError("--source-date-epoch must not be negative")
    printer = _Printer(sys.stderr if as_json else sys.stdout, explain)
    args = _build_args(build_args)
    remote = None
    with open_layers(ctx) as layers:
        builder = Builder(layers, driver=driver, on_event=printer.event,
                          on_output=printer.output,
                          registry=RegistryOptions(insecure, ca_file, user))
        kw = dict(tags=tags, target=target, build_args=args, no_cache=no_cache,
                  explain=explain, source_date_epoch=source_date_epoch,
                  secrets=_secrets(secrets))
        if cache_from or cache_to:
            from ..build.registrycache import RegistryCache
            from ..oci.auth import find_credentials

            remote = RegistryCache(layers, cache_from, cache_to, insecure=insecure,
                                   credentials=lambda host: find_credentials(host, user),
                                   ca_file=ca_file)
            try:
                res = remote.build(builder, context, dockerfile, **kw)
            finally:
                remote.close()
        else:
            res = builder.build(context, dockerfile, **kw)
    warn(res.warnings)
    exported = remote.export_result if remote is not None else None
    if exported is not None and not as_json:
        print(f"cache-to {exported.reference}: {exported.records} records "
              f"({exported.records_added} added), {exported.layers_pushed} layers pushed, "
              f"{human(exported.counters.get('blob_bytes_sent', 0))} of blobs sent",
              file=sys.stderr)
    if as_json:
        emit_json({"id": res.layer_id.hex(), "tags": sorted(tags),
                   "cached": res.cached, "built": res.built,
                   "steps": [{"stage": s.stage, "number": s.number, "instruction": s.text,
                              "layer": s.layer.hex() if s.layer else None,
                              "cached": s.cached if s.layer else None,
                              "seconds": round(s.seconds, 3), "new_bytes": s.new_bytes,
                              "explanation": s.explanation} for s in res.steps],
                   "warnings": res.warnings,
                   "cache_from": None if remote is None or not cache_from else {
                       "layers_pulled": remote.pulled,
                       "bytes_received": remote.bytes_received},
                   "cache_to": exported.to_json() if exported is not None else None})
        return
    click.echo(f"{res.built} steps run, {res.cached} cached")
    click.echo(res.layer_id.hex())


@cli.command("history")
@click.argument("ref", callback=ref_param)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/cli.md).")
@click.pass_context
def history_cmd(ctx: click.Context, ref: str, as_json: bool) -> None:
    """REF's layers, newest first: the instruction (or message) that made each, its
    size (file bytes) and the bytes it really added to the store after dedup."""
    with open_layers(ctx, create=False) as layers:
        infos = layer_history(layers, layers.resolve(ref))
    if as_json:
        emit_json([{"id": i.id.hex(), "created_by": i.message, "created": i.created,
                    "file_bytes": i.file_bytes, "new_bytes": i.new_bytes} for i in infos])
        return
    click.echo(f"{'LAYER':<12}  {'SIZE':>10}  {'NEW':>10}  CREATED BY")
    for i in infos:
        click.echo(f"{i.id.hex()[:12]}  {human(i.file_bytes):>10}  {human(i.new_bytes):>10}  "
                   f"{i.message or '-'}")
