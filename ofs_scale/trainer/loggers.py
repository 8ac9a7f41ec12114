"""Loggers as callbacks: metrics.jsonl, wandb, a rich progress bar and the summary table."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ofs_scale.checkpoint import write_atomic
from ofs_scale.config import ConfigError, to_dict
from ofs_scale.console import console, fmt_value
from ofs_scale.trainer.callbacks import Callback, TrainerView
from ofs_scale.trainer.wandb_auth import missing_wandb_login, wandb_run_name


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class JsonlLogger(Callback):
    """Appends one JSON object per logged step (and per evaluation) to metrics.jsonl; on resume
    the records past the resumed step are dropped by an atomic replace of the file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_train_start(self, trainer: TrainerView) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and trainer.step:
            # Drop records past the resumed step: they belong to work that is being redone.
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("step", 0) <= trainer.step:
                    keep.append(line)
            # A new file renamed over the old one: a kill or a full disk here leaves the whole
            # old history, never a truncated one.
            write_atomic(self.path, "".join(k + "\n" for k in keep))
        elif self.path.exists():
            self.path.unlink()

    def _write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def post_step(self, trainer: TrainerView, step: int, record: dict[str, Any]) -> None:
        every = trainer.cfg.logging.every
        if step % every == 0 or trainer.is_stage_end(step) or record.get("skipped"):
            self._write(record)

    def on_eval(self, trainer: TrainerView, step: int, record: dict[str, Any]) -> None:
        self._write(record)


class WandbLogger(Callback):
    """wandb, offline by default (files under <out_dir>/wandb); named, grouped and tagged by the
    `logging` section (see trainer/wandb_auth.py for the default name)."""

    def __init__(self, mode: str, project: str) -> None:
        self.mode = mode
        self.project = project
        self.run = None

    def on_train_start(self, trainer: TrainerView) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        if (problem := missing_wandb_login(self.mode)) is not None:
            raise ConfigError(problem)
        import wandb

        cfg = trainer.cfg
        out = Path(cfg.run.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            mode=self.mode,
            project=self.project,
            entity=cfg.logging.entity or None,
            group=cfg.logging.group or None,
            tags=list(cfg.logging.tags) or None,
            name=cfg.logging.wandb_name or wandb_run_name(cfg.run.name, cfg.run.out_dir),
            dir=str(out),
            config=to_dict(trainer.cfg),
            resume="allow",
            id=_wandb_id(out),
        )

    def post_step(self, trainer: TrainerView, step: int, record: dict[str, Any]) -> None:
        if step % trainer.cfg.logging.every == 0:
            self.run.log({k: v for k, v in record.items() if isinstance(v, int | float)}, step=step)

    def on_eval(self, trainer: TrainerView, step: int, record: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in record.items() if k.startswith("val")}, step=step)

    def on_train_end(self, trainer: TrainerView) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _wandb_id(out: Path) -> str:
    """One wandb run id per output directory, so a resumed run continues the same wandb run."""
    f = out / "wandb_id"
    if not f.exists():
        import secrets

        f.write_text(secrets.token_hex(4))
    return f.read_text().strip()


class ProgressLogger(Callback):
    """A progress bar with loss, tokens/s and ETA on a terminal; periodic lines otherwise."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.task = None
        self.total = 0

    def on_train_start(self, trainer: TrainerView) -> None:
        self.total = trainer.cfg.total_steps
        self.print_every = max(1, self.total // 20)
        if console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  {task.fields[tps]}"),
                TimeRemainingColumn(),
                console=console,
            )
            self.progress.start()
            self.task = self.progress.add_task(
                "train", total=self.total, completed=trainer.step, loss="-", tps="-"
            )

    def post_step(self, trainer: TrainerView, step: int, record: dict[str, Any]) -> None:
        loss, tps = record["loss"], record["tokens_per_s"]
        if self.progress is not None:
            self.progress.update(
                self.task,
                completed=step,
                description=f"train [{record['stage']}]",
                loss=f"{loss:.4f} gnorm {record['grad_norm']:.3g}",
                tps=f"{tps:,.0f} tok/s  MFU {record['mfu']:.1%}",
            )
        elif step % self.print_every == 0 or step == self.total:
            console.print(step_line(record, self.total), markup=False, highlight=False)

    def on_eval(self, trainer: TrainerView, step: int, record: dict[str, Any]) -> None:
        loss, ppl = fmt_value(record["val_loss"]), fmt_value(record["val_ppl"], ".2f", 1e6)
        msg = f"step {step}: val_loss {loss} val_ppl {ppl}"
        if self.progress is not None:
            self.progress.console.print(msg)
        else:
            console.print(msg)

    def on_train_end(self, trainer: TrainerView) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def step_line(record: dict[str, Any], total: int) -> str:
    """A step's console line: loss, gradient norm, lr, throughput and MFU."""
    return (
        f"step {record['step']}/{total} [{record['stage']}] loss {record['loss']:.4f} "
        f"grad_norm {record['grad_norm']:.3g} lr {record['lr']:.2e} "
        f"{record['tokens_per_s']:,.0f} tok/s {record['model_tflops_per_s']:.3g} TFLOP/s "
        f"MFU {record['mfu']:.1%}"
    )
