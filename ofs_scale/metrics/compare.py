"""Several runs in one figure: training loss, validation loss, residual-stream kurtosis (max and
mean over sites) and max MMR against step, one colour per run and one legend beside the panels.

Used by `ofs-scale plot RUN1 RUN2 ...` and by the sweep report (`ofs-scale report`).
`compare_figure` builds the figure (tests read its line data back), `write_comparison` saves it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ofs_scale.metrics.plot_style import (
    LOSS_LOG_SPAN,
    NONFINITE_LABEL,
    colours,
    draw_curve,
    has_nonfinite,
    integer_steps,
    log_axis,
    save,
)
from ofs_scale.metrics.records import (
    Curve,
    curve_from,
    finite_number,
    is_residual_site,
    load_records,
    nonfinite_number,
    record_curve,
)

Records = list[dict[str, Any]]
Line = tuple[Callable[[Records], Curve], str, str]  # (curve of a run, style, label suffix)


def mmr_max(records: Records) -> Curve:
    """Per metric step, the largest MMR over the residual-stream sites (non-finite if any is)."""
    by_step: dict[int, Any] = {}
    for rec in records:
        values = [v for k, v in rec.items() if k.startswith("of/mmr/") and is_residual_site(k[7:])]
        if not values:
            continue
        finite = [x for x in map(finite_number, values) if x is not None]
        bad = any(nonfinite_number(v) for v in values)
        by_step[int(rec["step"])] = "nan" if bad or not finite else max(finite)
    return curve_from(by_step)


def _key(key: str) -> Callable[[Records], Curve]:
    return lambda records: record_curve(records, key)


KURTOSIS_LABEL = "kurtosis of neuron RMS (1 = no outliers)"
# name: (title, y label, log scale (else log only past LOSS_LOG_SPAN), lines)
PANELS: dict[str, tuple[str, str, bool, list[Line]]] = {
    "loss": ("training loss", "loss (nats/token)", False, [(_key("loss"), "-", "")]),
    "val_loss": ("validation loss", "loss (nats/token)", False, [(_key("val_loss"), "o-", "")]),
    "kurtosis": (
        "residual kurtosis: max (solid), mean (dashed)",
        KURTOSIS_LABEL,
        True,
        [(_key("of/kurtosis_max"), ".-", ""), (_key("of/kurtosis_mean"), ".--", " mean")],
    ),
    "kurtosis_max": (
        "kurtosis, max over residual sites",
        KURTOSIS_LABEL,
        True,
        [(_key("of/kurtosis_max"), ".-", "")],
    ),
    "kurtosis_mean": (
        "kurtosis, mean over residual sites",
        KURTOSIS_LABEL,
        True,
        [(_key("of/kurtosis_mean"), ".-", "")],
    ),
    "mmr": (
        "MMR, max over residual sites",
        "max / median |activation|",
        True,
        [(mmr_max, ".-", "")],
    ),
}
RUN_PANELS = ("loss", "val_loss", "kurtosis", "mmr")


def run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """The shortest path tails that tell the runs apart (`a/smoke`, `b/smoke`)."""
    parts = [Path(d).resolve().parts for d in run_dirs]
    for n in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-n:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(d) for d in run_dirs]  # the same directory twice


def compare_figure(runs: Sequence[tuple[str, Records]], panels: Sequence[str]) -> Figure | None:
    """One panel per name in `panels` (keys of PANELS), one colour per (label, records) run;
    None when no run has data for any panel."""
    unknown = [p for p in panels if p not in PANELS]
    if unknown:
        raise ValueError(f"unknown comparison panel(s) {unknown}; choose from {list(PANELS)}")
    curves = [
        [
            [(fn(records), style, label + suffix) for fn, style, suffix in PANELS[p][3]]
            for p in panels
        ]
        for label, records in runs
    ]
    if all(c.empty for run in curves for lines in run for c, _, _ in lines):
        return None
    ncols = 2 if len(panels) == 4 else len(panels)
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4 * nrows), squeeze=False)
    run_colours = colours(len(runs), ordered=False)
    for i, (ax, name) in enumerate(zip(axes.flat, panels, strict=False)):
        title, ylabel, log, _ = PANELS[name]
        for run, colour in zip(curves, run_colours, strict=True):
            for c, style, label in run[i]:
                draw_curve(ax, c, colour, label, style)
        values = [v for run in curves for c, _, _ in run[i] for v in c.values]
        log_axis(ax, values, 1.0 if log else LOSS_LOG_SPAN)
        integer_steps(ax)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=c, label=label) for (label, _), c in zip(runs, run_colours)]
    if any(has_nonfinite(ax) for ax in axes.flat):
        handles.append(
            Line2D([], [], marker="x", ls="", color="black", mew=2, label=NONFINITE_LABEL)
        )
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.97), fontsize="small")
    return fig


def write_comparison(
    run_dirs: Sequence[Path],
    out: Path,
    panels: Sequence[str] = RUN_PANELS,
    labels: Sequence[str] | None = None,
) -> Path | None:
    """Draw `panels` for the runs in `run_dirs` (labelled by `labels`, default the shortest
    distinct path tails) into the PNG `out`; None when there is nothing to draw."""
    missing = [str(d) for d in run_dirs if not (Path(d) / "metrics.jsonl").is_file()]
    if missing:
        raise FileNotFoundError(
            f"no metrics.jsonl in {', '.join(missing)}; pass run.out_dir folders of runs that "
            "have logged steps"
        )
    labels = list(labels) if labels is not None else run_labels(run_dirs)
    runs = [(lab, load_records(Path(d) / "metrics.jsonl")) for lab, d in zip(labels, run_dirs)]
    fig = compare_figure(runs, panels)
    if fig is None:
        return None
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return save(fig, Path(out))
