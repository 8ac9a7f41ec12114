"""lm-evaluation-harness on an ofs_scale run: export it, wrap it in lm-eval's HFLM, evaluate.

The run (or one checkpoint, any layout) is exported to a Hugging Face directory first
(`ofs_scale.export`), so the harness sees exactly the model `ofs-scale export` ships, with the
run's own tokenizer; a directory that already holds a Hugging Face model is evaluated as it is.
lm-eval, transformers and accelerate are imported inside the functions (the `eval` extra).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any


def is_hf_dir(path: str | Path) -> bool:
    """Whether `path` is a Hugging Face model directory (it has a config.json)."""
    return (Path(path) / "config.json").is_file()


def run_harness(
    hf_dir: str | Path,
    tasks: list[str],
    include_path: str | Path | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    device: str = "cpu",
) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` on the model in `hf_dir`; returns its result dictionary
    (`results` per task, `configs`, `versions`, ...), without the per-sample logs."""
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(
        pretrained=str(hf_dir),
        trust_remote_code=True,
        dtype=torch.float32 if device == "cpu" else "auto",
        batch_size=batch_size,
        device=device,
    )
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=0,
    )
    if out is None:  # a non-zero rank under lm-eval's own distributed mode
        return {}
    return {k: v for k, v in out.items() if k != "samples"}


def results_path(out_dir: Path, label: str, tasks: list[str]) -> Path:
    """`<out_dir>/lm_eval/<label>-<tasks>.json` with a file-system-safe name."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{label}-{'+'.join(tasks)}")[:150]
    return out_dir / "lm_eval" / f"{stem}.json"


def evaluate(
    path: str | Path,
    tasks: list[str],
    out_dir: str | Path | None = None,
    config: str | Path | None = None,
    overrides: list[str] = (),
    **harness: Any,
) -> tuple[dict[str, Any], Path]:
    """Evaluate a run directory, a checkpoint or a Hugging Face directory on `tasks`; write the
    results beside the run (or into `out_dir`) and return them with the file written."""
    if is_hf_dir(path):
        result = run_harness(path, tasks, **harness)
        label, default_out = Path(path).name, Path(path)
    else:
        from ofs_scale.export.__main__ import export_run

        with tempfile.TemporaryDirectory(prefix="ofs-eval-") as tmp:
            info = export_run(path, tmp, config, list(overrides))
            result = run_harness(tmp, tasks, **harness)
        ckpt = Path(info["checkpoint"])
        result["ofs_scale"] = {"checkpoint": str(ckpt), "step": info["step"]}
        label = ckpt.name
        # the run directory: <run>/checkpoints/<ckpt>, or the path given
        default_out = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else Path(path)
    target = results_path(Path(out_dir) if out_dir else default_out, label, tasks)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result, target


def summary_rows(result: dict[str, Any]) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) for every numeric metric of every task."""
    rows = []
    for task, metrics in sorted(result.get("results", {}).items()):
        for key, value in sorted(metrics.items()):
            if not isinstance(value, int | float) or "_stderr" in key or "," not in key:
                continue
            name = key.split(",")[0]
            err = metrics.get(key.replace(",", "_stderr,", 1))
            rows.append((task, name, float(value), err if isinstance(err, int | float) else None))
    return rows
