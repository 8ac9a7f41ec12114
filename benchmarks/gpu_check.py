"""GPU check (issue 14): our step vs plain PyTorch on one GPU, and the fast paths vs the plain path.

1. Throughput: a ~1B-parameter Pre-Norm GPT (d 2048, 18 layers, seq 2048), our Trainer step
   with the GPU fast paths on (bf16 weights + fp32 masters, regional torch.compile, bf16) vs a
   plain single-file PyTorch model of the same shapes (bench_step.RefGPT cast to bf16 weights,
   F.scaled_dot_product_attention, fused AdamW, torch.compile), each timed after warm-up over a
   fixed number of steps: tokens/s, model TFLOP/s and MFU (6 N + 12 L T d FLOPs per token).
2. Correctness: a tiny model trained a few steps on the same batches with the fast-path switches
   on and with them off (both bf16 autocast): the losses must agree within `--rtol`.

Prints a small table and writes the figures as JSON (`--json`). `--cpu-tiny` runs both parts on
CPU with tiny shapes and the switches that need CUDA left off, so a test keeps the script alive.

    python benchmarks/gpu_check.py --json runs/gpu_check.json
    python benchmarks/gpu_check.py --cpu-tiny --json /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import RefGPT
from common import smoke_config

from ofs_scale.config import Config
from ofs_scale.model.flops import flops_per_token
from ofs_scale.trainer.loop import Trainer

SHAPES_1B = [
    "model.d_model=2048",
    "model.n_layers=18",
    "model.n_heads=16",
    "data.seq_len=2048",
    "data.vocab_size=8192",
    "train.micro_batch=4",
    "train.global_batch=8",
]
SHAPES_TINY = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "data.seq_len=32",
    "data.vocab_size=512",
    "train.micro_batch=4",
    "train.global_batch=8",
]
FAST_GPU = [  # overlap and sequence parallelism: `auto` (they need DP > 1, TP > 1 to act)
    "train.master_weights=true",
    "train.compile=true",
    "parallel.overlap_grad_reduce=auto",
    "parallel.sequence_parallel=auto",
    "checkpoint.async_save=true",
]
# On CPU (--cpu-tiny): the switches that run without CUDA (compile would need a C++ toolchain
# and minutes; sequence parallelism needs tp > 1; overlap and async save only change timing).
FAST_CPU = [
    "train.master_weights=true",
    "train.compile=false",
    "parallel.overlap_grad_reduce=false",
    "parallel.sequence_parallel=false",
    "checkpoint.async_save=false",
]
PLAIN = [
    "train.master_weights=false",
    "train.compile=false",
    "parallel.overlap_grad_reduce=false",
    "parallel.sequence_parallel=false",
    "checkpoint.async_save=false",
]


def config(shapes: list[str], switches: list[str], steps: int, extra: list[str]) -> Config:
    """A pre-norm GELU run of `steps` constant-lr steps in a temporary directory, bf16."""
    return smoke_config(steps, *shapes, "train.dtype=bf16", *switches, *extra, base=None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(step, device: torch.device, warmup: int, steps: int) -> list[float]:
    """Seconds of each of `steps` calls of `step` after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def throughput(cfg: Config, seconds: list[float], peak_tflops: float) -> dict[str, float]:
    """tokens/s, model TFLOP/s and MFU of the median step."""
    tokens = cfg.train.global_batch * cfg.data.seq_len
    s = statistics.median(seconds)
    tflops = flops_per_token(cfg, cfg.data.vocab_size) * tokens / s / 1e12
    return {"step_s": s, "tokens_per_s": tokens / s, "tflops": tflops, "mfu": tflops / peak_tflops}


