"""Asynchronous checkpoints (`checkpoint.async_save`): how long a save stalls the training loop,
async vs sync, on a model whose checkpoint takes about a second to write.

One Trainer alternates rounds: save, `--steps` training steps (a checkpoint every few steps,
already far more often than real runs save), then the wait for the save to be committed (what
the next save or the end of training would wait for). The stall of a round is
the time the loop spends in the save call plus in that wait; for a sync save the wait is zero,
for an async save the call (`stage_s_async`) is the staging copy to CPU memory and the wait is
what the background write did not finish during the steps, plus the commit:

    ckpt_mb=...  stall_s_sync=...  stall_s_async=...  stage_s_async=...  stall_ratio=<async/sync>
    step_s=...

    python benchmarks/bench_async_ckpt.py [--rounds 3] [--steps 4] [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import parse, smoke_config, step_ms

from ofs_scale.trainer.loop import Trainer

BIG = [
    "model.d_model=512",
    "model.n_layers=4",
    "model.n_heads=8",
    "train.global_batch=1",
    "train.micro_batch=1",
    "checkpoint.keep=1",
]


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark, print the result line and return the numbers."""
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_async_ckpt.py")
    parser.add_argument("--rounds", type=int, default=3, help="pairs of rounds (sync / async)")
    parser.add_argument("--steps", type=int, default=4, help="training steps between saves")
    args = parse(parser, argv)
    cfg = smoke_config((2 * args.rounds + 2) * args.steps, *BIG, *args.overrides)
    trainer = Trainer(cfg, callbacks=[])
    ckpt = trainer.ckpt
    count = [0]

    def round_s(use_async: bool) -> tuple[float, float, float]:
        ckpt.async_save = use_async
        count[0] += 1
        t0 = time.perf_counter()
        trainer.save_checkpoint(f"step_{count[0]:06d}")
        call = time.perf_counter() - t0
        step = step_ms(trainer, args.steps) / 1e3
        t2 = time.perf_counter()
        ckpt.wait()
        return call + time.perf_counter() - t2, step, call

    round_s(False), round_s(True)  # warm-up: page cache, the checkpoint process group
    rounds = [(round_s(False), round_s(True)) for _ in range(args.rounds)]
    sync = statistics.median(r[0][0] for r in rounds)
    stall = statistics.median(r[1][0] for r in rounds)
    step = statistics.median(r[0][1] for r in rounds)
    stage = statistics.median(r[1][2] for r in rounds)
    latest = ckpt.root / (ckpt.root / "latest").read_text().strip()
    mb = sum(f.stat().st_size for f in latest.rglob("*") if f.is_file()) / 2**20
    res = {
        "ckpt_mb": mb,
        "stall_s_sync": sync,
        "stall_s_async": stall,
        "stage_s_async": stage,
        "stall_ratio": stall / sync,
        "step_s": step,
    }
    m = cfg.model
    print(
        f"bench_async_ckpt: d_model={m.d_model} n_layers={m.n_layers} optim={cfg.optim.name} "
        f"threads={torch.get_num_threads()} rounds={args.rounds} steps_between_saves={args.steps}"
    )
    print("  ".join(f"{k}={v:.4g}" for k, v in res.items()))
    return res


if __name__ == "__main__":
    main()
