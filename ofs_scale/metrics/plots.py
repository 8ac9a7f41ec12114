"""PNG plots of a run's metrics.jsonl: kurtosis per layer (log scale), MMR, signal propagation
and attention entropy, the loss curve (with the CMD reconstruction's validation loss), and the
training-dynamics instruments (collapse, batchless aux loss, CMD error) when a run logs them.
Used at the end of training and by `ofs-scale plot RUN_DIR`.

`run_figures` builds the figures (tests read their line data back), `write_plots` saves them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from ofs_scale.metrics.plot_style import (
    LOSS_LOG_SPAN,
    colours,
    draw_curve,
    has_nonfinite,
    integer_steps,
    legend_outside,
    log_axis,
    nonfinite_handle,
    save,
)
from ofs_scale.metrics.records import (
    Curve,
    is_residual_site,
    load_records,
    record_curve,
    site_curves,
)

Series = dict[str, Curve]
# (data, title, ylabel, log scale, legend note or None)
Panel = tuple[Series, str, str, bool, str | None]


def _same(a: Curve, b: Curve) -> bool:
    return (
        a.steps == b.steps
        and a.bad_steps == b.bad_steps
        and all(math.isclose(x, y, rel_tol=1e-6) for x, y in zip(a.values, b.values, strict=True))
    )


def without_final_copy(data: Series) -> tuple[Series, str | None]:
    """`final` (the input of the final norm) is the last block's output by definition: drawn on
    top of it, it hid that block. Drop it where it equals a block's line and say which."""
    final = data.get("final")
    if final is None:
        return data, None
    for site, c in data.items():
        if site.startswith("block_") and _same(c, final):
            kept = {k: v for k, v in data.items() if k != "final"}
            return kept, f"final = {site} (same tensor)"
    return data, None


def _panel(ax, data: Series, title: str, ylabel: str, log: bool, note: str | None) -> None:
    for (site, c), colour in zip(data.items(), colours(len(data), ordered=True), strict=True):
        draw_curve(ax, c, colour, site)
    if note:
        ax.plot([], [], " ", label=note)
    if has_nonfinite(ax):
        nonfinite_handle(ax)
    if log:
        log_axis(ax, [v for c in data.values() for v in c.values])
    integer_steps(ax)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    legend_outside(ax)


def _figure(panels: list[Panel]) -> Figure | None:
    """One row of panels, those with data; None when none has."""
    panels = [p for p in panels if p[0]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        _panel(ax, *panel)
    return fig


def _resid_panel(data: Series, title: str, ylabel: str, log: bool) -> Panel:
    kept, note = without_final_copy({k: v for k, v in data.items() if is_residual_site(k)})
    return kept, title, ylabel, log, note


def _per_site(records: list[dict[str, Any]], prefix: str, ylabel: str) -> Figure | None:
    data = site_curves(records, prefix)
    other = {k: v for k, v in data.items() if not is_residual_site(k)}
    return _figure(
        [
            _resid_panel(data, f"{ylabel}: residual stream", ylabel, True),
            (other, f"{ylabel}: MLP hidden", ylabel, True, None),
        ]
    )


def _sigprop(records: list[dict[str, Any]]) -> Figure | None:
    cos = site_curves(records, "sigprop/cos")
    return _figure(
        [
            _resid_panel(cos, "signal propagation: mean cosine between tokens", "cosine", False),
            (
                site_curves(records, "attn/entropy"),
                "attention entropy (heads averaged)",
                "nats",
                False,
                None,
            ),
        ]
    )


def _flat_zero(data: Series) -> bool:
    return all(not c.bad_steps and all(v == 0 for v in c.values) for c in data.values())


def _instruments(records: list[dict[str, Any]], notes: list[str]) -> Figure | None:
    panels: list[Panel] = [
        (site_curves(records, "collapse/dead_frac"), "dead MLP units", "fraction", False, None),
        (
            site_curves(records, "collapse/gamma_small_frac"),
            "norm gains near 0",
            "fraction",
            False,
            None,
        ),
        (site_curves(records, "bln"), "batchless norm auxiliary loss", "loss", False, None),
        (
            site_curves(records, "cmd"),
            "CMD reconstruction of the weights",
            "relative error",
            True,
            None,
        ),
    ]
    logged = [p for p in panels if p[0]]
    if logged and all(_flat_zero(p[0]) for p in logged):
        names = ", ".join(p[1] for p in logged)
        notes.append(f"instruments.png not drawn: every instrument logged only zeros ({names})")
        return None
    return _figure(panels)


def _loss(records: list[dict[str, Any]]) -> Figure | None:
    curves = [record_curve(records, k) for k in ("loss", "val_loss", "val_loss_cmd")]
    if curves[0].empty and curves[1].empty:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    labels = ["train loss", "val loss", "val loss, CMD-reconstructed weights"]
    for c, label, style, colour in zip(
        curves, labels, ("-", "o-", "s--"), colours(3, ordered=False), strict=True
    ):
        if not c.empty:
            draw_curve(ax, c, colour, label, style)
    if has_nonfinite(ax):
        nonfinite_handle(ax)
    log_axis(ax, [v for c in curves for v in c.values], LOSS_LOG_SPAN)
    integer_steps(ax)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("loss")
    ax.grid(True, alpha=0.3)
    legend_outside(ax)
    return fig


def run_figures(records: list[dict[str, Any]], notes: list[str] | None = None) -> dict[str, Figure]:
    """{file name: figure} of every plot that has data; why a figure was left out is appended
    to `notes`. The caller saves or closes the figures."""
    notes = notes if notes is not None else []
    figures = {
        "kurtosis.png": _per_site(records, "of/kurtosis", "kurtosis"),
        "mmr.png": _per_site(records, "of/mmr", "MMR"),
        "sigprop.png": _sigprop(records),
        "loss.png": _loss(records),
        "instruments.png": _instruments(records, notes),
    }
    return {name: fig for name, fig in figures.items() if fig is not None}


def write_plots(
    run_dir: Path, out_dir: Path | None = None, notes: list[str] | None = None
) -> list[Path]:
    """Write kurtosis.png, mmr.png, sigprop.png, loss.png and instruments.png for the run in
    `run_dir` (those with data) into `out_dir` (default `<run_dir>/plots`); return their paths.
    Why a plot was not drawn is appended to `notes`; a stale copy of it is removed."""
    run_dir = Path(run_dir)
    jsonl = run_dir / "metrics.jsonl"
    if not jsonl.is_file():
        raise FileNotFoundError(
            f"{jsonl} does not exist; pass the run.out_dir of a run that has logged steps"
        )
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = run_figures(load_records(jsonl), notes)
    if "instruments.png" not in figures:
        (out_dir / "instruments.png").unlink(missing_ok=True)
    return [save(fig, out_dir / name) for name, fig in figures.items()]
