"""Load a trained model from a run or checkpoint directory and measure its int8 perplexities.

The model is rebuilt from the run's `config.yaml` under the layout of the processes at hand
(DCP reshards the checkpoint), validation loss is measured on the same windows that training
evaluation uses, and static activation ranges are calibrated on the run's first training batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ofs_scale.checkpoint import (
    CheckpointManager,
    checkpoint_fingerprint,
    read_meta,
    training_state,
    weights_fingerprint,
)
from ofs_scale.config import Config, ConfigError, check_world, load_config
from ofs_scale.data import BatchSampler, BlendedWindows, collate, eval_micro_batches, open_data
from ofs_scale.engine.local import LocalEngine
from ofs_scale.parallel.mesh import Mesh, init_mesh
from ofs_scale.quant.sim import calibrate, fake_quantized
from ofs_scale.quant.spec import QuantSpec

# row -> (quantise weights, quantise activations, weight format, activation format)
Setting = tuple[bool, bool, str, str]
SETTINGS: dict[str, Setting] = {
    "fp": (False, False, "int8", "int8"),
    "W8": (True, False, "int8", "int8"),
    "A8": (False, True, "int8", "int8"),
    "W8A8": (True, True, "int8", "int8"),
    "FP8-E4M3": (True, True, "e4m3", "e4m3"),
    "FP8-E5M2": (True, True, "e5m2", "e5m2"),
    "W4": (True, False, "int4", "int8"),
}


@dataclass
class RunPaths:
    """A checkpoint, the run directory it belongs to (if known) and the config to rebuild it."""

    checkpoint: Path | None
    run_dir: Path | None
    config: Path | None


def resolve(path: str | Path, config: str | Path | None = None) -> RunPaths:
    """Accept a run directory (newest checkpoint is used) or one checkpoint directory."""
    p = Path(path)
    if (p / ".metadata").is_file():
        ckpt: Path | None = p
        run_dir = p.parent.parent if p.parent.name == "checkpoints" else None
    elif (p / "checkpoints").is_dir() or (p / "config.yaml").is_file():
        ckpt, run_dir = None, p
    else:
        raise ConfigError(
            f"{p} is neither a run directory (with checkpoints/) nor a checkpoint directory "
            "(with .metadata); pass runs/<name> or runs/<name>/checkpoints/<checkpoint>"
        )
    if config is None and run_dir is not None and (run_dir / "config.yaml").is_file():
        config = run_dir / "config.yaml"
    if config is None:
        raise ConfigError(
            f"no config.yaml found for {p} (runs written before it was saved have none); "
            "pass --config with the training YAML and the same overrides used for training"
        )
    return RunPaths(ckpt, run_dir, Path(config))


class _NoOptimizer:
    """Model-only loading: DCP reads just the `model/...` keys (a partial load)."""

    def named_state(self) -> dict[str, Any]:
        return {}


@dataclass
class LoadedRun:
    """Model engine, data and layout of a run rebuilt for evaluation."""

    cfg: Config
    mesh: Mesh
    engine: LocalEngine
    train_split: BlendedWindows
    val_split: BlendedWindows
    checkpoint: Path
    step: int
    paths: RunPaths
    extra: dict[str, Any] = field(default_factory=dict)


def load_run(
    paths: RunPaths, overrides: list[str] = (), tp: int = 1, device: str = "cpu"
) -> LoadedRun:
    """Rebuild the model of `paths` with tensor parallelism `tp` (data parallel over the rest of
    the processes; pipeline parallelism off) and load its checkpoint weights into it. The model
    runs in a `LocalEngine` whichever engine trained it (DeepSpeed checkpoints carry fp32
    weights in their DCP part)."""
    cfg = load_config(paths.config, [*overrides, f"parallel.tp={tp}", "parallel.pp=1"])
    cfg.parallel.virtual_stages = 1
    cfg.train.device = device
    mesh = init_mesh(tp, 1, cfg.parallel.backend, device, cfg.parallel.timeout_min)
    check_world(cfg, mesh.world_size)
    torch.manual_seed(cfg.run.seed)
    data = open_data(cfg.data, mesh.rank, cfg.run.seed, progress=False)
    train_split, val_split = data.train, data.val
    engine = LocalEngine(cfg, mesh, data.vocab_size)
    state = training_state(engine.state_module, _NoOptimizer(), {}, mesh)
    state.pop("extra")
    run_dir = paths.run_dir or Path(cfg.run.out_dir)
    root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
    # Only what the weights depend on must match (not the optimizer or the TP size of SOAP).
    fingerprint = weights_fingerprint(checkpoint_fingerprint(cfg))
    manager = CheckpointManager(
        root, mesh, fingerprint=fingerprint, resume_from="latest", move_later=False
    )
    if paths.checkpoint is not None:
        manager.load(paths.checkpoint, state)
        ckpt = paths.checkpoint
    else:
        found = manager.load_latest(state, log=print)
        if found is None:
            raise ConfigError(
                f"no usable checkpoint under {root}; train the run first or pass a "
                "checkpoint directory"
            )
        ckpt = found
    step = int(read_meta(ckpt).get("step", -1))
    # the data (its datasets name the tokenizer: `ofs-scale export` ships it)
    return LoadedRun(cfg, mesh, engine, train_split, val_split, ckpt, step, paths, {"data": data})


def val_loss(run: LoadedRun, eval_batches: int) -> float:
    """Mean validation loss over the training run's evaluation windows (all DP ranks)."""
    cfg, m = run.cfg, run.mesh
    ids = eval_micro_batches(
        run.val_split.num_samples,
        eval_batches,
        cfg.train.global_batch,
        cfg.train.micro_batch,
        m.dp_rank,
        m.dp,
    )
    run.engine.train(False)
    return float(run.engine.evaluate([collate(run.val_split, i) for i in ids]))


