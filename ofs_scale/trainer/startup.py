"""What a run says about itself when it starts, and the model FLOP/s and MFU of each step.

`RunFacts` is built once by every rank (the parameter count is a collective over the pipeline
group); rank 0 prints it as one table: run, data, model, parameters, layout (DP x TP x PP and
micro batches per step), device and dtype, optimizer, steps, FLOPs per token and the peak MFU is
measured against. `step_throughput` turns a step's tokens and time into `model_tflops_per_s`
(per device) and `mfu` for metrics.jsonl, the console and wandb.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ofs_scale.config import Config, switch_on
from ofs_scale.console import print_summary
from ofs_scale.engine import Engine
from ofs_scale.model.flops import flops_per_token
from ofs_scale.model.shapes import count_params
from ofs_scale.parallel.mesh import Mesh

CUDA_PEAK_TFLOPS = 989.0
"""logging.peak_tflops=auto on CUDA: H100 SXM bf16 dense (the figure Megatron-LM and torchtitan
report MFU against)."""
CPU_PEAK_TFLOPS = 1.0
"""logging.peak_tflops=auto on CPU: a nominal 1 TFLOP/s, so CPU MFU reads as TFLOP/s."""


def peak_tflops(cfg: Config, cuda: bool) -> float:
    """Per-device peak TFLOP/s for MFU: logging.peak_tflops, or its `auto` value."""
    if cfg.logging.peak_tflops != "auto":
        return float(cfg.logging.peak_tflops)
    return CUDA_PEAK_TFLOPS if cuda else CPU_PEAK_TFLOPS


def model_param_count(engine: Engine, mesh: Mesh) -> int:
    """Parameters of the whole model as built (vocabulary padded for TP): this rank's chunks
    counted over TP, summed over the pipeline stages (collective over the pipeline group)."""
    full = sum(count_params(chunk, mesh.tp)[1] for chunk in engine.chunks)
    if mesh.pp == 1:
        return full
    total = torch.tensor([full], dtype=torch.float64, device=mesh.device)
    dist.all_reduce(total, group=mesh.pp_group)
    return int(total.item())


@dataclass
class RunFacts:
    """The numbers a run prints at start and measures its steps against."""

    num_params: int
    flops_per_token: float
    peak_tflops: float
    micro_batches: int

    @classmethod
    def build(cls, cfg: Config, mesh: Mesh, engine: Engine, vocab_size: int) -> RunFacts:
        t = cfg.train
        return cls(
            num_params=model_param_count(engine, mesh),
            flops_per_token=flops_per_token(cfg, vocab_size),
            peak_tflops=peak_tflops(cfg, mesh.device.type == "cuda"),
            micro_batches=t.global_batch // (t.micro_batch * mesh.dp),
        )

    def step_throughput(self, tokens: int, seconds: float, world_size: int) -> dict[str, float]:
        """Model TFLOP/s per device and MFU of a step of `tokens` tokens over all ranks."""
        tflops = self.flops_per_token * tokens / max(seconds, 1e-12) / world_size / 1e12
        return {"model_tflops_per_s": tflops, "mfu": tflops / self.peak_tflops}

    def rows(self, cfg: Config, mesh: Mesh) -> dict[str, Any]:
        """The start-up table's rows."""
        m, t, d = cfg.model, cfg.train, cfg.data
        data = ", ".join(f"{s.path} x{s.weight:g}" for s in d.datasets) or f"corpus {d.corpus}"
        bf16 = t.dtype == "bf16"
        masters = bf16 and switch_on(t.master_weights, mesh.device.type == "cuda")
        dtype = f"{t.dtype} ({'fp32 master weights' if masters else 'fp32 weights'})"
        stages = ", ".join(f"{s.name} {s.steps}" for s in t.stages)
        return {
            "run": f"{cfg.run.name} -> {cfg.run.out_dir}",
            "data": f"{data}; seq_len {d.seq_len}, vocab {d.vocab_size:,}",
            "model": (
                f"{m.block} block, {m.norm}, d_model {m.d_model}, {m.n_layers} layers, "
                f"{m.n_heads} heads"
            ),
            "parameters": f"{self.num_params:,}",
            "layout": (
                f"DP {mesh.dp} x TP {mesh.tp} x PP {mesh.pp} = {mesh.world_size} processes, "
                f"engine {t.engine}"
            ),
            "batch": (
                f"{t.global_batch} sequences = {self.micro_batches} micro batches of "
                f"{t.micro_batch} per DP rank, {t.global_batch * d.seq_len:,} tokens/step"
            ),
            "device, dtype": f"{mesh.device} ({mesh.backend}), {dtype}",
            "optimizer": f"{cfg.optim.name}, lr {cfg.optim.lr:g}, clip {t.grad_clip:g}",
            "steps": f"{cfg.total_steps:,} ({stages})",
            "model FLOPs/token": f"{self.flops_per_token:.3e} (6N + 12LTd)",
            "MFU against": f"{self.peak_tflops:g} TFLOP/s per device (logging.peak_tflops)",
        }

    def print(self, cfg: Config, mesh: Mesh) -> None:
        """The start-up table, on the logging rank."""
        if mesh.is_logging_rank:
            print_summary(self.rows(cfg, mesh), title=f"run {cfg.run.name}")
