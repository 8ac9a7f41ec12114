"""One table and one kurtosis figure for every point of a sweep.

ofs-scale report SWEEP_DIR [--quant-missing]

Reads `sweep.json` (written by `ofs-scale launch submit --sweep`), or, without it, every
subdirectory that has a metrics.jsonl. Per point: final training loss, validation perplexity,
final max/mean residual-stream kurtosis and max MMR, and the int8 W8A8 perplexity and its
increase from the point's quant_<checkpoint>.json of its last step (`--quant-missing` runs the
evaluation where it is absent; a result of an earlier checkpoint is not shown).
Writes report.md, report.json, kurtosis.png (max and mean residual kurtosis) and loss.png
(training and validation loss) into the sweep directory; figure lines are labelled by the swept
values (`block=op, lr=0.001`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ofs_scale.cli_args import command_parser
from ofs_scale.console import console
from ofs_scale.metrics.records import load_records
from ofs_scale.quant.hook import quant_command
from ofs_scale.quant.table import kurtosis_summary, result_at_step

COLUMNS = [
    ("point", "point"),
    ("steps", "steps"),
    ("final loss", "final_loss"),
    ("val ppl", "val_ppl"),
    ("kurt max", "kurtosis_max"),
    ("kurt mean", "kurtosis_mean"),
    ("MMR max", "mmr_max"),
    ("W8A8 ppl", "w8a8_ppl"),
    ("W8A8 increase", "w8a8_increase_pct"),
    ("E4M3 increase", "fp8_e4m3_increase_pct"),
    ("W4 increase", "w4_increase_pct"),
]
# extra result rows shown as their perplexity increase (absent in older results: "-")
EXTRA_ROWS = {"fp8_e4m3_increase_pct": "FP8-E4M3", "w4_increase_pct": "W4"}


class ReportError(ValueError):
    """The sweep directory cannot be reported on; the message says why and what to do."""


def find_points(sweep_dir: Path) -> list[dict[str, Any]]:
    """[{name, params, out_dir}] from sweep.json, or from subdirectories with metrics.jsonl."""
    index = sweep_dir / "sweep.json"
    if index.is_file():
        points = json.loads(index.read_text())["points"]
        return [
            {"name": p["name"], "params": p.get("params", {}), "out_dir": Path(p["out_dir"])}
            for p in points
        ]
    runs = sorted(d for d in sweep_dir.iterdir() if (d / "metrics.jsonl").is_file())
    if not runs:
        raise ReportError(
            f"{sweep_dir} has no sweep.json and no run directories with metrics.jsonl; pass the "
            "directory that `ofs-scale launch submit --sweep` created"
        )
    return [{"name": d.name, "params": {}, "out_dir": d} for d in runs]


def last_step(records: list[dict[str, Any]]) -> int | None:
    """The last step a run logged (its final checkpoint's step once it has finished)."""
    return max((r["step"] for r in records), default=None)


def point_row(point: dict[str, Any]) -> dict[str, Any]:
    """The table row of one point (None where a value is not available yet)."""
    run_dir = point["out_dir"]
    records = load_records(run_dir / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_ppl" in r]
    row: dict[str, Any] = {
        "point": point["name"],
        "params": point["params"],
        "steps": train[-1]["step"] if train else 0,
        "final_loss": train[-1]["loss"] if train else None,
        "val_ppl": evals[-1]["val_ppl"] if evals else None,
    }
    k = kurtosis_summary(records) or {}
    row.update({key: k.get(key) for key in ("kurtosis_max", "kurtosis_mean", "mmr_max")})
    # the quantisation result of the run's last checkpoint only: never another step's
    results = (result_at_step(run_dir, last_step(records)) or {}).get("results", {})
    w8a8 = results.get("W8A8", {})
    row["w8a8_ppl"], row["w8a8_increase_pct"] = w8a8.get("val_ppl"), w8a8.get("increase_pct")
    for key, name in EXTRA_ROWS.items():
        row[key] = results.get(name, {}).get("increase_pct")
    return row


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.endswith("_increase_pct"):
        return f"{value:+.2f}%"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) >= 100 else f"{value:.3f}"
    return str(value)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = ["| " + " | ".join(c for c, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(k, row[k]) for _, k in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def point_label(point: dict[str, Any]) -> str:
    """A figure label naming what the point sweeps (`block=op, optim=soap, lr=0.001`), not its
    directory; the directory name when the sweep has no parameters."""
    params = point.get("params") or {}
    if not params:
        return str(point["name"])
    parts = []
    for key, value in params.items():
        section, _, field = key.rpartition(".")
        # `optim.name=soap` reads as `optim=soap`; other keys by their field name
        parts.append(f"{section if field == 'name' and section else field}={value}")
    return ", ".join(parts)


def sweep_figures(points: list[dict[str, Any]], sweep_dir: Path) -> list[Path]:
    """kurtosis.png (max and mean residual kurtosis) and loss.png (training and validation loss)
    against step, one line per point that has started; those with data."""
    from ofs_scale.metrics.compare import write_comparison  # matplotlib: only when drawing

    points = [p for p in points if (p["out_dir"] / "metrics.jsonl").is_file()]
    labels = [point_label(p) for p in points]
    if len(set(labels)) < len(labels):  # parameters that do not tell points apart
        labels = [f"{p['name']}: {lab}" for p, lab in zip(points, labels, strict=True)]
    dirs = [p["out_dir"] for p in points]
    figures = [
        ("kurtosis.png", ("kurtosis_max", "kurtosis_mean")),
        ("loss.png", ("loss", "val_loss")),
    ]
    written = [write_comparison(dirs, sweep_dir / name, panels, labels) for name, panels in figures]
    return [p for p in written if p is not None]


def run_missing_quant(points: list[dict[str, Any]]) -> None:
    """Run the int8 evaluation for every point that has checkpoints but no result for its
    last step."""
    for p in points:
        run_dir = p["out_dir"]
        if not (run_dir / "checkpoints").is_dir():
            continue
        if result_at_step(run_dir, last_step(load_records(run_dir / "metrics.jsonl"))) is not None:
            continue
        console.print(f"[quant] evaluating {run_dir}", markup=False)
        subprocess.run(quant_command(run_dir), check=False)


def report(sweep_dir: Path, quant_missing: bool = False) -> list[dict[str, Any]]:
    """Build the rows, print the table and write report.md, report.json and the figures."""
    if not sweep_dir.is_dir():
        raise ReportError(f"{sweep_dir} is not a directory; pass a sweep directory")
    points = find_points(sweep_dir)
    if quant_missing:
        run_missing_quant(points)
    rows = [point_row(p) for p in points]
    table = Table(title=f"sweep {sweep_dir}", title_justify="left")
    for col, _ in COLUMNS:
        table.add_column(col, justify="left" if col == "point" else "right")
    for row in rows:
        table.add_row(*(_cell(k, row[k]) for _, k in COLUMNS))
    # Wide enough for the point names even when stdout is not a terminal (a log file).
    Console(width=max(console.width, 150)).print(table)
    (sweep_dir / "report.md").write_text(markdown(rows))
    (sweep_dir / "report.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    figs = "".join(f", {f.name}" for f in sweep_figures(points, sweep_dir))
    console.print(f"wrote {sweep_dir / 'report.md'}, report.json{figs}")
    if any(r["w8a8_ppl"] is None for r in rows):
        console.print(
            "some points have no quantisation result for their last step: rerun with "
            "--quant-missing"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input)."""
    parser = command_parser("report", __doc__)
    parser.add_argument("sweep_dir", help="the sweep directory (with sweep.json)")
    parser.add_argument(
        "--quant-missing", action="store_true", help="run int8 evaluation where it is missing"
    )
    args = parser.parse_args(argv)
    try:
        report(Path(args.sweep_dir), args.quant_missing)
    except ReportError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
