"""Assumed MFU per parallel layout, and the layouts of a config ranked by step time.

Nothing here is measured: it is a stated model, so that the planner can compare layouts before
any GPU time is spent. A step on one GPU takes

    compute   = hardware FLOPs / (peak * BASE_MFU * gemm)
    tp        = TP bytes / tp bandwidth * exposed share (all of it without SP, TP_EXPOSED_SP with)
    per micro = (compute + tp) / micro batches, and the pipeline adds (pp - 1) of them: bubble
                (pp - 1) / (m v + pp - 1) of the step for m micro batches and v virtual stages
    reduce    = DP gradient bytes / dp bandwidth; with overlap_grad_reduce only what the backward
                pass (2/3 of compute) cannot hide is exposed, and at least DP_EXPOSED_OVERLAP
    dp        = exposed reduce + DP weight-gather bytes / dp bandwidth (after the update: exposed)
    step      = (compute + tp) * (m v + pp - 1) / (m v) + dp
    MFU       = model FLOPs / (peak * step)

Assumptions and why:
* BASE_MFU 0.55: the share of bf16 dense peak that large GEMMs plus flash attention reach on an
  H100 in a well-fused step; the best published 7B dense runs report 0.5-0.6.
* gemm = f(micro batch * seq) * f(d_model / tp), f(n) = n / (n + GEMM_KNEE), GEMM_KNEE 128:
  a GEMM with a short side pays a fixed cost (launch, partial tile waves, epilogue) worth about
  128 rows of work, so micro batch 1 and wide TP (narrow shards) lose efficiency.
* hardware FLOPs are the model FLOPs, 4/3 of them with activation checkpointing (the forward
  pass runs twice: 8 N instead of 6 N).
* TP traffic stays inside a node over NVLink at NVLINK_BPS when tp <= GPUs per node (else over
  InfiniBand at IB_BPS); without sequence parallelism every TP all-reduce sits between two
  GEMMs and is exposed; with it the all-gather / reduce-scatter pairs overlap the neighbouring
  GEMMs (CUDA_DEVICE_MAX_CONNECTIONS=1 keeps them ordered), and TP_EXPOSED_SP remains.
* DP traffic crosses nodes over InfiniBand (IB_BPS, one 400 Gb/s NIC per GPU) once the DP group
  spans more than one node, else NVLink; bucketed reduction overlapped with backward hides all
  but DP_EXPOSED_OVERLAP of it (the last bucket), when backward lasts long enough; the owners'
  weight gather follows the update and nothing overlaps it.
* The optimizer update and PP sends are left out: SOAP's eigendecompositions are amortised over
  precondition_frequency steps and shared out by ZeRO-1 ownership; PP sends are tokens x d.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ofs_scale.analysis.plan import GIB, Plan, plan
from ofs_scale.config import Config, ConfigError

BASE_MFU = 0.55
GEMM_KNEE = 128
NVLINK_BPS = 300e9
IB_BPS = 50e9
TP_EXPOSED_SP = 0.3
DP_EXPOSED_OVERLAP = 0.1
GPUS_PER_NODE = 8


@dataclass
class StepModel:
    """Assumed step time of one layout and the terms it is made of (seconds)."""

    compute_s: float
    tp_s: float
    dp_s: float
    bubble: float
    """Share of the step the pipeline idles: (pp - 1) / (m v + pp - 1)."""
    step_s: float
    mfu: float


def _gemm_efficiency(n: int) -> float:
    return n / (n + GEMM_KNEE)


def step_model(
    cfg: Config, p: Plan, peak_tflops: float = 989.0, gpus_per_node: int = GPUS_PER_NODE
) -> StepModel:
    """The assumed step time and MFU of `cfg` laid out as `p` (see the module docstring)."""
    peak = peak_tflops * 1e12
    model_flops = p.flops_per_token * p.tokens_per_step / p.gpus
    hw_flops = model_flops * (4 / 3 if cfg.train.activation_checkpointing else 1)
    gemm = _gemm_efficiency(p.micro_batch * cfg.data.seq_len)
    gemm *= _gemm_efficiency(cfg.model.d_model // p.tp)
    compute = hw_flops / (peak * BASE_MFU * gemm)
    tp_bw = NVLINK_BPS if p.tp <= gpus_per_node else IB_BPS
    tp_exposed = TP_EXPOSED_SP if p.fast["sequence_parallel"] else 1.0
    tp = p.comm_bytes["tp"] / tp_bw * tp_exposed
    dp_bw = NVLINK_BPS if p.tp * p.dp <= gpus_per_node else IB_BPS
    reduce = p.comm_bytes["dp_reduce"] / dp_bw
    if p.fast["overlap_grad_reduce"]:
        reduce = max(DP_EXPOSED_OVERLAP * reduce, reduce - compute * 2 / 3)
    dp = reduce + p.comm_bytes["dp_gather"] / dp_bw
    slots = p.n_micro * cfg.parallel.virtual_stages
    bubble = (p.pp - 1) / (slots + p.pp - 1)
    step = (compute + tp) / (1 - bubble) + dp
    return StepModel(compute, tp, dp, bubble, step, model_flops / (peak * step))


@dataclass
class Layout:
    """One candidate layout with its plan and assumed step."""

    checkpointing: bool
    plan: Plan
    step: StepModel
    fits: bool

    @property
    def tp(self) -> int:
        return self.plan.tp

    @property
    def pp(self) -> int:
        return self.plan.pp

    @property
    def dp(self) -> int:
        return self.plan.dp

    @property
    def micro_batch(self) -> int:
        return self.plan.micro_batch

    @property
    def total_bytes(self) -> int:
        return self.plan.total(self.checkpointing)


def _with(cfg: Config, tp: int, pp: int, micro_batch: int, checkpointing: bool) -> Config:
    c = copy.deepcopy(cfg)
    c.parallel.tp, c.parallel.pp = tp, pp
    c.train.micro_batch, c.train.activation_checkpointing = micro_batch, checkpointing
    return c


def rank_layouts(
    cfg: Config,
    gpus: int,
    gpu_mem_gib: float = 80.0,
    reserve_gib: float = 4.0,
    peak_tflops: float = 989.0,
    gpus_per_node: int = GPUS_PER_NODE,
) -> list[Layout]:
    """Every layout of `cfg` on `gpus` GPUs (tp within a node dividing n_heads, pp dividing
    n_layers, micro batch 1-8, activation checkpointing off/on) that check_world accepts,
    fastest first, those that fit in memory before those that do not."""
    m = cfg.model
    budget = (gpu_mem_gib - reserve_gib) * GIB
    cache: dict = {}
    found = []
    for tp in (1, 2, 4, 8):
        if tp > gpus_per_node or m.n_heads % tp:
            continue
        for pp in (1, 2, 4, 8):
            if m.n_layers % pp or gpus % (tp * pp):
                continue
            for mb in (1, 2, 4, 8):
                for ckpt in (False, True):
                    c = _with(cfg, tp, pp, mb, ckpt)
                    try:
                        p = plan(c, gpus, peak_tflops=peak_tflops, cache=cache)
                    except ConfigError:
                        continue
                    s = step_model(c, p, peak_tflops, gpus_per_node)
                    fits = p.total(ckpt) <= budget
                    found.append(Layout(ckpt, p, s, fits))
    return sorted(found, key=lambda x: (not x.fits, x.step.step_s))


def print_layouts(ranked: list[Layout], gpus: int, top: int) -> None:
    """The `top` fastest layouts as a table (`ofs-scale plan --rank`)."""
    from rich.table import Table

    from ofs_scale.console import console

    table = Table(title=f"layouts on {gpus} GPUs, fastest first (assumed MFU)")
    for col in ("tp", "pp", "dp", "micro", "ckpt", "GiB/GPU", "fits", "MFU", "step s", "bubble"):
        table.add_column(col, justify="right")
    for x in ranked[:top]:
        table.add_row(
            *map(str, (x.tp, x.pp, x.dp, x.micro_batch, "on" if x.checkpointing else "off")),
            f"{x.total_bytes / GIB:.1f}",
            "yes" if x.fits else "no",
            f"{x.step.mfu:.3f}",
            f"{x.step.step_s:.2f}",
            f"{x.step.bubble:.3f}",
        )
    console.print(table)
    console.print("assumptions: ofs_scale/analysis/layouts.py, docs/cluster.md")
