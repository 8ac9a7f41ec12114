"""Reading metrics.jsonl records (light: no plotting or torch imports)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
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


def nonfinite_number(value: Any) -> bool:
    """True for a NaN or infinite record value (stored as the strings "nan", "inf", "-inf")."""
    try:
        return not math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


@dataclass
class Curve:
    """One plotted line: the finite (step, value) points and the steps whose value was NaN or
    infinite (drawn as markers, so a diverged run does not just end its line)."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    bad_steps: list[int] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """No point at all, finite or not."""
        return not self.steps and not self.bad_steps


def curve_from(by_step: dict[int, Any]) -> Curve:
    """The Curve of {step: record value} in step order; values that are not numbers are dropped."""
    out = Curve()
    for step in sorted(by_step):
        x = finite_number(by_step[step])
        if x is not None:
            out.steps.append(step)
            out.values.append(x)
        elif nonfinite_number(by_step[step]):
            out.bad_steps.append(step)
    return out


def record_curve(records: list[dict[str, Any]], key: str) -> Curve:
    """The Curve of a top-level key; a step logged twice (a resumed run redoing work) keeps its
    last value."""
    return curve_from({int(r["step"]): r[key] for r in records if key in r})


def site_curves(records: list[dict[str, Any]], prefix: str) -> dict[str, Curve]:
    """{site: Curve} for every key `prefix/<site>`, sites in first-seen order."""
    by_site: dict[str, dict[int, Any]] = {}
    for rec in records:
        for key, value in rec.items():
            if key.startswith(prefix + "/"):
                by_site.setdefault(key[len(prefix) + 1 :], {})[int(rec["step"])] = value
    return {site: curve_from(d) for site, d in by_site.items()}


def is_residual_site(site: str) -> bool:
    """Residual-stream metric sites: the embedding output, every block's output, `final`."""
    return site in ("embed", "final") or site.startswith("block_")
