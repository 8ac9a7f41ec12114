"""Run plots and the multi-run comparison, read back from the figures' line data: `final` not
drawn over the last block, NaN/inf marked, integer steps, labelled log ticks, legends outside the
panels, flat-zero instruments left out, and `ofs-scale plot RUN RUN ...`."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pytest

from ofs_scale.analysis.plot_cli import main as plot_main
from ofs_scale.metrics.compare import compare_figure, run_labels
from ofs_scale.metrics.plot_style import NONFINITE_GID, NONFINITE_LABEL
from ofs_scale.metrics.plots import run_figures, write_plots
from ofs_scale.metrics.records import load_records


def _records(scale: float = 1.0, diverge_at: int | None = None) -> list[dict]:
    """Records as JsonlLogger writes them: train records every step, OF metrics on even steps,
    one eval record; non-finite values are the strings "nan" / "inf"."""
    recs = []
    for step in range(1, 7):
        bad = diverge_at is not None and step >= diverge_at
        rec = {"step": step, "stage": "main", "loss": "inf" if bad else scale * 5.0 / step}
        rec.update({"lr": 1e-3, "grad_norm": 1.0, "tokens": 256 * step, "tokens_per_s": 1e3})
        if step % 2 == 0:
            k = {"embed": 1.2, "block_00": 1.5 * step, "block_01": 2.0 * step, "mlp_00": 3.0}
            if bad:
                k["block_00"] = "nan"
            k["final"] = k["block_01"]
            for site, v in k.items():
                rec[f"of/kurtosis/{site}"] = v
                rec[f"of/mmr/{site}"] = 50.0 if site == "mlp_00" else scale * 4.0
            rec["of/kurtosis_max"] = scale * 2.0 * step
            rec["of/kurtosis_mean"] = scale * 1.1 * step
        recs.append(rec)
    recs.append({"step": 6, "val_loss": scale * 4.0, "val_ppl": 54.6})
    return recs


def _write(run_dir, recs) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def _lines(ax) -> dict[str, plt.Line2D]:
    """Drawn lines by label (legend-only entries have no data)."""
    return {
        ln.get_label(): ln
        for ln in ax.lines
        if ln.get_gid() != NONFINITE_GID and len(ln.get_xdata())
    }


def _marks(ax) -> list[list[float]]:
    return [list(ln.get_xdata()) for ln in ax.lines if ln.get_gid() == NONFINITE_GID]


def _legend_clear_of_data(fig, ax, legend) -> bool:
    renderer = fig.canvas.get_renderer()
    return not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))


def test_run_figures_read_back():
    figs = run_figures(_records(diverge_at=6))
    try:
        resid, mlp = figs["kurtosis.png"].axes
        lines = _lines(resid)
        # `final` equals block_01 by definition: not drawn over it, said in the legend
        assert list(lines) == ["embed", "block_00", "block_01"]
        legend = [t.get_text() for t in resid.get_legend().get_texts()]
        assert "final = block_01 (same tensor)" in legend and NONFINITE_LABEL in legend
        assert list(lines["block_01"].get_ydata()) == [4.0, 8.0, 12.0]
        # block_00 turned NaN at step 6: its line stops at 4, an x marks step 6 at the top edge
        assert list(lines["block_00"].get_xdata()) == [2, 4] and _marks(resid) == [[6]]
        assert list(_lines(mlp)["mlp_00"].get_ydata()) == [3.0, 3.0, 3.0]
        for line in [*resid.lines, *mlp.lines]:
            r, g, b, _ = plt.matplotlib.colors.to_rgba(line.get_color())
            assert not (r > 0.8 and g > 0.8 and b < 0.4)  # no yellow on white
        figs["kurtosis.png"].canvas.draw()
        assert all(float(t).is_integer() for t in resid.get_xticks())
        lo, hi = resid.get_ylim()
        shown = [t for t in resid.get_yticks() if lo <= t <= hi]
        assert len(shown) >= 4, shown  # 1.2 .. 12 on a log axis: more than two labels
        assert _legend_clear_of_data(figs["kurtosis.png"], resid, resid.get_legend())
        loss_ax = figs["loss.png"].axes[0]
        assert list(_lines(loss_ax)["train loss"].get_xdata()) == [1, 2, 3, 4, 5]
        assert _marks(loss_ax) == [[6]] and list(_lines(loss_ax)["val loss"].get_ydata()) == [4.0]
        assert loss_ax.get_yscale() == "linear"
    finally:
        plt.close("all")
    recs = _records()
    for rec in recs:
        if "of/kurtosis/final" in rec:
            rec["of/kurtosis/final"] += 1.0  # not the last block's values: drawn
    figs = run_figures(recs)
    assert "final" in _lines(figs["kurtosis.png"].axes[0])
    plt.close("all")


def test_flat_zero_instruments_not_drawn(tmp_path):
    recs = _records()
    for rec in recs[:6]:
        rec["collapse/dead_frac/mlp_00"] = 0.0
        rec["collapse/gamma_small_frac/final_norm"] = 0.0
    _write(tmp_path, recs)
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots/instruments.png").write_bytes(b"stale")
    notes: list[str] = []
    paths = write_plots(tmp_path, notes=notes)
    assert [p.name for p in paths] == ["kurtosis.png", "mmr.png", "loss.png"]
    assert not (tmp_path / "plots/instruments.png").exists()
    assert notes and "instruments.png not drawn: every instrument logged only zeros" in notes[0]
    recs[5]["bln/aux_loss"] = -3.0
    _write(tmp_path, recs)
    assert [p.name for p in write_plots(tmp_path)][-1] == "instruments.png"


def test_compare_runs(tmp_path, capsys):
    a, b = tmp_path / "a/smoke", tmp_path / "b/smoke"
    _write(a, _records())
    _write(b, _records(scale=2.0, diverge_at=5))
    assert run_labels([a, b]) == ["a/smoke", "b/smoke"]
    runs = [(lab, load_records(d / "metrics.jsonl")) for lab, d in zip(("A", "B"), (a, b))]
    fig = compare_figure(runs, ("loss", "val_loss", "kurtosis", "mmr"))
    try:
        loss, val, kurt, mmr = fig.axes[:4]
        assert list(_lines(loss)["A"].get_ydata()) == pytest.approx([5.0 / s for s in range(1, 7)])
        assert list(_lines(loss)["B"].get_xdata()) == [1, 2, 3, 4] and _marks(loss) == [[5, 6]]
        assert list(_lines(val)["B"].get_ydata()) == [8.0]
        k = _lines(kurt)
        assert list(k["B"].get_ydata()) == [8.0, 16.0, 24.0]
        assert list(k["A mean"].get_ydata()) == pytest.approx([2.2, 4.4, 6.6])
        assert k["A mean"].get_linestyle() == "--" and k["A"].get_color() != k["B"].get_color()
        assert list(_lines(mmr)["B"].get_ydata()) == [8.0, 8.0, 8.0]  # residual sites only
        legend = fig.legends[0]
        assert [t.get_text() for t in legend.get_texts()] == ["A", "B", NONFINITE_LABEL]
        fig.canvas.draw()
        assert all(_legend_clear_of_data(fig, ax, legend) for ax in fig.axes)
    finally:
        plt.close("all")
    out = tmp_path / "cmp.png"
    assert plot_main([str(a), str(b), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and str(out) in capsys.readouterr().out
    assert plot_main([str(a), "--compare", "--out", str(tmp_path / "one.png")]) == 0
    assert plot_main([str(a), str(tmp_path / "nowhere")]) == 2
    assert "no metrics.jsonl in" in capsys.readouterr().err
    assert plot_main([str(a), str(b), "--out", str(tmp_path)]) == 2
    assert "must name a .png file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown comparison panel"):
        compare_figure(runs, ("loss", "ppl"))
    # a run whose loss ran away to 1e5 turns the loss axis log (one label per decade)
    runs[1][1][3]["loss"] = 1e5
    fig = compare_figure(runs, ("loss",))
    fig.canvas.draw()
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    assert ax.get_yscale() == "log" and len([t for t in ax.get_yticks() if lo <= t <= hi]) >= 4
    plt.close("all")
