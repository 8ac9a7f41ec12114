"""Axis styling shared by the run, comparison and sweep figures.

Readable colours (no yellow on white), integer step ticks, log axes with enough labelled ticks,
NaN/inf points marked at the top edge of the panel instead of silently ending the line, and
legends placed outside the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import (
    FixedLocator,
    FuncFormatter,
    LogLocator,
    MaxNLocator,
    NullFormatter,
    NullLocator,
)

from ofs_scale.metrics.records import Curve

# tab10 without its olive and grey, which read poorly on white
_DISTINCT = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
NONFINITE_GID = "nonfinite"
LOSS_LOG_SPAN = 100.0  # a loss axis turns log past this span: a diverged run flattens the others
NONFINITE_LABEL = "x at top edge: NaN/inf"


def colours(n: int, ordered: bool) -> list[Any]:
    """`n` line colours: for ordered lines (layers by depth) viridis from dark purple to green,
    stopping before its yellow end; otherwise distinct hues while they last."""
    if not ordered and n <= len(_DISTINCT):
        return _DISTINCT[:n]
    cmap = plt.get_cmap("viridis")
    return [cmap(0.8 * i / max(1, n - 1)) for i in range(n)]


def integer_steps(ax) -> None:
    """Step axis ticks at whole steps only."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def log_axis(ax, values: list[float], min_span: float = 1.0) -> None:
    """Log y axis with plain labels (1.5, 2, 10, not 1.5x10^0) and enough of them: five ticks
    spread evenly (in log) over a range narrower than 20x, 1-2-5 ticks per decade up to 1000x,
    one per decade beyond.
    Left linear when the values are not all positive or span less than `min_span` times (a
    loss axis turns log only when a diverged run would flatten the others)."""
    positive = [v for v in values if v > 0]
    if not positive or len(positive) < len(values) or max(positive) < min_span * min(positive):
        return
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(NullFormatter())
    lo, hi = min(positive), max(positive)
    if hi / lo < 20:
        # five ticks evenly spaced in log between the extremes, at two significant digits
        ticks = sorted({float(f"{lo * (hi / lo) ** (i / 4):.2g}") for i in range(5)})
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_ylim(min(ticks[0], lo) / 1.08, max(ticks[-1], hi) * 1.08)
    else:  # 1-2-5 per decade over up to three decades, one tick per decade beyond
        subs = (1.0, 2.0, 5.0) if hi / lo <= 1e3 else (1.0,)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs, numticks=15))


def draw_curve(ax, c: Curve, colour: Any, label: str, style: str = ".-") -> None:
    """The finite points as a line; NaN/inf points as x markers at the top edge of the panel
    (x in steps, y in axes coordinates), in the line's colour, tagged `NONFINITE_GID`."""
    if c.steps:
        ax.plot(c.steps, c.values, style, color=colour, label=label, markersize=4)
    if c.bad_steps:
        ax.plot(
            c.bad_steps,
            [1.0] * len(c.bad_steps),
            "x",
            color=colour,
            markersize=8,
            mew=2,
            transform=ax.get_xaxis_transform(),
            clip_on=False,
            gid=NONFINITE_GID,
            label="_nonfinite" if c.steps else label,
        )


def nonfinite_handle(ax) -> None:
    """A legend-only entry explaining the x markers (called once per legend that needs it)."""
    ax.plot([], [], "x", color="black", mew=2, label=NONFINITE_LABEL)


def has_nonfinite(ax) -> bool:
    """Whether any NaN/inf marker was drawn on `ax`."""
    return any(line.get_gid() == NONFINITE_GID for line in ax.lines)


def legend_outside(ax, **kwargs: Any) -> None:
    """The axes' legend to the right of the panel, never over the data."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    ncol = 2 if len(handles) > 12 else 1
    ax.legend(
        handles,
        labels,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        borderaxespad=0.0,
        fontsize="x-small",
        ncol=ncol,
        **kwargs,
    )


def save(fig: Figure, path: Path) -> Path:
    """Lay out, write the PNG (cropped to what is drawn, outside legends included) and close."""
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
