"""`status` and `tail`: job states, checkpoints and the latest metrics of a run or a sweep.

Imports no torch, submitit or config schema: both answer in well under a second. On a terminal
`status` draws a table; piped, it prints tab-separated rows with names in full. `tail` formats
metrics.jsonl records as one readable line each (`--json`: the records as written).
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ofs_scale.launch.files import LAUNCH_FILE, SWEEP_FILE, LaunchError, read_index

console = Console()


def _run(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        return ""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def job_state(job_id: str, cluster: str, folder: Path | None = None) -> str:
    """State of a job: SLURM's (squeue, then sacct), or for local jobs what its result says."""
    if cluster == "slurm":
        state = _run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"])
        if not state:
            state = _run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id])
        return state.splitlines()[0] if state else "UNKNOWN (left the queue)"
    result = folder / f"{job_id}_0_result.pkl" if folder else None
    if result is None or not result.is_file():
        return "RUNNING or LOST (no result yet)"
    with result.open("rb") as f:
        tag, _ = pickle.load(f)
    return "COMPLETED" if tag == "success" else "FAILED"


def checkpoints(run_dir: Path) -> list[tuple[str, int]]:
    """Complete checkpoints of a run as (name, step), oldest first."""
    root = run_dir / "checkpoints"
    found = []
    for p in sorted(root.glob("*/ofs_meta.json")) if root.is_dir() else []:
        try:
            found.append((p.parent.name, int(json.loads(p.read_text())["step"])))
        except (ValueError, KeyError, json.JSONDecodeError):
            continue
    return sorted(found, key=lambda x: x[1])


def last_records(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(last training record, last evaluation record) of metrics.jsonl; empty when absent."""
    train: dict[str, Any] = {}
    evals: dict[str, Any] = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "val_loss" in rec:
            evals = rec
        elif "loss" in rec:
            train = rec
    return train, evals


def run_rows(run_dir: Path) -> list[dict[str, str]]:
    """One row per job of the newest submission of a run."""
    launch = run_dir / LAUNCH_FILE
    subs = json.loads(launch.read_text())["submissions"] if launch.is_file() else []
    train, evals = last_records(run_dir)
    ckpts = checkpoints(run_dir)
    common = {
        "step": str(train.get("step", "-")),
        "loss": f"{train['loss']:.4f}" if "loss" in train else "-",
        "val_loss": f"{evals['val_loss']:.4f}" if "val_loss" in evals else "-",
        "checkpoint": f"{ckpts[-1][0]} (step {ckpts[-1][1]})" if ckpts else "-",
    }
    if not subs:
        return [{"run": str(run_dir), "job": "-", "stage": "-", "state": "-", **common}]
    sub = subs[-1]
    folder = Path(sub["sweep"]) / "submitit" if sub.get("sweep") else run_dir / "submitit"
    rows = []
    for job in sub["jobs"]:
        state = job_state(job["job_id"], sub["cluster"], folder)
        rows.append(
            {
                "run": run_dir.name,
                "job": job["job_id"],
                "stage": job["stage"] or "all",
                "state": state,
                **common,
            }
        )
    return rows


def status(path: str | Path) -> list[dict[str, str]]:
    """Rows for a run directory, or for every point of a sweep directory."""
    path = Path(path)
    if not path.is_dir():
        raise LaunchError(f"{path} is not a directory; pass a run.out_dir or a sweep dir")
    if (path / SWEEP_FILE).is_file():
        rows = []
        for point in read_index(path)["points"]:
            rows.extend(run_rows(Path(point["out_dir"])))
        return rows
    return run_rows(path)


def print_status(path: str | Path) -> None:
    """Print `status(path)`: a table on a terminal, tab-separated lines with names in full when
    piped; then every checkpoint of a single run."""
    rows = status(path)
    if console.is_terminal:
        table = Table(title=f"status of {path}")
        for col in rows[0]:
            table.add_column(col)
        for row in rows:
            table.add_row(*row.values())
        console.print(table)
    else:
        for values in [list(rows[0]), *(list(row.values()) for row in rows)]:
            print("\t".join(values))  # not rich: it would expand the tabs
    if not (Path(path) / SWEEP_FILE).is_file():
        for name, step in checkpoints(Path(path)):
            console.print(f"  checkpoint {name:<16} step {step}")


# How `tail` shows a record's headline keys (in this order); the rest are counted.
_HEADLINE = {
    "loss": "loss {:.4f}",
    "val_loss": "val_loss {:.4f}",
    "val_ppl": "val_ppl {:.4g}",
    "grad_norm": "grad_norm {:.3g}",
    "lr": "lr {:.2e}",
    "tokens_per_s": "{:,.0f} tok/s",
    "mfu": "MFU {:.1%}",
}


def format_record(rec: dict[str, Any]) -> str:
    """One metrics.jsonl record as a readable line: step, stage, headline numbers, and how many
    other metrics (OF metrics, instruments) it holds."""
    parts = [f"step {rec.get('step', '?')}"]
    if "stage" in rec:
        parts.append(f"[{rec['stage']}]")
    for key, fmt in _HEADLINE.items():
        if key in rec:
            value = rec[key]
            parts.append(fmt.format(value) if isinstance(value, int | float) else f"{key} {value}")
    if rec.get("skipped"):
        parts.append("SKIPPED (non-finite)")
    kurt = [v for k, v in rec.items() if k.startswith("of/kurtosis/") and isinstance(v, float)]
    if kurt:
        parts.append(f"max kurtosis {max(kurt):.3g}")
    shown = {"step", "stage", "skipped", "tokens", "step_time_s", "model_tflops_per_s", *_HEADLINE}
    others = [k for k in rec if k not in shown]
    if others:
        parts.append(f"(+{len(others)} metrics)")
    return " ".join(parts)


def _format_line(line: str, raw: bool) -> str:
    if raw:
        return line
    try:
        return format_record(json.loads(line))
    except (json.JSONDecodeError, AttributeError):
        return line


def newest_log(run_dir: Path) -> Path | None:
    """The most recently written submitit log of a run (or of its sweep)."""
    logs = list((run_dir / "submitit").glob("*_log.out")) if (run_dir / "submitit").is_dir() else []
    return max(logs, key=lambda p: p.stat().st_mtime) if logs else None


def tail(
    run_dir: str | Path,
    lines: int = 10,
    follow: bool = False,
    every_s: float = 5.0,
    raw: bool = False,
) -> None:
    """Print the last `lines` metrics records (formatted; `raw`: as written) and job log lines;
    with `follow`, keep polling."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LaunchError(f"{run_dir} is not a directory; pass a run.out_dir")
    seen = 0
    while True:
        path = run_dir / "metrics.jsonl"
        records = path.read_text().splitlines() if path.is_file() else []
        start = seen if follow and seen else max(0, len(records) - lines)
        for line in records[start:]:
            console.print(_format_line(line, raw), markup=False, highlight=False)
        seen = len(records)
        if not follow:
            log = newest_log(run_dir)
            if log is not None:
                console.print(f"--- {log}")
                for line in log.read_text(errors="replace").splitlines()[-lines:]:
                    console.print(line, markup=False, highlight=False)
            return
        time.sleep(every_s)
