"""Training-step time of SOAP, Shampoo and Muon relative to AdamW on the smoke model, and
per-rank optimizer-state bytes at DP=1 and DP=2 (ZeRO-1 sharding).

    .venv/bin/python benchmarks/bench_optim.py [--steps 20] [--max-precond-dim 1024]
        [--vocab-precondition one_sided|full]

The cost of preconditioning the vocabulary side (SOAP's published behaviour) shows as
`--optimizers adamw,soap --max-precond-dim 10000 --vocab-precondition full` against the same
with `one_sided` (the default policy).

Step times are means over whole training steps (forward, backward, DP reduction, clipping,
optimizer), measured after the first `precondition_frequency` steps, over a multiple of the
preconditioner period so that basis refreshes are counted at their true rate; the optimizers
take their steps in turn so that a busy machine slows them alike. The DP=2 state
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

from ofs_scale.config import load_config
from ofs_scale.optim.sharded import state_bytes
from ofs_scale.parallel.mesh import destroy_mesh, init_mesh
from ofs_scale.testing.distributed import run_distributed
from ofs_scale.trainer.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]

# The settings these figures were measured with (SOAP's are its defaults; Shampoo keeps
# beta1 0.9 here); AdamW keeps the smoke config's own.
RECOMMENDED = {
    "soap": [
        "optim.lr=3e-3",
        "optim.betas=[0.95, 0.95]",
        "optim.eps=1e-8",
        "optim.weight_decay=0.01",
    ],
    "shampoo": ["optim.lr=3e-3", "optim.betas=[0.9, 0.95]", "optim.weight_decay=0.01"],
    "adamw": [],
    "muon": [],  # its defaults are AdamW's: Moonlight's update-RMS rule transfers them
}


def overrides(name: str, args: argparse.Namespace, out: str, steps: int) -> list[str]:
    return [
        f"optim.name={name}",
        *RECOMMENDED[name],
        f"optim.max_precond_dim={args.max_precond_dim}",
        f"optim.vocab_precondition={args.vocab_precondition}",
        f"optim.precondition_frequency={args.precondition_frequency}",
        f"optim.start_preconditioning_step={args.precondition_frequency}",
        f"train.stages=[{{name: bench, steps: {steps}, lr_schedule: constant}}]",
        "train.eval_every=0",
        "metrics.every=0",
        "logging.wandb=disabled",
        "logging.progress=false",
        f"run.out_dir={out}",
    ]


def time_steps(names: list[str], args: argparse.Namespace, tmp: str) -> dict[str, tuple]:
    """(mean step seconds, final loss, optimizer-state bytes) per optimizer at DP=1.

    The optimizers' trainers take their steps in turn, so that load from other processes on a
    shared machine falls on all of them alike."""
    warm = args.precondition_frequency
    steps = warm + args.steps
    mesh = init_mesh(1, 1)
    trainers = {}
    for name in names:
        cfg = load_config(str(ROOT / "configs/smoke.yaml"), overrides(name, args, tmp, steps))
        trainers[name] = Trainer(cfg, callbacks=[], mesh=mesh)
    times: dict[str, list[float]] = {name: [] for name in names}
    loss = {}
    for i in range(steps):
        for name, trainer in trainers.items():
            t0 = time.perf_counter()
            loss[name] = trainer.train_step()["loss"]
            if i >= warm:
                times[name].append(time.perf_counter() - t0)
        print(f"  step {i + 1}/{steps}", end="\r", flush=True)
    print(" " * 30, end="\r")
    return {
        n: (statistics.mean(times[n]), loss[n], state_bytes(trainers[n].optimizer)) for n in names
    }


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
        default=1024,
        help="1024 leaves the 8192-token vocabulary sides unrotated (SOAP) and cuts them into "
        "1024-row blocks (Shampoo); every other side of the smoke model is preconditioned",
    )
    parser.add_argument(
        "--vocab-precondition",
        default="one_sided",
        choices=["one_sided", "full"],
        help="SOAP's vocabulary matrices: vocabulary side unrotated (default) or preconditioned "
        "(the published behaviour; with --max-precond-dim 10000 it builds 8192 x 8192 factors)",
    )
    parser.add_argument("--optimizers", default="adamw,soap,shampoo,muon")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    names = args.optimizers.split(",")
    print(
        f"smoke model, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"precondition_frequency={args.precondition_frequency}, "
        f"max_precond_dim={args.max_precond_dim}, "
        f"vocab_precondition={args.vocab_precondition}, {args.steps} timed steps"
    )
    with tempfile.TemporaryDirectory() as tmp:
        results = time_steps(names, args, f"{tmp}/dp1")
        for name in names:
            dt, loss, nbytes = results[name]
            mib = nbytes / 2**20
            print(f"{name:8s} step {dt * 1e3:8.1f} ms  loss {loss:.3f}  state {mib:8.2f} MiB")
        if "adamw" in results:
            for name in names:
                ratio = results[name][0] / results["adamw"][0]
                print(f"step time ratio {name}/adamw: {ratio:.2f}x")
        destroy_mesh()  # the DP=2 processes build their own groups
        for name in names:
            ovr = [*overrides(name, args, f"{tmp}/dp2_{name}", 1), "train.micro_batch=8"]
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
