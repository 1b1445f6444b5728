"""Progress on stderr for long commands (snapshot, checkout, gc, fsck).

The library reports work done through callbacks (`progress(n)` bytes; gc and fsck
`progress(stage, done, total)`) and never prints; this turns the reports into:

- on a terminal: a `rich` bar with the total, percent and ETA (the total comes from a
  cheap pre-scan of sizes), shown once the work has taken half a second;
- with `--progress` when stderr is not a terminal (a log, CI): a line every few
  seconds (`PYLAYERS_PROGRESS_INTERVAL`, default 5) and a last one when done;
- with `--quiet`: nothing (and no summary lines either; warnings and errors stay).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

import click

from .app import human

AUTO, LINES, OFF = "auto", "lines", "off"
# seconds before a bar is drawn: quick commands never draw one
_SHOW_AFTER = float(os.environ.get("PYLAYERS_PROGRESS_DELAY", "0.5"))


def progress_options(f: Callable) -> Callable:
    """`--progress` and `--quiet` for a long-running verb."""
    f = click.option("--quiet", "-q", "quiet", is_flag=True,
                     help="No progress and no summary on stderr (errors and warnings "
                          "still).")(f)
    return click.option("--progress", "progress_lines", is_flag=True,
                        help="Report progress even when stderr is not a terminal (a "
                             "line every few seconds).")(f)


def mode_of(progress_lines: bool, quiet: bool) -> str:
    if quiet:
        return OFF
    return LINES if progress_lines else AUTO


def _eta(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """A counter (bytes, or `unit`) shown as a bar (terminal) or as lines (`--progress` elsewhere).
    Call it with the bytes just done; `total` may be set when known; `stage` reports a
    named step (gc, fsck); `close` when done."""

    def __init__(self, label: str, mode: str = AUTO, total: int | None = None,
                 unit: str = "bytes", total_fn: Callable[[], int] | None = None) -> None:
        """`total_fn`: computes the total (a pre-scan), on a thread of its own and only
        once something is to be shown."""
        self.label = label
        self._total_fn = total_fn
        self.unit = unit
        self.total = total
        self.done = 0
        self.tty = sys.stderr.isatty()
        self.mode = mode
        self.enabled = mode != OFF and (self.tty or mode == LINES)
        self.start = time.monotonic()
        self.last_line = self.start
        self.interval = float(os.environ.get("PYLAYERS_PROGRESS_INTERVAL", "5"))
        self._bar = None
        self._task = None
        self._total_thread: threading.Thread | None = None
        self._stage = ""

    @property
    def wanted(self) -> bool:
        """Whether anything will be shown: callers skip the pre-scan of sizes if not."""
        return self.enabled

    # -- reports ---------------------------------------------------------------------
    def __call__(self, n: int) -> None:
        self.done += n
        if self.enabled:
            self._show(False)

    def stage(self, name: str, done: int, total: int) -> None:
        self._stage = name
        self.done, self.total = done, total or None
        if self.enabled:
            self._show(False)

    # -- output ----------------------------------------------------------------------
    def _describe(self) -> str:
        return f"{self.label}: {self._stage}" if self._stage else self.label

    def _start_total(self) -> None:
        fn, self._total_fn = self._total_fn, None
        if fn is None:
            return

        def work() -> None:
            try:
                total = fn()
            except Exception:  # an estimate only: no total, no harm
                return
            if self.total is None:
                self.total = total

        self._total_thread = threading.Thread(target=work, name="pylayers-presize",
                                              daemon=True)
        self._total_thread.start()

    def _show(self, final: bool) -> None:
        now = time.monotonic()
        if self._total_fn is not None and not final and \
                (not self.tty or now - self.start >= _SHOW_AFTER):
            self._start_total()
        if self.tty:
            if self._bar is None and (final or now - self.start < _SHOW_AFTER):
                return
            self._draw()
            return
        if final or now - self.last_line >= self.interval:
            self.last_line = now
            click.echo(self._line(now, final), err=True)

    def _line(self, now: float, final: bool) -> str:
        elapsed = now - self.start
        if self._stage and final:
            return f"{self.label}: done in {elapsed:.1f} s"
        text = f"{self._describe()}: "
        if self.total:
            pct = min(100, int(self.done * 100 / self.total))
            text += f"{pct}% ({self._amount(self.done)} of {self._amount(self.total)})"
            if not final and self.done:
                text += f", ETA {_eta(elapsed * (self.total - self.done) / self.done)}"
        else:
            text += self._amount(self.done)
        return text + (f" in {elapsed:.1f} s" if final else "")

    def _amount(self, n: int) -> str:
        return human(n) if self.unit == "bytes" else f"{n} {self.unit}"

    def _draw(self) -> None:
        if self._bar is None:
            from rich.console import Console  # only on a terminal, only when slow
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                MofNCompleteColumn,
                TaskProgressColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bar
            amount = DownloadColumn(binary_units=True) if self.unit == "bytes" \
                else MofNCompleteColumn()
            self._bar = Bar(TextColumn("{task.description}"), BarColumn(),
                            TaskProgressColumn(), amount, TimeRemainingColumn(),
                            console=Console(file=sys.stderr), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self._describe(), total=self.total)
        self._bar.update(self._task, completed=self.done, total=self.total,
                         description=self._describe())

    def close(self) -> None:
        if not self.enabled:
            return
        if self._total_thread is not None:
            self._total_thread.join(timeout=5)  # the last line says the total
        if self._bar is not None:
            self._draw()
            self._bar.stop()
            self._bar = None
        elif not self.tty:
            self._show(True)
