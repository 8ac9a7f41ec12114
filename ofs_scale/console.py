"""The console every command prints to (rich), and the two-column summary table."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table

# soft_wrap: long lines (paths) are not cut by the console width when output goes to a log file.
console = Console(stderr=False, soft_wrap=True)


def print_summary(rows: dict[str, Any], title: str = "run summary") -> None:
    """A two-column table of the run's headline numbers."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right", overflow="fold")  # paths wrap, never cut
    for k, v in rows.items():
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    console.print(table)


def fmt_value(x: float, spec: str = ".4f", above: float | None = None) -> str:
    """A number for a console line: `nan` / `inf` as such, `>1e6` style past `above` (a
    perplexity is meaningless there), scientific past 1e6 (a diverged loss printed with `.4f`
    must not become a 20-digit number), `spec` otherwise."""
    if not math.isfinite(x):
        return str(x)
    if above is not None and x > above:
        mantissa, exponent = f"{above:.0e}".split("e")
        return f">{mantissa}e{int(exponent)}"
    return f"{x:.3e}" if abs(x) >= 1e6 else format(x, spec)
