"""Pieces the alternating-rounds benchmarks share (run them as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import torch

from ofs_scale.config import Config, load_config


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Add `--threads` and the config overrides to `parser`, parse, and apply the threads."""
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def smoke_config(steps: int, *overrides: str, base: str | None = "configs/smoke.yaml") -> Config:
    """`base` (configs/smoke.yaml; None: the defaults) for `steps` constant-lr steps in a
    temporary run dir, with no evaluation, logging or metrics unless `overrides` turn them on."""
    return load_config(
        base,
        [
            f"run.out_dir={tempfile.mkdtemp()}",
            "logging.wandb=disabled",
            "logging.progress=false",
            "metrics.every=0",
            "train.eval_every=0",
            f"train.stages=[{{name: main, steps: {steps}, lr_schedule: constant}}]",
            *overrides,
        ],
    )


def step_ms(trainer, steps: int) -> float:
    """Mean wall-clock milliseconds of `steps` training steps of `trainer`."""
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return 1e3 * (time.perf_counter() - t0) / steps
