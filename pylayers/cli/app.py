"""The `pylayers` group, store opening and output helpers shared by the verbs."""

from __future__ import annotations

import base64
import importlib
import json
import sys
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

from ..display import one_line
from ..errors import UsageError
from ..layers.refs import check_tag, parse_ref

if TYPE_CHECKING:
    from ..layers.repo import Layers

# Each verb's module is imported only when the verb runs (or help lists it): a command
# pays for its own imports only (mount's, gc's and the build cache's are not small).
VERBS = {
    "init": "maintenance", "snapshot": "snapshot", "checkout": "snapshot", "diff": "diff",
    "log": "inspect", "show": "inspect", "ls": "inspect", "cat": "inspect", "tag": "refs",
    "tags": "refs", "rm": "refs", "du": "maintenance", "gc": "maintenance",
    "fsck": "maintenance", "mount": "mounts", "umount": "mounts", "commit": "mounts",
    "snapshots": "snapshots", "layers": "inspect", "import": "oci", "export": "oci",
    "push": "registry", "pull": "registry",
    "containerd-snapshotter": "containerd", "build": "build", "history": "build",
}

# the verb being run, for pointing a usage error at its help
current = {"verb": None}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(VERBS)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name, cmd, rest = super().resolve_command(ctx, args)
        current["verb"] = name
        return name, cmd, rest

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in VERBS:
            importlib.import_module(f"{__package__}.{VERBS[cmd_name]}")
        return self.commands.get(cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--store", "store_path", envvar="PYLAYERS_STORE", type=click.Path(),
              help="Store directory (default: $PYLAYERS_STORE, else $XDG_DATA_HOME/pylayers).")
@click.version_option(package_name="pylayers")
@click.pass_context
def cli(ctx: click.Context, store_path: str | None) -> None:
    """pylayers: a content-addressed snapshot store for container-style layers."""
    if store_path == "":  # `--store "$UNSET"` must not make the current directory a store
        current["verb"] = None  # the group's option: its help is the group's
        raise click.BadParameter("must not be empty", param_hint="'--store'")
    ctx.obj = {"store": store_path}


# -- checks at the door: a bad value is a usage error (exit 2) before any work -----------
def tag_param(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A click callback: `value` must be a valid tag name."""
    if value is not None:
        try:
            check_tag(value)
        except UsageError as e:
            raise click.BadParameter(str(e)) from None
    return value


def ref_param(ctx: click.Context, param: click.Parameter, value):
    """A click callback: `value` (or each of several) must be a well-formed REF."""
    for v in (value if isinstance(value, tuple) else (value,)):
        if v is not None:
            try:
                parse_ref(v)
            except UsageError as e:
                raise click.BadParameter(str(e)) from None
    return value


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


class Size(click.ParamType):
    """A byte count: digits, optionally followed by K, M or G (KiB, MiB, GiB)."""

    name = "size"

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().removesuffix("ib").removesuffix("b")
        unit = text[-1:] if text[-1:] in _UNITS else ""
        digits = text[: len(text) - len(unit)]
        if not digits.isdigit():
            self.fail(f"{value!r} is not a size (digits, optionally followed by K, M or G)",
                      param, ctx)
        return int(digits) * _UNITS[unit]


# -- JSON output: one schema, documented in docs/cli.md ----------------------------------
def path_json(raw: bytes, key: str = "path", root: bool = True) -> dict:
    """A file name for JSON: {key: text}; when it is not UTF-8, the text has U+FFFD in
    place of the bad bytes and {key + "_b64": the exact bytes in base64} is added."""
    full = (b"/" + raw) if root else raw
    try:
        return {key: full.decode("utf-8")}
    except UnicodeDecodeError:
        return {key: full.decode("utf-8", "replace"),
                key + "_b64": base64.b64encode(full).decode("ascii")}


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2))


def _say_waiting() -> None:
    click.echo("pylayers: waiting for other processes using the store...", err=True)


@contextmanager
def open_layers(ctx: click.Context, *, create: bool = True,
                exclusive: bool = False) -> Iterator[Layers]:
    # imported here: `--version`, `--help` and usage errors never open a store
    from ..layers.repo import Layers
    from ..store import Store
    store = Store.open(ctx.obj["store"], create=create, exclusive=exclusive,
                       on_wait=_say_waiting)
    try:
        yield Layers(store)
    finally:
        store.close()


def display_path(path: bytes) -> str:
    """'/' + path, quoted C-style (as git does) when it holds control characters,
    quotes, backslashes or bytes that are not UTF-8, so every path stays on one line."""
    return display_bytes(b"/" + path)


def _plain(text: str) -> bool:
    if text.isascii():
        return not any(c < " " or c in '"\\\x7f' for c in text)
    # Cc: C0, DEL and C1 controls (U+0085 NEL, U+009B CSI...); Zl, Zp: line separators
    return not any(c in '"\\' or unicodedata.category(c) in ("Cc", "Zl", "Zp")
                   for c in text)


def display_bytes(p: bytes) -> str:
    """A file name or symlink target as text on one line: as is when it is plain UTF-8,
    else quoted C-style with every other byte escaped."""
    try:
        text = p.decode("utf-8")
        if _plain(text):
            return text
    except UnicodeDecodeError:
        pass
    out = []
    for b in p:
        ch = chr(b)
        if ch == "\\" or ch == '"':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif b < 0x20 or b >= 0x7f:
            out.append(f"\\{b:03o}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def warn(warnings: list[str]) -> None:
    """The library's warnings (a scan's vanished files...), one line each on stderr."""
    for w in warnings:
        print(f"pylayers: warning: {one_line(w)}", file=sys.stderr)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)

