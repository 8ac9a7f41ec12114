"""The Trainer callback that measures outlier features every `metrics.every` steps.

On a metric step `pre_step` hooks the sites of this rank's model chunks, the step's forward
passes fill them (only the rows of the `metrics.sequences` measured sequences of the global
batch, `measured_rows`, so the values do not depend on the layout), and `post_step` reduces
them over the whole mesh and adds `of/...`, `sigprop/...` and `attn/...` keys to the step's
record, which the JSONL and wandb loggers then write. On every other step, and during evaluation,
no hook is registered at all.
At the end of the run the logging rank prints the per-layer table and writes the plots.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from ofs_scale.config import ConfigError
from ofs_scale.console import console
from ofs_scale.metrics.collect import MLP, RESID, Collector, Site, select_sites
from ofs_scale.metrics.measured import measured_rows
from ofs_scale.trainer.callbacks import Callback, TrainerView


def step_rows(trainer: TrainerView):
    """This rank's measured rows per micro batch of a metric step (see `measured_rows`)."""
    t, m = trainer.cfg.train, trainer.mesh
    return measured_rows(
        t.global_batch, t.micro_batch, m.dp, m.dp_rank, trainer.cfg.metrics.sequences
    )


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


class MetricsCallback(Callback):
    """Outlier-feature metrics on metric steps; per-layer table, summary rows and plots."""

    def __init__(self, plots: bool = True) -> None:
        self.plots = plots
        self.sites: list[Site] = []
        self.collector: Collector | None = None
        self.last: dict[str, float] = {}
        self.last_step = 0
        self.plot_paths: list[Path] = []

    def is_metric_step(self, trainer: TrainerView, step: int) -> bool:
        """Whether optimizer step `step` (1-based) is measured."""
        every = trainer.cfg.metrics.every
        return every > 0 and step % every == 0

    def on_train_start(self, trainer: TrainerView) -> None:
        cfg = trainer.cfg
        if cfg.metrics.every < 0:
            raise ConfigError(f"metrics.every={cfg.metrics.every} must be >= 0 (0 turns it off)")
        if cfg.data.seq_len < 2:
            raise ConfigError("metrics need data.seq_len >= 2 (cosine between tokens)")
        try:
            self.sites = select_sites(cfg.metrics.sites, cfg.model.n_layers)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if not self.sites:
            raise ConfigError("metrics.sites selects no site; use [all] or name some sites")
        log_every = cfg.logging.every
        if cfg.metrics.every and cfg.metrics.every % log_every:
            trainer.log(
                f"warning: metrics.every={cfg.metrics.every} is not a multiple "
                f"of logging.every={log_every}: some metric steps will not reach metrics.jsonl"
            )

    def pre_step(self, trainer: TrainerView, step: int) -> None:
        if not self.is_metric_step(trainer, step):
            return
        self.collector = Collector(self.sites, trainer.mesh, step_rows(trainer))
        self.collector.attach(trainer.engine.chunks)

    def post_step(self, trainer: TrainerView, step: int, record: dict[str, Any]) -> None:
        if self.collector is None:
            return
        try:
            values = self.collector.reduce(len(step_rows(trainer)))
        finally:
            self.collector.detach()
            self.collector = None
        record.update(values)
        self.last, self.last_step = values, step

    def on_train_end(self, trainer: TrainerView) -> None:
        if self.collector is not None:  # the run stopped inside a metric step
            self.collector.detach()
            self.collector = None
        if not trainer.mesh.is_logging_rank or not self.last:
            return
        console.print(self.table())
        if self.plots and (trainer.out_dir / "metrics.jsonl").is_file():
            from ofs_scale.metrics.plots import write_plots

            notes: list[str] = []
            self.plot_paths = write_plots(trainer.out_dir, notes=notes)
            for note in notes:
                console.print(note, markup=False)
            if self.plot_paths:
                # soft_wrap: a long path stays on one line, so it can be copied
                console.print(f"metric plots in {self.plot_paths[0].parent}:", soft_wrap=True)
                for p in self.plot_paths:
                    console.print(f"  {p}", soft_wrap=True, highlight=False)

    def _layers(self) -> list[tuple[str, str | None]]:
        """Table rows in depth order: (residual site name, block index `NN` or None)."""
        names = {s.name for s in self.sites}
        blocks = sorted({s.name.split("_")[1] for s in self.sites if "_" in s.name})
        rows: list[tuple[str, str | None]] = [("embed", None)] if "embed" in names else []
        rows += [(f"block_{i}", i) for i in blocks]
        return rows + ([("final", None)] if "final" in names else [])

    def table(self) -> Table:
        """The per-layer metrics of the last metric step (max|x| and rms are in metrics.jsonl)."""
        v = self.last
        table = Table(title=f"outlier features, step {self.last_step}", box=box.SIMPLE_HEAD)
        for c in ("site", "kurt", "kurt c1", "MMR", "cos", "MLP kurt", "MLP MMR", "attn H"):
            table.add_column(c, justify="left" if c == "site" else "right", no_wrap=True)
        for site, idx in self._layers():
            keys = ("of/kurtosis", "of/kurtosis_c1", "of/mmr", "sigprop/cos")
            cells = [v.get(f"{k}/{site}") for k in keys]
            if idx is not None:
                cells += [v.get(f"of/kurtosis/mlp_{idx}"), v.get(f"of/mmr/mlp_{idx}")]
                cells.append(v.get(f"attn/entropy/attn_{idx}"))
            table.add_row(site, *[_fmt(c) for c in cells])
        return table

    def summary(self, trainer: TrainerView) -> dict[str, Any]:
        if not self.last:
            return {}
        v = self.last
        rows: dict[str, Any] = {"OF metrics step": self.last_step}
        if "of/kurtosis_max" in v:
            rows["kurtosis max / mean (residual)"] = (
                f"{_fmt(v['of/kurtosis_max'])} / {_fmt(v['of/kurtosis_mean'])}"
            )
        for s in self.sites:
            keys = ("of/kurtosis", "of/mmr", "sigprop/cos") if s.kind == RESID else ()
            if s.kind == MLP:
                keys = ("of/kurtosis", "of/mmr")
            if keys:
                label = "kurt / MMR / cos" if s.kind == RESID else "kurt / MMR"
                rows[f"{label} {s.name}"] = " / ".join(_fmt(v.get(f"{k}/{s.name}")) for k in keys)
        if self.plot_paths:
            rows["metric plots"] = str(self.plot_paths[0].parent)
        return rows
