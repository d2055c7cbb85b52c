"""How stages talk to the user: one-line status messages, rich tables, tqdm progress bars.

Messages go to stderr so stdout stays clean for tables people pipe or paste.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Iterable, Sequence

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


def progress(total: int, desc: str, unit: str = "it", initial: int = 0) -> tqdm:
    """A progress bar with a rate; silent when stderr is not a terminal and RSVC_PROGRESS is unset."""
    disable = None if os.environ.get("RSVC_PROGRESS", "") not in ("0", "false") else True
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True,
                file=sys.stderr, disable=disable, unit_scale=True, leave=False)


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
