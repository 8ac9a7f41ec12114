"""Cost of the outlier-feature metrics: throughput with `metrics.every=10` vs metrics off, and one
metric step vs a plain step.

One Trainer (configs/smoke.yaml shapes unless overridden) trains in rounds of `every` steps,
alternating a round without the metrics callback and a round with it (its last step measured),
so that slow drifts of a shared machine hit both sides alike. Prints medians of wall-clock time
and, on a second line with the suffix `_cpu`, of this process's CPU time (steadier when other
jobs share the machine; use --threads 1 for it to be meaningful):

    plain_step_ms=...  metric_step_ms=...  metric_step_cost=<metric/plain>
    overhead_every_10=<(metric_step_cost - 1) / 10>   (target <= 0.02)
    overhead_every_10_rounds=<(round with metrics) / (round without) - 1>

    python benchmarks/bench_metrics.py [--rounds 6] [--every 10] [--threads N] [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import parse, smoke_config

from ofs_scale.instruments.of_metrics import MetricsCallback
from ofs_scale.trainer.loop import Trainer


def timed_step(trainer: Trainer, callbacks: list) -> tuple[float, float]:
    """One optimizer step with `callbacks` around it, as `Trainer.fit` runs it; (wall, CPU)
    seconds. CPU time of this process is the steadier measure on a shared machine."""
    t0, c0 = time.perf_counter(), time.process_time()
    step = trainer.step + 1
    for cb in callbacks:
        cb.pre_step(trainer, step)
    record = trainer.train_step()
    for cb in callbacks:
        cb.post_step(trainer, trainer.step, record)
    return time.perf_counter() - t0, time.process_time() - c0


def _summarise(rounds: list, every: int, clock: int, suffix: str) -> dict[str, float]:
    """Medians of one clock (0: wall, 1: CPU) over the rounds of (off, on) step times."""
    plain = [t[clock] for off, on in rounds for t in off + on[:-1]]
    metric = [on[-1][clock] for _, on in rounds]
    ratios = [sum(t[clock] for t in on) / sum(t[clock] for t in off) for off, on in rounds]
    res = {
        f"plain_step_ms{suffix}": 1e3 * statistics.median(plain),
        f"metric_step_ms{suffix}": 1e3 * statistics.median(metric),
    }
    cost = res[f"metric_step_ms{suffix}"] / res[f"plain_step_ms{suffix}"]
    res[f"metric_step_cost{suffix}"] = cost
    # one metric step per `every` steps, from the medians (robust to noise) ...
    res[f"overhead_every_{every}{suffix}"] = (cost - 1.0) / every
    # ... and measured directly on whole rounds (noisier on a shared machine)
    res[f"overhead_every_{every}_rounds{suffix}"] = statistics.median(ratios) - 1.0
    return res


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark, print the result lines and return the numbers."""
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_metrics.py")
    parser.add_argument("--rounds", type=int, default=6, help="pairs of rounds (on / off)")
    parser.add_argument("--every", type=int, default=10, help="metrics.every")
    args = parse(parser, argv)
    every = args.every
    cfg = smoke_config(2 * every * (args.rounds + 1), f"metrics.every={every}", *args.overrides)
    trainer = Trainer(cfg, callbacks=[])
    metrics = MetricsCallback(plots=False)
    metrics.on_train_start(trainer)
    for _ in range(every):  # warm-up: allocator, kernels, the first metric step
        timed_step(trainer, [metrics])
    rounds = []
    for _ in range(args.rounds):
        off = [timed_step(trainer, []) for _ in range(every)]
        on = [timed_step(trainer, [metrics]) for _ in range(every)]
        assert metrics.last_step == trainer.step, "the last step of a round must be measured"
        rounds.append((off, on))
    res: dict[str, float] = {}
    for clock, name in ((0, ""), (1, "_cpu")):
        res.update(_summarise(rounds, every, clock, name))
    m = cfg.model
    print(
        f"bench_metrics: d_model={m.d_model} n_layers={m.n_layers} seq={cfg.data.seq_len} "
        f"batch={cfg.train.global_batch} threads={torch.get_num_threads()} rounds={args.rounds}"
    )
    for cpu in (False, True):
        print("  ".join(f"{k}={v:.4g}" for k, v in res.items() if k.endswith("_cpu") == cpu))
    return res


if __name__ == "__main__":
    main()
