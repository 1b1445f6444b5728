"""`python -m pylayers` and the `pylayers` command."""

import sys


def run() -> None:
    # a snapshot's walk starts now, on a thread, while the command line's modules load
    from .layers import walkahead

    walkahead.start(sys.argv[1:])
    from .cli import run as cli_run

    cli_run()


if __name__ == "__main__":
    run()
