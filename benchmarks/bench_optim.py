"""Training-step time of SOAP and Shampoo relative to AdamW on the smoke model, and per-rank
optimizer-state bytes at DP=1 and DP=2 (ZeRO-1 sharding).

    .venv/bin/python benchmarks/bench_optim.py [--steps 20] [--max-precond-dim 4096]

Step times are means over whole training steps (forward, backward, DP reduction, clipping,
optimizer), measured after the first `precondition_frequency` steps, over a multiple of the
preconditioner period so that basis refreshes are counted at their true rate. The DP=2 state
is measured on two spawned processes (gloo) that build the same model and optimizer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.harness, the project's one multi-process launcher

from ofs_scale.config import load_config  # noqa: E402
from ofs_scale.optim.sharded import state_bytes  # noqa: E402
from ofs_scale.train import Trainer  # noqa: E402
from tests.harness import run_distributed  # noqa: E402

# Recommended settings (docs/optimizers.md); AdamW keeps the smoke config's own.
RECOMMENDED = {
    "soap": [
        "optim.lr=3e-3",
        "optim.betas=[0.95, 0.95]",
        "optim.eps=1e-8",
        "optim.weight_decay=0.01",
    ],
    "shampoo": ["optim.lr=3e-3", "optim.betas=[0.9, 0.95]", "optim.weight_decay=0.01"],
    "adamw": [],
}


def overrides(name: str, args: argparse.Namespace, out: str, steps: int) -> list[str]:
    return [
        f"optim.name={name}",
        *RECOMMENDED[name],
        f"optim.max_precond_dim={args.max_precond_dim}",
        f"optim.precondition_frequency={args.precondition_frequency}",
        f"optim.start_preconditioning_step={args.precondition_frequency}",
        f"train.stages=[{{name: bench, steps: {steps}, lr_schedule: constant}}]",
        "train.eval_every=0",
        "metrics.every=0",
        "logging.wandb=disabled",
        "logging.progress=false",
        f"run.out_dir={out}",
    ]


def time_steps(name: str, args: argparse.Namespace, out: str) -> tuple[float, float, int]:
    """(mean step seconds, final loss, optimizer-state bytes) of one optimizer at DP=1."""
    warm = args.precondition_frequency
    steps = warm + args.steps
    cfg = load_config(str(ROOT / "configs/smoke.yaml"), overrides(name, args, out, steps))
    trainer = Trainer(cfg, callbacks=[])
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        record = trainer.train_step()
        if i >= warm:
            times.append(time.perf_counter() - t0)
        print(f"  {name} step {i + 1}/{steps}: {times[-1] if times else 0:.3f}s", end="\r")
    print(" " * 60, end="\r")
    return statistics.mean(times), record["loss"], state_bytes(trainer.optimizer)


def _dp2_bytes(rank: int, ovr: list[str]) -> int:
    warnings.filterwarnings("ignore")
    trainer = Trainer(load_config(str(ROOT / "configs/smoke.yaml"), ovr), callbacks=[])
    return state_bytes(trainer.optimizer)  # materialises every owned parameter's state


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps (multiple of freq)")
    parser.add_argument("--precondition-frequency", type=int, default=10)
    parser.add_argument(
        "--max-precond-dim",
        type=int,
        default=4096,
        help="4096 leaves the 8192-token vocabulary sides unrotated, as the 7B configs do",
    )
    parser.add_argument("--optimizers", default="adamw,soap,shampoo")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    names = args.optimizers.split(",")
    print(
        f"smoke model, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"precondition_frequency={args.precondition_frequency}, "
        f"max_precond_dim={args.max_precond_dim}, {args.steps} timed steps"
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            results[name] = time_steps(name, args, f"{tmp}/{name}")
            dt, loss, nbytes = results[name]
            mib = nbytes / 2**20
            print(f"{name:8s} step {dt * 1e3:8.1f} ms  loss {loss:.3f}  state {mib:8.2f} MiB")
        if "adamw" in results:
            for name in names:
                ratio = results[name][0] / results["adamw"][0]
                print(f"step time ratio {name}/adamw: {ratio:.2f}x")
        from ofs_scale.parallel.mesh import destroy_mesh

        destroy_mesh()  # the DP=2 processes build their own groups
        for name in names:
            ovr = overrides(name, args, f"{tmp}/dp2_{name}", 1)
            per_rank = run_distributed(_dp2_bytes, 2, ovr)
            dp1 = results[name][2]
            print(
                f"{name:8s} state bytes per rank: DP=1 {dp1:,}  DP=2 "
                + ", ".join(f"{b:,}" for b in per_rank)
                + f"  (largest DP=2 rank / unsharded = {max(per_rank) / dp1:.3f})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
