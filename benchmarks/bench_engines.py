"""Native engine vs DeepSpeed ZeRO-1 / ZeRO-2 at DP=2: tokens/s and per-rank optimizer bytes.

All runs train the smoke model with AdamW on 2 processes (DP=2) and print ratios against the
native engine with its default sharded optimizer. Optimizer bytes are what one rank holds for
the optimizer: AdamW moments (+ step counters), plus, for DeepSpeed, the fp32 master copy of its
ZeRO partition (native AdamW updates the model weights in place and keeps no master copy).
On a 2-core CPU machine both ranks share the cores, so tokens/s compares the engines' overhead
on the same hardware, not their scaling.

    python benchmarks/bench_engines.py [--steps 6] [section.key=value ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import warnings
from pathlib import Path

from ofs_scale.config import load_config
from ofs_scale.testing.distributed import run_distributed


def _measure(rank: int, overrides: list[str], steps: int) -> dict[str, float]:
    """Median tokens/s over `steps` steps (after one warm-up step) and optimizer bytes."""
    warnings.filterwarnings("ignore")
    from ofs_scale.trainer.loop import Trainer

    cfg = load_config("configs/smoke.yaml", overrides)
    trainer = Trainer(cfg, callbacks=[])
    times = [trainer.train_step()["step_time_s"] for _ in range(steps + 1)][1:]
    parts = trainer.engine.optimizer_state_bytes()
    return {
        "tokens_per_s": cfg.train.global_batch * cfg.data.seq_len / statistics.median(times),
        "moments": parts["moments"],
        "master": parts["master"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per engine")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path("~/.cache/ofs_scale/torch_extensions").expanduser())
    )
    base = [
        f"run.out_dir={tempfile.mkdtemp()}",
        "logging.wandb=disabled",
        "logging.progress=false",
        "metrics.every=0",
        "optim.name=adamw",
        "train.micro_batch=4",
        *args.overrides,
    ]
    runs = {
        "native": [],
        "native-unsharded": ["optim.shard=false"],
        "zero1": ["train.engine=deepspeed", "train.zero_stage=1"],
        "zero2": ["train.engine=deepspeed", "train.zero_stage=2"],
    }
    results = {}
    for name, extra in runs.items():
        per_rank = run_distributed(_measure, 2, [*base, *extra], args.steps, timeout=900)
        # The slowest rank sets the pace; the fullest rank sets the memory need.
        r = {k: max(x[k] for x in per_rank) for k in ("moments", "master")}
        r["tokens_per_s"] = min(x["tokens_per_s"] for x in per_rank)
        r["bytes"] = max(x["moments"] + x["master"] for x in per_rank)
        results[name] = r
        print(
            f"{name}: {r['tokens_per_s']:,.0f} tok/s, optimizer bytes per rank "
            f"{r['bytes']:,} (moments {r['moments']:,}, master {r['master']:,})"
        )
    ref = results["native"]
    for name, r in results.items():
        if name == "native":
            continue
        print(
            f"{name}/native: tokens_per_s ratio={r['tokens_per_s'] / ref['tokens_per_s']:.3f} "
            f"optimizer_bytes ratio={r['bytes'] / ref['bytes']:.3f} "
            f"moments ratio={r['moments'] / ref['moments']:.3f}"
        )


if __name__ == "__main__":
    main()
