"""`pylayers containerd-snapshotter`: containerd's proxy snapshotter on a unix socket."""

from __future__ import annotations

import logging
import signal
import sys
import threading

import click

from ..display import one_line
from ..mounts import driver_names
from .app import cli


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.exc_info else one_line(text)


@cli.command("containerd-snapshotter")
@click.option("--address", "-a", required=True, type=click.Path(dir_okay=False),
              help="The unix socket to serve on (containerd's proxy_plugins address).")
@click.option("--driver", type=click.Choice(driver_names()), help="Default: overlay "
              "where this process can mount overlayfs, else copy.")
@click.option("--quiet", "-q", is_flag=True, help="Log nothing but the start and stop.")
@click.pass_context
def containerd_snapshotter(ctx: click.Context, address: str, driver: str | None,
                           quiet: bool) -> None:
    """Serve containerd's snapshot API (containerd.services.snapshots.v1) on the unix
    socket ADDRESS until SIGTERM or SIGINT; one line on stderr per failed call."""
    from ..containerd.service import serve  # grpc is imported only by this verb

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine("pylayers containerd-snapshotter: %(message)s"))
    logger = logging.getLogger("pylayers.containerd")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False

    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        _server, stop = serve(address, ctx.obj["store"], driver)
        try:
            logger.warning("serving on %s", address)
            # Python runs a signal's handler in the main thread, when that thread next
            # runs bytecode: a SIGTERM the kernel delivers to one of gRPC's threads
            # does not interrupt a long wait here, so the wait is short
            while not stopping.wait(0.2):
                pass
        finally:
            stop()
        logger.warning("stopped")
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
