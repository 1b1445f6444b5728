"""The command line. Errors are caught only here: one line on stderr and an exit code
per kind of error (pylayers/errors.py, README "Exit codes"), never a traceback (set
PYLAYERS_DEBUG=1 to get one)."""

from __future__ import annotations

import errno
import os
import sys

import click

from ..display import one_line
from ..errors import PylayersError, UsageError
from .app import cli, current  # the verbs' modules are imported as they are used (VERBS)


def _help_hint() -> str:
    verb = current["verb"]
    return f"see `pylayers {verb} --help`" if verb else "see `pylayers --help`"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:  # bare `pylayers`: what it can do
        click.echo(cli.get_help(click.Context(cli, info_name="pylayers")))
        return 0
    current["verb"] = None
    try:
        rv = cli.main(args=args, prog_name="pylayers", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.UsageError as e:
        msg = e.format_message().splitlines()[0] if e.format_message() else "usage error"
        print(f"pylayers: {one_line(msg)} ({_help_hint()})", file=sys.stderr)
        return 2
    except click.Abort:
        print("pylayers: aborted", file=sys.stderr)
        return 130
    except click.ClickException as e:
        print(f"pylayers: {one_line(e.format_message())}", file=sys.stderr)
        return e.exit_code
    except UsageError as e:
        if os.environ.get("PYLAYERS_DEBUG"):
            raise
        print(f"pylayers: {one_line(str(e))} ({_help_hint()})", file=sys.stderr)
        return e.exit_code
    except PylayersError as e:
        if os.environ.get("PYLAYERS_DEBUG"):
            raise
        print(f"pylayers: {one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("pylayers: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except OSError as e:
        if os.environ.get("PYLAYERS_DEBUG"):
            raise
        name = os.fsdecode(e.filename) if isinstance(e.filename, bytes) else e.filename
        what = f"{name}: " if name else ""
        if e.errno == errno.ENOSPC:
            print(f"pylayers: {one_line(what)}no space left on device", file=sys.stderr)
        else:
            print(f"pylayers: {one_line(what + str(e.strerror or e))}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: still one line, but say so
        if os.environ.get("PYLAYERS_DEBUG"):
            raise
        print(f"pylayers: internal error: {type(e).__name__}: {one_line(str(e))} "
              "(set PYLAYERS_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


def run() -> None:
    sys.exit(main())
