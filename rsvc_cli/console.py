"""How stages talk to the user: one-line status messages, rich tables, tqdm progress bars.

Messages go to stderr so stdout stays clean for tables people pipe or paste.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from typing import Iterable, Iterator, Sequence

from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

_err = Console(stderr=True, highlight=False, soft_wrap=True)
_out = Console(highlight=False, soft_wrap=False, width=max(100, int(os.environ.get("COLUMNS", "0") or 0)))


def say(message: str) -> None:
    _err.print(message)


def reused(kind: str, path) -> None:
    _err.print(f"[green]reused[/green] {kind} {path} (complete, same settings: nothing to do)")


def wrote(kind: str, path) -> None:
    _err.print(f"[bold]wrote[/bold] {kind} {path}")


# A progress line at most this often when stderr is not a terminal (a SLURM log, a file).
LOG_INTERVAL_S = 30.0


def progress(total: int, desc: str, unit: str = "it", initial: int = 0):
    """Progress of one stage: a bar with integer counts and a rate on a terminal; written to a file
    (stderr not a terminal), one line at most every LOG_INTERVAL_S seconds with the rate and the
    time left. RSVC_PROGRESS=0 silences both, RSVC_PROGRESS=1 forces the bar."""
    setting = os.environ.get("RSVC_PROGRESS", "")
    if setting in ("0", "false"):
        return tqdm(total=total, disable=True)
    if setting in ("1", "true") or sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True, file=sys.stderr,
                    leave=False, bar_format="{l_bar}{bar}| {n}/{total} {unit} [{elapsed}<{remaining}, {rate_fmt}]")
    return LogProgress(total, desc, unit, initial)


class LogProgress:
    """The file form of a progress bar: "extract m [layer3]: 1200/5000 patch (24%), 410 patch/s,
    about 9 s left" when LOG_INTERVAL_S has passed since the last line, and once at the end."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0,
                 interval: float = LOG_INTERVAL_S, clock=time.monotonic):
        self.total, self.desc, self.unit, self.interval, self.clock = int(total), desc, unit, interval, clock
        self.n = self.initial = int(initial)
        self.start = self.last = clock()
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        if self.clock() - self.last >= self.interval:
            self.report()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k} {fmt(v) if isinstance(v, float) else v}" for k, v in values.items())

    def report(self) -> None:
        now = self.clock()
        self.last = now
        done = self.n - self.initial
        rate = done / max(now - self.start, 1e-9)
        line = f"{self.desc}: {self.n}/{self.total} {self.unit}"
        if self.total:
            line += f" ({100 * self.n / self.total:.0f}%)"
        line += f", {rate:.3g} {self.unit}/s"
        if 0 < self.n < self.total and rate > 0:
            line += f", about {duration((self.total - self.n) / rate)} left"
        elif self.n >= self.total:
            line += f", done in {duration(now - self.start)}"
        if self.postfix:
            line += f", {self.postfix}"
        _err.print(line, markup=False)

    def close(self) -> None:
        if self.n > self.initial and self.clock() - self.start >= self.interval:
            self.report()  # a stage long enough to have been reported says when it ends


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds // 60 % 60:02d} min"


def fmt(value, digits: int = 3) -> str:
    """Numbers for tables: NaN/None are 'undefined', never a silent 0."""
    if value is None:
        return "—"
    try:
        if isinstance(value, float) and math.isnan(value):
            return "undefined"
    except TypeError:
        pass
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence], caption: str | None = None) -> None:
    t = Table(title=title, caption=caption, show_lines=False, header_style="bold")
    for col in columns:
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(*[fmt(v) for v in row])
    _out.print(t)


class StageTimes:
    """Wall time of each stage of one run, in the order the stages first ran; a stage entered again adds up.

    >>> times = StageTimes()
    >>> with times.stage("extract"):
    ...     ...
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def show(self, caption: str | None = None) -> None:
        total = self.total
        share = lambda s: f"{100 * s / total:.0f} %" if total > 0 else "—"  # noqa: E731
        rows = [(name, f"{s:.1f}", share(s)) for name, s in self.seconds.items()]
        table("stage times", ["stage", "seconds", "share"], [*rows, ("total", f"{total:.1f}", share(total))], caption)
