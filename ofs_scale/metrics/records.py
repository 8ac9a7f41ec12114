"""Reading metrics.jsonl records (light: no plotting or torch imports)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def load_records(path: Path) -> list[dict[str, Any]]:
    """The JSON records of a metrics.jsonl file (none if it is missing); unreadable lines (a torn
    write) are skipped."""
    records: list[dict[str, Any]] = []
    if not Path(path).is_file():
        return records
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    return records


def finite_number(value: Any) -> float | None:
    """A finite float from a record value (non-finite values are stored as strings)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None