def reference_run(cfg: Config, device: torch.device, warmup: int, steps: int) -> list[float]:
    """Step times of the plain model: bf16 weights, SDPA, fused AdamW, torch.compile (GPU)."""
    m, t = cfg.model, cfg.train
    ffn = int(m.ffn_mult * m.d_model)
    ref = RefGPT(cfg.data.vocab_size, m.d_model, m.n_layers, m.n_heads, ffn)
    cuda = device.type == "cuda"
    ref = ref.to(device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, fused=cuda, foreach=not cuda)
    model = torch.compile(ref) if cuda else ref
    n_micro = t.global_batch // t.micro_batch
    shape = (t.micro_batch, cfg.data.seq_len)
    x = torch.randint(0, cfg.data.vocab_size, shape, device=device)
    y = torch.randint(0, cfg.data.vocab_size, shape, device=device)

    def step() -> None:
        for _ in range(n_micro):
            logits = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()) / n_micro
            loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _timed(step, device, warmup, steps)  # the model is freed on return


def ours_run(cfg: Config, device: torch.device, warmup: int, steps: int) -> list[float]:
    """Step times of our Trainer step (the engine with the configured fast paths)."""
    trainer = Trainer(cfg, callbacks=[])
    times = _timed(trainer.train_step, device, warmup, steps)
    del trainer
    return times


def losses(cfg: Config, steps: int) -> list[float]:
    """Training losses of `steps` steps of `cfg` (same seed, same batches for every config)."""
    trainer = Trainer(cfg, callbacks=[])
    out = [trainer.train_step()["loss"] for _ in range(steps)]
    del trainer
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-tiny", action="store_true", help="tiny shapes on CPU, few steps")
    parser.add_argument("--json", default="", help="write the figures here")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default 10; tiny 3)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps (default 3; tiny 1)")
    parser.add_argument("--check-steps", type=int, default=5, help="steps of the loss check")
    parser.add_argument("--rtol", type=float, default=2e-2, help="loss tolerance, fast vs plain")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak/GPU")
    parser.add_argument("overrides", nargs="*", help="section.key=value for every run")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    tiny = args.cpu_tiny
    if not tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --cpu-tiny")
    device = torch.device("cpu" if tiny else "cuda")
    dev = ["train.device=cpu", "parallel.backend=gloo"] if tiny else ["train.device=cuda"]
    extra = [*dev, *args.overrides]
    fast = FAST_CPU if tiny else FAST_GPU
    steps, warmup = args.steps or (3 if tiny else 10), args.warmup or (1 if tiny else 3)
    shapes = SHAPES_TINY if tiny else SHAPES_1B
    bench = config(shapes, fast, warmup + steps, extra)
    ref = throughput(bench, reference_run(bench, device, warmup, steps), args.peak_tflops)
    ours = throughput(bench, ours_run(bench, device, warmup, steps), args.peak_tflops)
    n = args.check_steps
    plain_losses = losses(config(SHAPES_TINY, PLAIN, n, extra), n)
    fast_losses = losses(config(SHAPES_TINY, fast, n, extra), n)
    rel = max(abs(a - b) / abs(b) for a, b in zip(fast_losses, plain_losses))
    figures = {
        "device": torch.cuda.get_device_name() if not tiny else "cpu (--cpu-tiny)",
        "shapes": shapes,
        "fast_switches": fast,
        "steps": steps,
        "warmup": warmup,
        "peak_tflops": args.peak_tflops,
        "ours": ours,
        "reference": ref,
        "ratio": ours["tokens_per_s"] / ref["tokens_per_s"],
        "check": {
            "plain_losses": plain_losses,
            "fast_losses": fast_losses,
            "max_rel_diff": rel,
            "rtol": args.rtol,
            "ok": rel <= args.rtol and all(map(math.isfinite, fast_losses + plain_losses)),
        },
    }
    print(f"{'':10} {'tokens/s':>12} {'TFLOP/s':>9} {'MFU':>7} {'step s':>8}")
    for name in ("ours", "reference"):
        f = figures[name]
        print(
            f"{name:10} {f['tokens_per_s']:12,.0f} {f['tflops']:9.2f} {f['mfu']:7.2%} "
            f"{f['step_s']:8.3f}"
        )
    print(f"ratio={figures['ratio']:.3f} (ours / reference tokens/s)")
    check = figures["check"]
    print(
        f"fast vs plain losses over {n} steps: max rel diff {rel:.2e} (rtol {args.rtol}) "
        f"{'OK' if check['ok'] else 'FAILED'}"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    sys.exit(0 if main()["check"]["ok"] else 1)
