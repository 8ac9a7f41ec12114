"""The sweep report: rows gathered from sweep.json, metrics.jsonl and the quantisation result of
each point's last checkpoint; the figure."""

from __future__ import annotations

import json

import pytest

from ofs_scale.analysis.report import (
    ReportError,
    find_points,
    main,
    point_label,
    point_row,
    report,
)


def _write_point(run_dir, kurt, loss, with_quant=True):
    run_dir.mkdir(parents=True)
    records = []
    for step in (10, 20):
        records.append({"step": step, "loss": loss + 1.0 / step, "lr": 1e-3})
        records.append(
            {
                "step": step,
                "loss": loss + 1.0 / step,
                "of/kurtosis/block_00": kurt * step / 20,
                "of/kurtosis/block_01": 1.0,
                "of/kurtosis_max": kurt * step / 20,
                "of/kurtosis_mean": (kurt * step / 20 + 1.0) / 2,
                "of/mmr/block_00": 7.0,
                "of/mmr/mlp_00": 99.0,  # not a residual site: not in the MMR summary
            }
        )
    records.append({"step": 20, "val_loss": 2.0, "val_ppl": 7.389})
    lines = [json.dumps(r) for r in records] + ['{"step": 21, "loss": 1.0']  # a torn last line
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    # a result of an earlier checkpoint is never shown as the run's
    early = {"step": 10, "results": {"W8A8": {"val_ppl": 99.0, "increase_pct": 1.0}}}
    (run_dir / "quant_step_000010.json").write_text(json.dumps(early))
    if with_quant:
        quant = {"step": 20, "results": {"W8A8": {"val_ppl": 9.0, "increase_pct": 21.8}}}
        (run_dir / "quant_stage_main.json").write_text(json.dumps(quant))


def test_report_gathers_every_point(tmp_path):
    sweep = tmp_path / "sweep"
    _write_point(sweep / "000_a", kurt=8.0, loss=2.0)
    _write_point(sweep / "001_b", kurt=2.0, loss=1.5, with_quant=False)
    index = {
        "points": [
            {"name": "000_a", "params": {"model.block": "pre"}, "out_dir": str(sweep / "000_a")},
            {"name": "001_b", "params": {"model.block": "op"}, "out_dir": str(sweep / "001_b")},
        ]
    }
    (sweep / "sweep.json").write_text(json.dumps(index))
    rows = report(sweep)
    a, b = rows
    assert a["steps"] == 20 and a["final_loss"] == pytest.approx(2.05)
    assert a["val_ppl"] == pytest.approx(7.389)
    assert a["kurtosis_max"] == pytest.approx(8.0) and a["kurtosis_mean"] == pytest.approx(4.5)
    assert a["mmr_max"] == pytest.approx(7.0)
    assert a["w8a8_ppl"] == 9.0 and a["w8a8_increase_pct"] == 21.8
    assert b["kurtosis_max"] == pytest.approx(2.0) and b["w8a8_ppl"] is None
    md = (sweep / "report.md").read_text()
    assert "| 000_a | 20 | 2.050 | 7.389 | 8.000 | 4.500 | 7.000 | 9.000 | +21.80% |" in md
    assert "| 001_b |" in md and md.count("\n") == 4
    assert json.loads((sweep / "report.json").read_text())[0]["params"] == {"model.block": "pre"}
    assert (sweep / "kurtosis.png").stat().st_size > 1000
    assert (sweep / "loss.png").stat().st_size > 1000  # training and validation loss per point
    params = {"model.block": "op", "optim.name": "soap", "optim.lr": 1e-3}
    assert point_label({"name": "000_a", "params": params}) == "block=op, optim=soap, lr=0.001"
    assert point_label({"name": "run1", "params": {}}) == "run1"


def test_report_without_index_and_bad_input(tmp_path):
    sweep = tmp_path / "loose"
    _write_point(sweep / "run1", kurt=3.0, loss=1.0)
    (sweep / "notes").mkdir()
    points = find_points(sweep)
    assert [p["name"] for p in points] == ["run1"]
    assert point_row(points[0])["kurtosis_max"] == pytest.approx(3.0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match=r"no sweep\.json"):
        find_points(empty)
    assert main([str(tmp_path / "missing")]) == 2
