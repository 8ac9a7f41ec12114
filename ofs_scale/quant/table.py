"""Quantisation results as a rich table, markdown and JSON, named after the evaluated checkpoint
and shown with what metrics.jsonl logged for that checkpoint's step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ofs_scale.metrics.records import finite_number
from ofs_scale.quant.spec import QuantSpec

DEFAULT_SPEC = QuantSpec()


def is_residual_site(site: str) -> bool:
    """Residual-stream sites of the metrics (the ones the kurtosis summary is taken over)."""
    return site in ("embed", "final") or site.startswith("block_")


def kurtosis_summary(
    records: list[dict[str, Any]], upto: int | None = None
) -> dict[str, Any] | None:
    """Kurtosis and MMR over the residual stream of the last metric record (at or before step
    `upto` when given: a checkpoint's own step), or None when there is none (metrics.every=0).
    Records are read in file order, so after a resume the resumed trajectory's record wins."""
    last = None
    for rec in records:
        if upto is not None and rec["step"] > upto:
            continue
        if finite_number(rec.get("of/kurtosis_max")) is not None:
            last = rec
    if last is None:
        return None
    per_site = {
        k.split("/", 2)[2]: v
        for k, v in last.items()
        if k.startswith("of/kurtosis/") and finite_number(v) is not None
    }
    mmr = [
        float(v)
        for k, v in last.items()
        if k.startswith("of/mmr/") and is_residual_site(k[7:]) and finite_number(v) is not None
    ]
    return {
        "step": int(last["step"]),
        "kurtosis_max": float(last["of/kurtosis_max"]),
        "kurtosis_mean": float(last["of/kurtosis_mean"]),
        "mmr_max": max(mmr) if mmr else None,
        "kurtosis": per_site,
    }


def losses_at(records: list[dict[str, Any]], step: int) -> dict[str, Any]:
    """Training and validation loss logged at `step` (the last of each in file order); empty
    when that step logged none."""
    found: dict[str, Any] = {}
    for rec in records:
        if rec["step"] == step:
            found.update({k: rec[k] for k in ("loss", "val_loss", "val_ppl") if k in rec})
    return found


def output_stem(spec: QuantSpec, checkpoint: str) -> str:
    """File stem of the results of `checkpoint` (its directory name): `quant_<checkpoint>` for
    the study's protocol, `quant-<options>_<checkpoint>` otherwise."""
    if spec == DEFAULT_SPEC:
        return f"quant_{checkpoint}"
    head = "" if spec.head else "-fphead"
    group = "" if spec.group_size == DEFAULT_SPEC.group_size else f"-g{spec.group_size}"
    return f"quant-w{spec.weights}-a{spec.acts}-{spec.scope}{head}{group}_{checkpoint}"


def result_at_step(run_dir: Path, step: int | None) -> dict[str, Any] | None:
    """The study-protocol result of `run_dir` for its checkpoint at `step` (`quant_*.json`, or
    an older version's `quant.json`), or None: a result of another checkpoint is never taken
    for this one."""
    for path in [*sorted(Path(run_dir).glob("quant_*.json")), Path(run_dir) / "quant.json"]:
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if step is not None and isinstance(result, dict) and result.get("step") == step:
            return result
    return None


def _title(result: dict[str, Any]) -> str:
    s = result["spec"]
    head = "" if s["head"] else ", fp head"
    group = s.get("group_size", DEFAULT_SPEC.group_size)
    return (
        f"fake quantisation (weights per {s['weights']}, activations {s['acts']}, "
        f"scope {s['scope']}{head}, W4 group {group or 'none'}) "
        f"of {result['checkpoint']} at step {result['step']}"
    )


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}" if abs(x) >= 1000 else f"{x:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    """The results as a markdown section."""
    lines = [
        f"**{_title(result)}**",
        "",
        "| setting | val loss | val ppl | ppl increase |",
        "|---|---|---|---|",
    ]
    for name, r in result["results"].items():
        inc = "" if name == "fp" else f"{r['increase_pct']:+.2f}%"
        lines.append(f"| {name} | {r['val_loss']:.4f} | {_fmt(r['val_ppl'], 2)} | {inc} |")
    lines += ["", *(line + "." for line in metric_lines(result))]
    return "\n".join(lines) + "\n"


def metric_lines(result: dict[str, Any]) -> list[str]:
    """What metrics.jsonl logged for the evaluated checkpoint: its step's losses, and the OF
    metrics of the last metric step at or before it."""
    step, lines = result["step"], []
    losses = result.get("losses") or {}
    if losses:
        parts = [
            f"{k.replace('_', ' ')} {v if (x := finite_number(v)) is None else _fmt(x, 4)}"
            for k, v in losses.items()
        ]
        lines.append(f"Logged at the checkpoint's step {step}: " + ", ".join(parts))
    k = result.get("kurtosis")
    if k:
        mmr = f", MMR max {_fmt(k['mmr_max'], 2)}" if k.get("mmr_max") is not None else ""
        at = f"step {k['step']}" + ("" if k["step"] == step else f", before checkpoint {step}")
        lines.append(
            f"OF metrics ({at}): kurtosis max {_fmt(k['kurtosis_max'], 2)}, "
            f"mean {_fmt(k['kurtosis_mean'], 2)}{mmr}"
        )
    else:
        lines.append(f"No outlier metrics logged up to step {step} (metrics.every=0?)")
    return lines


def print_table(result: dict[str, Any], console: Console | None = None) -> None:
    """The results as a rich table on the terminal."""
    console = console or Console()
    console.print(_title(result))  # on its own line: as a table title it wraps to table width
    table = Table()
    for col in ("setting", "val loss", "val ppl", "ppl increase"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    for name, r in result["results"].items():
        inc = "" if name == "fp" else f"{r['increase_pct']:+.2f}%"
        table.add_row(name, f"{r['val_loss']:.4f}", _fmt(r["val_ppl"], 2), inc)
    console.print(table)
    for line in metric_lines(result):
        console.print(line, markup=False, highlight=False)


def write_outputs(result: dict[str, Any], out_dir: Path, spec: QuantSpec) -> tuple[Path, Path]:
    """Write `<stem>.json` and `<stem>.md` into `out_dir`, named after the evaluated
    checkpoint (see `output_stem`); returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(spec, Path(result["checkpoint"]).name)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown(result))
    return json_path, md_path
