"""Activation checkpointing: activations kept per micro batch and step time, on vs off.

One Trainer (configs/smoke.yaml shapes unless overridden) alternates rounds of steps with every
block checkpointed and without, so slow drifts of a shared machine hit both sides alike. The
kept bytes are measured on one micro batch, loss included, with `saved_activation_bytes` (every
non-parameter tensor autograd keeps for backward), beside the memory planner's prediction for
the same config (whose "on" figure adds the transient set of the one block being recomputed):

    kept_mb_off=...  kept_mb_on=...  kept_ratio=<on/off>
    plan_mb_off=...  plan_mb_on=...  plan_ratio=<on/off>
    step_ms_off=...  step_ms_on=...  step_time_ratio=<on/off>   (one more forward of the blocks)

    python benchmarks/bench_recompute.py [--rounds 5] [--steps 4] [--threads N] [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import parse, smoke_config

from ofs_scale.analysis.plan import plan
from ofs_scale.model.recompute import saved_activation_bytes
from ofs_scale.trainer.loop import Trainer


def set_recompute(trainer: Trainer, on: bool) -> None:
    for chunk in trainer.engine.chunks:
        chunk.recompute = on


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark, print the result lines and return the numbers."""
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_recompute.py")
    parser.add_argument("--rounds", type=int, default=5, help="pairs of rounds (off / on)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per round")
    args = parse(parser, argv)
    cfg = smoke_config(args.steps * (2 * args.rounds + 1), *args.overrides)
    trainer = Trainer(cfg, callbacks=[])
    model = trainer.engine.chunks[0]
    shape = (cfg.train.micro_batch, cfg.data.seq_len + 1)
    batch = torch.randint(0, cfg.data.vocab_size, shape, device=trainer.mesh.device)

    def loss() -> torch.Tensor:
        return model.loss(model(batch[:, :-1]), batch[:, 1:])

    kept = {}
    for on in (False, True):
        set_recompute(trainer, on)
        kept[on] = saved_activation_bytes(model, loss)
        model.zero_grad(set_to_none=True)
    predicted = plan(cfg, gpus=trainer.mesh.world_size)

    def round_ms(on: bool) -> tuple[float, float]:
        set_recompute(trainer, on)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            trainer.train_step()
        n = args.steps
        return 1e3 * (time.perf_counter() - t0) / n, 1e3 * (time.process_time() - c0) / n

    round_ms(False)  # warm-up: allocator, kernels
    rounds = [(round_ms(False), round_ms(True)) for _ in range(args.rounds)]
    res = {
        "kept_mb_off": kept[False] / 2**20,
        "kept_mb_on": kept[True] / 2**20,
        "kept_ratio": kept[True] / kept[False],
        "plan_mb_off": predicted.act_bytes / 2**20,
        "plan_mb_on": predicted.act_ckpt_bytes / 2**20,
        "plan_ratio": predicted.act_ckpt_bytes / predicted.act_bytes,
    }
    for clock, suffix in ((0, ""), (1, "_cpu")):
        off = statistics.median(r[0][clock] for r in rounds)
        on = statistics.median(r[1][clock] for r in rounds)
        res[f"step_ms_off{suffix}"], res[f"step_ms_on{suffix}"] = off, on
        res[f"step_time_ratio{suffix}"] = on / off
    m = cfg.model
    print(
        f"bench_recompute: d_model={m.d_model} n_layers={m.n_layers} seq={cfg.data.seq_len} "
        f"micro_batch={cfg.train.micro_batch} threads={torch.get_num_threads()} "
        f"rounds={args.rounds}x{args.steps}"
    )
    print("  ".join(f"{k}={res[k]:.4g}" for k in ("kept_mb_off", "kept_mb_on", "kept_ratio")))
    print("  ".join(f"{k}={res[k]:.4g}" for k in ("plan_mb_off", "plan_mb_on", "plan_ratio")))
    for cpu in (False, True):
        keys = [k for k in res if k.startswith("step") and k.endswith("_cpu") == cpu]
        print("  ".join(f"{k}={res[k]:.4g}" for k in keys))
    return res


if __name__ == "__main__":
    main()
