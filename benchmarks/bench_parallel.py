"""Tokens/s of tensor and pipeline parallelism against one process, on the same config.

Runs the smoke model for a few steps as TP=1, TP=2 (2 processes), PP=1 and PP=2 (2 processes,
the configured schedule) and prints the ratios with the schedule's ideal bubble fraction. On a
2-core CPU machine parallel runs share the same cores, so ratios below 1 are expected here; the
script is for comparing layouts on real hardware.

    python benchmarks/bench_parallel.py [--steps 6] [section.key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings

from ofs_scale.config import load_config
from ofs_scale.engine.pipeline import bubble_fraction
from ofs_scale.testing.distributed import run_distributed


def _tokens_per_s(rank: int, overrides: list[str], steps: int) -> float:
    warnings.filterwarnings("ignore")
    from ofs_scale.trainer.loop import Trainer

    cfg = load_config("configs/smoke.yaml", overrides)
    trainer = Trainer(cfg, callbacks=[])
    times = [trainer.train_step()["step_time_s"] for _ in range(steps + 1)][1:]
    return cfg.train.global_batch * cfg.data.seq_len / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    base = [
        f"run.out_dir={tempfile.mkdtemp()}",
        "logging.wandb=disabled",
        "logging.progress=false",
        "metrics.every=0",
        "train.micro_batch=4",
        *args.overrides,
    ]
    cfg = load_config("configs/smoke.yaml", base)
    runs = {
        "tp1": (1, []),
        "tp2": (2, ["parallel.tp=2"]),
        "pp2": (2, ["parallel.pp=2"]),
    }
    tps = {}
    for name, (world, extra) in runs.items():
        tps[name] = run_distributed(_tokens_per_s, world, [*base, *extra], args.steps)[0]
        print(f"{name}: {tps[name]:,.0f} tok/s")
    n_micro = cfg.train.global_batch // cfg.train.micro_batch
    bubble = bubble_fraction(cfg.parallel.schedule, 2, n_micro, cfg.parallel.virtual_stages)
    print(f"tp2/tp1 ratio={tps['tp2'] / tps['tp1']:.3f}")
    print(
        f"pp2/pp1 ratio={tps['pp2'] / tps['tp1']:.3f} "
        f"(schedule {cfg.parallel.schedule}, {n_micro} micro batches, bubble={bubble:.3f})"
    )


if __name__ == "__main__":
    main()
