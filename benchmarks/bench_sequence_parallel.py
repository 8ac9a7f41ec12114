"""Sequence parallelism at TP=2: activations kept per micro batch and step time, on vs off.

Two processes (TP=2) each build the same model twice, with `parallel.sequence_parallel` off and
on, and alternate rounds of steps between them, so slow drifts of a shared machine hit both
alike. The kept bytes are those of one micro batch on one TP rank, loss included
(`saved_activation_bytes`: every non-parameter tensor autograd keeps for backward), and those of
one transformer block alone per token of the micro batch (what the memory planner multiplies):

    kept_mb_off=...  kept_mb_on=...  kept_ratio=<on/off>
    layer_bytes_per_token_off=...  layer_bytes_per_token_on=...  layer_ratio=<on/off>
    step_ms_off=...  step_ms_on=...  step_time_ratio=<on/off>

On CPU sequence parallelism runs megatron-core's plain TP layers with the gather / split of
`parallel/sequence.py` (megatron-core's own collectives need CUDA): column layers then keep the
gathered input, where megatron-core's keep only this rank's part, and the collectives are
all-reduces, so both figures understate what the CUDA path gives.

    python benchmarks/bench_sequence_parallel.py [--rounds 3] [--steps 2] [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch
from common import parse, smoke_config, step_ms

from ofs_scale.testing.distributed import run_distributed


def _measure(rank: int, overrides: list[str], rounds: int, steps: int) -> dict[str, float]:
    warnings.filterwarnings("ignore")
    from ofs_scale.model.recompute import saved_activation_bytes
    from ofs_scale.trainer.loop import Trainer

    total = steps * (2 * rounds + 1)
    trainers = {}
    for on in (False, True):
        flag = f"parallel.sequence_parallel={str(on).lower()}"
        cfg = smoke_config(total, "parallel.tp=2", flag, *overrides)
        trainers[on] = Trainer(cfg, callbacks=[])
    shape = (cfg.train.micro_batch, cfg.data.seq_len + 1)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, cfg.data.vocab_size, shape, generator=gen)
    x, y = batch[:, :-1], batch[:, 1:]
    kept, per_token = {}, {}
    for on, trainer in trainers.items():
        model = trainer.engine.chunks[0]
        assert model.factory.sequence_parallel == on
        kept[on] = saved_activation_bytes(model, lambda m=model: m.loss(m(x), y))
        # one block alone, on this rank's embeddings: bytes per token of the whole sequence
        block, h = model.layers["0"], model.embed(x).detach().requires_grad_()
        per_token[on] = saved_activation_bytes(block, lambda b=block, h=h: b(h)) / x.numel()
        model.zero_grad(set_to_none=True)

    def round_ms(on: bool) -> float:
        return step_ms(trainers[on], steps)

    round_ms(False), round_ms(True)  # warm-up
    times = [(round_ms(False), round_ms(True)) for _ in range(rounds)]
    off, on = (statistics.median(t[i] for t in times) for i in (0, 1))
    m = cfg.model
    return {
        "d_model": m.d_model,
        "n_layers": m.n_layers,
        "seq_len": cfg.data.seq_len,
        "micro_batch": cfg.train.micro_batch,
        "kept_mb_off": kept[False] / 2**20,
        "kept_mb_on": kept[True] / 2**20,
        "kept_ratio": kept[True] / kept[False],
        "layer_bytes_per_token_off": per_token[False],
        "layer_bytes_per_token_on": per_token[True],
        "layer_ratio": per_token[True] / per_token[False],
        "step_ms_off": off,
        "step_ms_on": on,
        "step_time_ratio": on / off,
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark, print the result lines and return rank 0's numbers."""
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_sequence_parallel.py")
    parser.add_argument("--rounds", type=int, default=3, help="pairs of rounds (off / on)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per round")
    args = parse(parser, argv)
    res = run_distributed(_measure, 2, args.overrides, args.rounds, args.steps)[0]
    print(
        f"bench_sequence_parallel: tp=2 d_model={res['d_model']} n_layers={res['n_layers']} "
        f"seq={res['seq_len']} micro_batch={res['micro_batch']} rounds={args.rounds}x{args.steps}"
    )
    print("  ".join(f"{k}={res[k]:.4g}" for k in ("kept_mb_off", "kept_mb_on", "kept_ratio")))
    keys = ("layer_bytes_per_token_off", "layer_bytes_per_token_on", "layer_ratio")
    print("  ".join(f"{k}={res[k]:.4g}" for k in keys))
    print("  ".join(f"{k}={res[k]:.4g}" for k in ("step_ms_off", "step_ms_on", "step_time_ratio")))
    return res


if __name__ == "__main__":
    main()
