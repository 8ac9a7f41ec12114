"""Cost of the outlier-feature metrics: throughput with `metrics.every=10` vs metrics off, and one
metric step vs a plain step.

One Trainer (configs/smoke.yaml shapes unless overridden) trains in rounds of `every` steps,
alternating a round without the metrics callback and a round with it (its last step measured),
so that slow drifts of a shared machine hit both sides alike. Prints medians:

    plain_step_ms=...  metric_step_ms=...  metric_step_cost=<metric/plain>
    overhead_every_10=<(round with metrics) / (round without) - 1>   (target <= 0.02)

    python benchmarks/bench_metrics.py [--rounds 6] [--every 10] [section.key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch

from ofs_scale.config import load_config
from ofs_scale.metrics.callback import MetricsCallback
from ofs_scale.train import Trainer


def timed_step(trainer: Trainer, callbacks: list) -> float:
    """One optimizer step with `callbacks` around it, as `Trainer.fit` runs it; seconds."""
    t0 = time.perf_counter()
    step = trainer.step + 1
    for cb in callbacks:
        cb.pre_step(trainer, step)
    record = trainer.train_step()
    for cb in callbacks:
        cb.post_step(trainer, trainer.step, record)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark, print the result lines and return the numbers."""
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_metrics.py")
    parser.add_argument("--rounds", type=int, default=6, help="pairs of rounds (on / off)")
    parser.add_argument("--every", type=int, default=10, help="metrics.every")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    every = args.every
    steps = 2 * every * (args.rounds + 1)
    cfg = load_config(
        "configs/smoke.yaml",
        [
            f"run.out_dir={tempfile.mkdtemp()}",
            "logging.wandb=disabled",
            "logging.progress=false",
            f"metrics.every={every}",
            "train.eval_every=0",
            f"train.stages=[{{name: main, steps: {steps}, lr_schedule: constant}}]",
            *args.overrides,
        ],
    )
    trainer = Trainer(cfg, callbacks=[])
    metrics = MetricsCallback(plots=False)
    metrics.on_train_start(trainer)
    for _ in range(every):  # warm-up: allocator, kernels, the first metric step
        timed_step(trainer, [metrics])
    plain: list[float] = []
    metric: list[float] = []
    ratios: list[float] = []
    for _ in range(args.rounds):
        off = [timed_step(trainer, []) for _ in range(every)]
        on = [timed_step(trainer, [metrics]) for _ in range(every)]
        assert metrics.last_step == trainer.step, "the last step of a round must be measured"
        plain += off + on[:-1]
        metric.append(on[-1])
        ratios.append(sum(on) / sum(off))
    res = {
        "plain_step_ms": 1e3 * statistics.median(plain),
        "metric_step_ms": 1e3 * statistics.median(metric),
    }
    res["metric_step_cost"] = res["metric_step_ms"] / res["plain_step_ms"]
    # the overhead of one metric step per `every` steps, from the medians (robust to noise) ...
    res[f"overhead_every_{every}"] = (res["metric_step_cost"] - 1.0) / every
    # ... and measured directly on whole rounds (noisier on a shared machine)
    res[f"overhead_every_{every}_rounds"] = statistics.median(ratios) - 1.0
    m = cfg.model
    print(
        f"bench_metrics: d_model={m.d_model} n_layers={m.n_layers} seq={cfg.data.seq_len} "
        f"batch={cfg.train.global_batch} threads={torch.get_num_threads()} rounds={args.rounds}"
    )
    print("  ".join(f"{k}={v:.4g}" for k, v in res.items()))
    return res


if __name__ == "__main__":
    main()
