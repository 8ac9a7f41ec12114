"""One table and one kurtosis figure for every point of a sweep.

ofs-scale report SWEEP_DIR [--quant-missing]

Reads `sweep.json` (written by `ofs-scale launch submit --sweep`), or, without it, every
subdirectory that has a metrics.jsonl. Per point: final training loss, validation perplexity,
final max/mean residual-stream kurtosis and max MMR, and the int8 W8A8 perplexity and its
increase from the point's quant.json (`--quant-missing` runs the evaluation where it is absent).
Writes report.md, report.json and kurtosis.png into the sweep directory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ofs_scale.console import console
from ofs_scale.metrics.records import load_records
from ofs_scale.quant.hook import quant_command
from ofs_scale.quant.table import kurtosis_summary

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
# extra quant.json rows shown as their perplexity increase (absent in older results: "-")
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
    quant = run_dir / "quant.json"
    results = json.loads(quant.read_text())["results"] if quant.is_file() else {}
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


def kurtosis_figure(points: list[dict[str, Any]], path: Path) -> Path | None:
    """Max and mean residual kurtosis against step, one line per point; None without data."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    drawn = False
    for point in points:
        records = load_records(point["out_dir"] / "metrics.jsonl")
        for ax, key in zip(axes, ("of/kurtosis_max", "of/kurtosis_mean")):
            pts = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), float)]
            if pts:
                ax.plot(*zip(*pts), label=point["name"])
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for ax, title in zip(axes, ("max over residual sites", "mean over residual sites")):
        ax.set_title(f"kurtosis, {title}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_missing_quant(points: list[dict[str, Any]]) -> None:
    """Run the int8 evaluation for every point that has checkpoints but no quant.json."""
    for p in points:
        run_dir = p["out_dir"]
        if (run_dir / "quant.json").is_file() or not (run_dir / "checkpoints").is_dir():
            continue
        console.print(f"[quant] evaluating {run_dir}", markup=False)
        subprocess.run(quant_command(run_dir), check=False)


def report(sweep_dir: Path, quant_missing: bool = False) -> list[dict[str, Any]]:
    """Build the rows, print the table and write report.md, report.json and kurtosis.png."""
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
    fig = kurtosis_figure(points, sweep_dir / "kurtosis.png")
    console.print(f"wrote {sweep_dir / 'report.md'}, report.json" + (f", {fig}" if fig else ""))
    if any(r["w8a8_ppl"] is None for r in rows):
        console.print("some points have no quant.json yet: rerun with --quant-missing")
    return rows


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input)."""
    parser = argparse.ArgumentParser(
        prog="ofs-scale report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
