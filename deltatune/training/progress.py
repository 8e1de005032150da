"""The one progress display of `deltatune train` and `deltatune compare`.

On a terminal it is a live bar (rich); anywhere else (under `nohup`, piped to a file, in CI) it prints a
plain line when the work starts, at most every `every` seconds while it runs, and when it ends, flushed at
once: a live bar written to a file shows nothing for minutes and then everything at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

PLAIN_EVERY_SECONDS = 30.0


def format_seconds(seconds: float) -> str:
    """125.4 -> "2:05"; 3725 -> "1:02:05"."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def eta_seconds(elapsed: float, fraction_done: float) -> float | None:
    """Time left if the rest goes at the pace so far; None before any work is done."""
    if fraction_done <= 0:
        return None
    return max(0.0, elapsed * (1 - fraction_done) / fraction_done)


class ProgressDisplay:
    """`update(completed, info)` as the work goes on, `close()` at the end.

    `completed` is out of `total` (steps, or cells with their running parts as fractions); `info` is shown
    beside it. `live` forces the bar (True) or the plain lines (False); by default the bar only on a terminal.
    """

    def __init__(self, label: str, total: float, start: float = 0, live: bool | None = None,
                 stream: TextIO | None = None, every: float = PLAIN_EVERY_SECONDS,
                 clock: Callable[[], float] = time.perf_counter):
        self.label, self.total, self.completed, self.info = label, total, start, ""
        self.stream, self.clock = stream or sys.stdout, clock
        self.every, self.started, self.printed_at = every, clock(), -float("inf")
        self.start = start
        self.bar = None
        if live if live is not None else self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn(f"{label} {{task.fields[count]}}"), BarColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                TextColumn("{task.fields[eta]}"), console=Console(file=self.stream))
            self.bar.start()
            self.task = self.bar.add_task(label, total=total, completed=start, info="", count="", eta="")

    def eta(self) -> float | None:
        elapsed = self.clock() - self.started
        return eta_seconds(elapsed, (self.completed - self.start) / max(self.total - self.start, 1e-9))

    def line(self) -> str:
        """What the display shows now: `LABEL 3/9 INFO | 1:02 elapsed, ETA 2:10`."""
        eta = self.eta()
        count = f"{self.completed:g}/{self.total:g}" if self.completed == int(self.completed) \
            else f"{self.completed:.1f}/{self.total:g}"
        return (f"{self.label} {count} {self.info} | {format_seconds(self.clock() - self.started)} elapsed"
                + ("" if eta is None else f", ETA {format_seconds(eta)}"))

    def update(self, completed: float, info: str = "") -> None:
        """Record progress; the plain display prints at most every `every` seconds."""
        self.completed, self.info = completed, info
        if self.bar is not None:
            eta = self.eta()
            self.bar.update(self.task, completed=completed, info=info, count=f"{int(completed)}/{self.total:g}",
                            eta="" if eta is None else f"ETA {format_seconds(eta)}")
        elif self.clock() - self.printed_at >= self.every:
            self.print_line()

    def note(self, text: str) -> None:
        """A line of its own (a cell finished...), above the bar or among the plain lines."""
        if self.bar is not None:
            self.bar.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=self.stream, flush=True)

    def print_line(self) -> None:
        self.printed_at = self.clock()
        print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        elif self.printed_at != -float("inf"):  # the last state, unless nothing was ever printed
            self.print_line()