def calibration_batches(run: LoadedRun, num_batches: int) -> list[tuple[torch.Tensor, ...]]:
    """This rank's micro batches of the run's first `num_batches` global training batches."""
    cfg, m = run.cfg, run.mesh
    t = cfg.train
    sampler = BatchSampler(t.global_batch, t.micro_batch, m.dp_rank, m.dp, run.train_split.key)
    ids = [mb for step in range(num_batches) for mb in sampler.rank_micro_batches(step)]
    return [collate(run.train_split, i) for i in ids]


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def quant_eval(
    run: LoadedRun,
    spec: QuantSpec,
    calib_batches: int = 16,
    eval_batches: int | None = None,
    settings: dict[str, Setting] | None = None,
) -> dict[str, Any]:
    """Validation loss and perplexity of the loaded model for every row of `settings` (default
    `SETTINGS`: fp, W8, A8, W8A8, FP8-E4M3 and FP8-E5M2 on weights and activations, W4 per
    group) under `spec`'s options (per tensor or channel, static or dynamic, scope, head)."""
    eval_batches = eval_batches or run.cfg.train.eval_batches
    chunks, tp_group = run.engine.chunks, run.mesh.tp_group
    ranges: dict[str, tuple[float, float]] = {}
    if spec.acts == "static":
        batches = calibration_batches(run, calib_batches)
        run.engine.train(False)
        ranges = calibrate(
            chunks,
            spec,
            lambda: run.engine.evaluate(batches),
            tp_group,
            run.mesh.dp_group,
        )
    results: dict[str, Any] = {}
    for name, (weights, acts, wfmt, afmt) in (settings or SETTINGS).items():
        side_spec = spec.with_formats(wfmt, afmt).with_sides(weights, acts)
        with torch.no_grad(), fake_quantized(chunks, side_spec, ranges, tp_group):
            loss = val_loss(run, eval_batches)
        results[name] = {"val_loss": loss, "val_ppl": _ppl(loss)}
    fp = results["fp"]["val_ppl"]
    for r in results.values():
        r["increase_pct"] = 100.0 * (r["val_ppl"] - fp) / fp
    return {
        "checkpoint": str(run.checkpoint),
        "step": run.step,
        "spec": {
            "weights": spec.weights,
            "acts": spec.acts,
            "scope": spec.scope,
            "head": spec.head,
            "group_size": spec.group_size,
        },
        "calib_batches": calib_batches if spec.acts == "static" else 0,
        "eval_batches": eval_batches,
        "eval_sequences": eval_batches * run.cfg.train.global_batch,
        "layout": {"tp": run.mesh.tp, "dp": run.mesh.dp},
        "results": results,
        # calibrated [min, max] per activation site: where the wide (outlier) ranges are
        "ranges": {name: list(r) for name, r in sorted(ranges.items())},
    }
