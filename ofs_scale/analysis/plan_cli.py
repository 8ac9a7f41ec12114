"""Memory and step-time plan of a config on N GPUs; refuses a layout that does not fit.

    ofs-scale plan configs/op7b.yaml --gpus 64 --gpu-mem 80 [--mfu 0.4] [overrides ...]
    ofs-scale plan configs/op7b.yaml --gpus 64 --rank [--top 12]   # layouts, fastest first

Prints per-GPU bytes for parameters, gradients, optimizer state (SOAP/Shampoo factors and bases
included, ZeRO-1 sharding applied), master weights, activations with and without activation
checkpointing (sequence parallelism applied), host RAM for async checkpoint staging,
communication bytes per step, FLOPs per token, the step time at the given MFU and at the MFU
assumed for this layout (analysis/layouts.py). The GPU fast-path switches count as on CUDA
(`auto` = on). `--rank` lists every layout for the GPU count by assumed step time (exit 0 when
one fits, 4 when none does). Exit status 0: fits (with activation
checkpointing when the config has train.activation_checkpointing on); 3: fits only with
activation checkpointing, which the config leaves off; 4: does not fit (with what to change).
"""

from __future__ import annotations

import argparse
import warnings
from typing import TYPE_CHECKING

from rich.table import Table

from ofs_scale.cli_args import command_parser
from ofs_scale.console import console

if TYPE_CHECKING:  # torch-importing modules wait until the arguments are parsed
    from ofs_scale.analysis.plan import Plan

FITS, NEEDS_CHECKPOINTING, DOES_NOT_FIT = 0, 3, 4


def _gib(n: float) -> str:
    from ofs_scale.analysis.plan import GIB

    return f"{n / GIB:8.2f} GiB"


def report(p: Plan, gpu_mem_gib: float, reserve_gib: float, checkpointing: bool = False) -> int:
    """Print the plan table and verdict (`checkpointing`: the config turns it on); return the
    exit status."""
    from ofs_scale.analysis.plan import GIB

    table = Table(title=f"{p.gpus} GPUs: tp={p.tp} pp={p.pp} dp={p.dp} (fullest GPU)")
    table.add_column("item")
    table.add_column("per GPU", justify="right")
    weights = "bf16" if p.fast.get("master_weights") else "fp32"
    rows = [
        (f"parameters ({weights})", _gib(p.param_bytes)),
        ("gradients (fp32)", _gib(p.grad_bytes)),
        ("master weights (fp32, sharded)", _gib(p.master_bytes)),
        ("optimizer state (fp32)", _gib(p.optim_bytes)),
        ("activations, no checkpointing", _gib(p.act_bytes)),
        ("activations, full checkpointing", _gib(p.act_ckpt_bytes)),
        ("reserve (CUDA context, allocator)", _gib(reserve_gib * GIB)),
        ("total, no checkpointing", _gib(p.total(False) + reserve_gib * GIB)),
        ("total, checkpointing", _gib(p.total(True) + reserve_gib * GIB)),
        ("GPU memory", _gib(gpu_mem_gib * GIB)),
    ]
    for r in rows:
        table.add_row(*r)
    console.print(table)
    console.print(f"parameters: {p.total_params:,} total, {p.params:,} on the fullest GPU")
    console.print(f"FLOPs per token: {p.flops_per_token:.3e}")
    on = [k for k, v in p.fast.items() if v]
    console.print(f"GPU fast paths counted: {', '.join(on) or 'none'}")
    console.print(f"async checkpoint staging: {_gib(p.staging_bytes).strip()} host RAM per rank")
    comm = ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in p.comm_bytes.items())
    console.print(f"communication per step and GPU: {comm}")
    console.print(
        f"step: {p.tokens_per_step:,} tokens, {p.step_time_s:.2f} s at MFU {p.mfu:.0%} "
        f"({p.tokens_per_step / p.step_time_s:,.0f} tokens/s)"
    )
    budget = (gpu_mem_gib - reserve_gib) * GIB
    if p.total(False) <= budget:
        console.print("[green]fits[/green] without activation checkpointing")
        return FITS
    if p.total(True) <= budget:
        if checkpointing:
            console.print("[green]fits[/green] with activation checkpointing (on in the config)")
            return FITS
        console.print(
            "[yellow]fits only with activation checkpointing[/yellow]: "
            "set train.activation_checkpointing=true"
        )
        return NEEDS_CHECKPOINTING
    console.print(
        f"[red]does not fit[/red]: {_gib(p.total(True))} needed with checkpointing, "
        f"{_gib(budget)} available; raise parallel.tp or parallel.pp, keep optim.shard on with "
        "DP > 1, lower train.micro_batch or optim.max_precond_dim, or use more GPUs"
    )
    return DOES_NOT_FIT


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status described in the module docstring."""
    parser = command_parser("plan", __doc__)
    parser.add_argument("config", help="YAML config")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--gpus", type=int, required=True, help="total GPUs")
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak")
    parser.add_argument("--reserve", type=float, default=4.0, help="GiB kept free per GPU")
    parser.add_argument("--rank", action="store_true", help="rank every layout by step time")
    parser.add_argument("--top", type=int, default=12, help="layouts --rank prints")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    from ofs_scale.analysis.plan import plan
    from ofs_scale.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        if not 0 < args.mfu <= 1:
            raise ConfigError(f"--mfu {args.mfu} must be in (0, 1]")
        if args.rank:
            return _rank(cfg, args)
        p = plan(cfg, args.gpus, args.mfu, args.peak_tflops)
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    from ofs_scale.analysis.layouts import step_model

    s = step_model(cfg, p, args.peak_tflops)
    console.print(
        f"assumed for this layout: MFU {s.mfu:.1%}, {s.step_s:.2f} s per step (compute "
        f"{s.compute_s:.2f} s, exposed TP {s.tp_s:.2f} s, DP {s.dp_s:.2f} s, bubble {s.bubble:.1%})"
    )
    return report(p, args.gpu_mem, args.reserve, cfg.train.activation_checkpointing)


def _rank(cfg, args: argparse.Namespace) -> int:
    """`--rank`: the layouts table; FITS when the fastest layout fits, else DOES_NOT_FIT."""
    from ofs_scale.analysis.layouts import print_layouts, rank_layouts
    from ofs_scale.config import ConfigError

    ranked = rank_layouts(cfg, args.gpus, args.gpu_mem, args.reserve, args.peak_tflops)
    if not ranked:
        raise ConfigError(f"no tp x pp x micro-batch layout of this config fits {args.gpus} GPUs")
    print_layouts(ranked, args.gpus, args.top)
    return FITS if ranked[0].fits else DOES_NOT_FIT
