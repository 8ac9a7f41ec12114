"""DP=2 gradient reduction: step time overlapped vs after the backward, and bytes per parameter.

Part 1 trains one model at DP=2 (gloo on CPU, nccl with `--backend nccl`) and alternates, step
by step, three ways of reducing the gradients: the plain all-reduce after the backward
(`parallel.grads.average_across_dp`), the fp32 gradient buffers reduced after the backward, and
the same buffers reduced in buckets launched from the gradient hooks during the backward
(`parallel.overlap_grad_reduce`). It prints the median step times and their ratios.

Part 2 counts the bytes each rank's collectives move per parameter and step (an all-reduce
counts twice its buffer, a reduce or broadcast once), for AdamW and for a sharded (ZeRO-1)
optimizer, with and without master weights and a bf16 reduction, against the bf16 weight bytes
(2 per parameter). The plain path's all-reduce is not instrumented: it is 2 x 4 bytes.

    python benchmarks/bench_dp_overlap.py [--steps 6] [--sharded muon] [section.key=value ...]

On a 2-core CPU both ranks and gloo's communication threads share the cores, so overlap has
little to hide behind there; the ratio is for comparing on real hardware.
"""

from __future__ import annotations

import argparse
import statistics
import warnings

from common import parse, smoke_config

from ofs_scale.testing.distributed import run_distributed

POST = ["parallel.overlap_grad_reduce=false", "train.master_weights=false"]
MASTER = ["train.dtype=bf16", "train.master_weights=true", "parallel.overlap_grad_reduce=true"]
BYTES_STEPS = 2


def _alternate(rank: int, overrides: list[str], steps: int) -> dict[str, float]:
    """Median step time of each reduction mode, the modes taking turns on one model."""
    warnings.filterwarnings("ignore")
    from ofs_scale.trainer.loop import Trainer

    cfg = smoke_config(3 * (steps + 1), "parallel.overlap_grad_reduce=true", *overrides)
    trainer = Trainer(cfg, callbacks=[])
    buffer = trainer.engine.grads
    times: dict[str, list[float]] = {"plain": [], "buffer": [], "overlap": []}
    for i in range(steps + 1):
        for mode in times:
            trainer.engine.grads = None if mode == "plain" else buffer
            buffer.overlap = mode == "overlap"
            dt = trainer.train_step()["step_time_s"]
            if i:  # the first round warms up
                times[mode].append(dt)
    return {mode: statistics.median(t) for mode, t in times.items()}


def _bytes(rank: int, overrides: list[str], settings: dict[str, list[str]]) -> dict[str, float]:
    """Bytes this rank's collectives moved per parameter and step, for each setting."""
    warnings.filterwarnings("ignore")
    from ofs_scale.trainer.loop import Trainer

    out = {}
    for name, extra in settings.items():
        trainer = Trainer(smoke_config(BYTES_STEPS, *overrides, *extra), callbacks=[])
        trainer.fit()
        e = trainer.engine
        comm = getattr(e.grads, "comm_bytes", 0) + getattr(e.optimizer, "comm_bytes", 0)
        numel = sum(p.numel() for p in trainer.params)
        if e.grads is None:  # the plain all-reduce of fp32 gradients, 2 x 4 bytes each step
            comm += 2 * 4 * numel * BYTES_STEPS
        out[name] = comm / BYTES_STEPS / numel
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--sharded", default="muon", help="the ZeRO-1 optimizer of part 2")
    parser.add_argument("--backend", default="gloo")
    args = parse(parser, argv)
    over = [*args.overrides]
    med = run_distributed(_alternate, 2, over, args.steps, backend=args.backend)[0]
    for mode, t in med.items():
        print(f"{mode}: median step {t * 1e3:.1f} ms")
    print(f"overlap/plain step-time ratio={med['overlap'] / med['plain']:.3f}")
    print(f"overlap/buffer step-time ratio={med['overlap'] / med['buffer']:.3f}")
    adamw = ["optim.name=adamw", "optim.shard=false"]
    zero = [f"optim.name={args.sharded}", "optim.shard=true"]
    bf16 = "parallel.grad_reduce_dtype=bf16"
    settings = {
        "adamw plain": [*adamw, *POST],
        "adamw overlap fp32": [*adamw, "parallel.overlap_grad_reduce=true"],
        "adamw master, bf16 reduce": [*adamw, *MASTER, bf16],
        f"{args.sharded} ZeRO-1 plain": [*zero, *POST],
        f"{args.sharded} ZeRO-1 overlap fp32": [*zero, "parallel.overlap_grad_reduce=true"],
        f"{args.sharded} ZeRO-1 master, fp32 reduce": [*zero, *MASTER],
        f"{args.sharded} ZeRO-1 master, bf16 reduce": [*zero, *MASTER, bf16],
    }
    per_param = run_distributed(_bytes, 2, over, settings, backend=args.backend)[0]
    for name, b in per_param.items():
        print(f"{name}: {b:.2f} bytes/param/step = {b / 2:.2f}x the bf16 weight bytes")


if __name__ == "__main__":
    main()
