"""The console every command prints to (rich), and the two-column summary table."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

# soft_wrap: long lines (paths) are not cut by the console width when output goes to a log file.
console = Console(stderr=False, soft_wrap=True)


def print_summary(rows: dict[str, Any], title: str = "run summary") -> None:
    """A two-column table of the run's headline numbers."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in rows.items():
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    console.print(table)
