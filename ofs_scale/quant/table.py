"""Quantisation results as a rich table, markdown and JSON, with the run's final OF summary."""

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


def kurtosis_summary(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last metric record's kurtosis and MMR over the residual stream, or None when the
    run logged no outlier metrics (metrics.every=0)."""
    last = None
    for rec in records:
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


def output_stem(spec: QuantSpec) -> str:
    """File stem of the results: `quant` for the study's protocol, tagged otherwise."""
    if spec == DEFAULT_SPEC:
        return "quant"
    head = "" if spec.head else "-fphead"
    group = "" if spec.group_size == DEFAULT_SPEC.group_size else f"-g{spec.group_size}"
    return f"quant-w{spec.weights}-a{spec.acts}-{spec.scope}{head}{group}"


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
    k = result.get("kurtosis")
    if k:
        mmr = f", MMR max {_fmt(k['mmr_max'], 2)}" if k.get("mmr_max") is not None else ""
        lines += [
            "",
            f"Final OF metrics (step {k['step']}): kurtosis max {_fmt(k['kurtosis_max'], 2)}, "
            f"mean {_fmt(k['kurtosis_mean'], 2)}{mmr}.",
        ]
    return "\n".join(lines) + "\n"


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
    k = result.get("kurtosis")
    if k:
        console.print(
            f"final kurtosis (step {k['step']}): max {_fmt(k['kurtosis_max'], 2)}, "
            f"mean {_fmt(k['kurtosis_mean'], 2)}"
        )
    else:
        console.print("no outlier metrics in metrics.jsonl (train with metrics.every > 0)")


def write_outputs(result: dict[str, Any], out_dir: Path, spec: QuantSpec) -> tuple[Path, Path]:
    """Write `<stem>.json` and `<stem>.md` into `out_dir`; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(spec)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown(result))
    return json_path, md_path
