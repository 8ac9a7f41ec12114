"""Regional torch.compile (`train.compile`): training-step time compiled vs eager.

One Trainer (configs/smoke.yaml shapes unless overridden) compiles its blocks once, then
alternates rounds of steps through the compiled blocks and through the eager ones (the same
modules and weights), so slow drifts of a shared machine hit both sides alike. The first
compiled round (compilation) is reported apart and not counted:

    compile_s=...
    step_ms_eager=...  step_ms_compiled=...  step_time_ratio=<compiled/eager>

    python benchmarks/bench_compile.py [--rounds 4] [--steps 4] [--backend inductor] [key=value]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import parse, smoke_config, step_ms

from ofs_scale.trainer.loop import Trainer


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark, print the result lines and return the numbers."""
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_compile.py")
    parser.add_argument("--rounds", type=int, default=4, help="pairs of rounds (eager/compiled)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per round")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    args = parse(parser, argv)
    cfg = smoke_config(args.steps * (2 * args.rounds + 2), "train.compile=false", *args.overrides)
    trainer = Trainer(cfg, callbacks=[])
    model = trainer.engine.chunks[0]
    model.compile_blocks(args.backend)
    compiled = model.compiled

    def round_ms(on: bool) -> float:
        model.compiled = compiled if on else {}
        return step_ms(trainer, args.steps)

    t0 = time.perf_counter()
    round_ms(True)  # compiles forward and backward of the blocks
    compile_s = time.perf_counter() - t0
    round_ms(False)  # warm-up of the eager side
    rounds = [(round_ms(False), round_ms(True)) for _ in range(args.rounds)]
    eager = statistics.median(r[0] for r in rounds)
    fast = statistics.median(r[1] for r in rounds)
    res = {
        "compile_s": compile_s,
        "step_ms_eager": eager,
        "step_ms_compiled": fast,
        "step_time_ratio": fast / eager,
    }
    m = cfg.model
    print(
        f"bench_compile: backend={args.backend} d_model={m.d_model} n_layers={m.n_layers} "
        f"seq={cfg.data.seq_len} micro_batch={cfg.train.micro_batch} "
        f"threads={torch.get_num_threads()} rounds={args.rounds}x{args.steps}"
    )
    print(f"compile_s={compile_s:.1f}")
    print("  ".join(f"{k}={res[k]:.4g}" for k in ("step_ms_eager", "step_ms_compiled")), end="  ")
    print(f"step_time_ratio={res['step_time_ratio']:.3f}")
    return res


if __name__ == "__main__":
    main()
