"""Per-GPU memory and step-time plan of a config on N GPUs, without allocating the model.

Parameter shapes come from the model built on the meta device at TP=1, cut by TP the way the
megatron-core layers cut them (vocabulary padded per TP size) and assigned to pipeline stages like
`parallel/plan.py`. From those shapes:

* parameters and gradients: fp32 (weights stay fp32 under bf16 autocast);
* optimizer state, fp32, per TP shard of shape m x n (`matrix_shape`: rows x the rest), as each
  optimizer's registry entry states it (`OptimizerSpec.state_numel`, optim/registry.py):
  AdamW 2mn; SOAP 2mn + L m^2 + QL m^2 + R n^2 + QR n^2 (a side longer than max_precond_dim gets
  neither factor nor basis); Shampoo 2mn + per block of at most max_precond_dim rows/columns
  (bm x bn) L, R and their roots: 2 bm^2 + 2 bn^2; plus a 4-byte step counter per tensor.
  With ZeRO-1 (`optim.shard`, default on for DP > 1) each DP rank keeps only the tensors it owns,
  assigned by the same cost-balanced rule as `ShardedOptimizer`; the plan reports the fullest rank;
* activations per micro batch and layer, counted as the tensors autograd keeps (see
  `layer_activation_bytes`), times the micro batches a 1F1B stage holds in flight; with activation
  checkpointing only each layer's input is kept plus one layer's full set during recompute;
* FLOPs per token 6 N_matmul + 12 L T d (attention scores), and step time at a given MFU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ofs_scale.config import Config, OptimConfig, check_world
from ofs_scale.model.blocks import BLOCKS
from ofs_scale.model.gpt import resolved
from ofs_scale.model.shapes import param_count, stage_param_shapes
from ofs_scale.optim.registry import OPTIMIZER_SPECS
from ofs_scale.optim.sharded import assign_owners
from ofs_scale.parallel.tp import padded_vocab_size

GIB = 1024**3
F32 = 4


@dataclass
class Plan:
    """Bytes per GPU (the fullest pipeline stage and DP rank) and compute figures."""

    gpus: int
    tp: int
    pp: int
    dp: int
    params: int
    """Parameters on the fullest GPU (numel)."""
    param_bytes: int
    grad_bytes: int
    optim_bytes: int
    act_bytes: int
    """Activations without activation checkpointing."""
    act_ckpt_bytes: int
    """Activations with full activation checkpointing of every block."""
    total_params: int
    flops_per_token: float
    tokens_per_step: int
    step_time_s: float
    mfu: float
    per_stage: list[dict[str, int]] = field(default_factory=list)

    @property
    def static_bytes(self) -> int:
        """Parameters + gradients + optimizer state."""
        return self.param_bytes + self.grad_bytes + self.optim_bytes

    def total(self, checkpointing: bool) -> int:
        return self.static_bytes + (self.act_ckpt_bytes if checkpointing else self.act_bytes)


def optimizer_state_numel(shape: tuple[int, ...], cfg: OptimConfig, name: str = "") -> int:
    """fp32 elements of optimizer state for one tensor of `shape` (step counter included);
    `name` matters to optimizers that route tensors by name (Muon's AdamW prefixes)."""
    return OPTIMIZER_SPECS[cfg.name].state_numel(shape, cfg, name)


def sharded_state_numel(
    shapes: list[tuple[str, tuple[int, ...]]], cfg: OptimConfig, dp: int
) -> int:
    """Optimizer-state elements of the fullest DP rank under whole-tensor ownership."""
    named = [(n, torch.empty(s, device="meta")) for n, s in shapes]
    owners = assign_owners(named, OPTIMIZER_SPECS[cfg.name].cost, cfg, dp)
    per_rank = [0] * dp
    for n, s in shapes:
        per_rank[owners[n]] += optimizer_state_numel(s, cfg, n)
    return max(per_rank)


def layer_activation_bytes(cfg: Config, tokens: int) -> int:
    """Bytes autograd keeps for one block's backward on one TP rank, for `tokens` tokens.

    Replicated over TP (fp32 residual stream, bf16 copies feeding the column layers): the two
    norm inputs (pre/post blocks) and the inputs of qkv and MLP-up. Split over TP: qkv output,
    normed and rotated q and k, the attention output (SDPA keeps out + logsumexp), the MLP
    hidden before and after the activation (and the gate for SwiGLU)."""
    m, tp = cfg.model, cfg.parallel.tp
    half = 2 if cfg.train.dtype == "bf16" else F32
    d, f = m.d_model, int(m.ffn_mult * m.d_model)
    norms = BLOCKS[m.block].cls.num_norms * d * F32
    replicated = norms + 2 * d * half
    gate = f if resolved(m)["activation"] == "swiglu" else 0
    qk = 2 * d if resolved(m)["qk_norm"] else 0
    split = (3 * d + qk + 2 * d + 2 * d + 2 * f + gate) * half
    return tokens * (replicated + split // tp)


def in_flight_micro_batches(cfg: Config, dp: int) -> int:
    """Micro batches whose activations the first pipeline stage holds at once (1F1B: pp)."""
    t, p = cfg.train, cfg.parallel
    n_micro = t.global_batch // (t.micro_batch * dp)
    if p.pp == 1:
        return 1
    if p.schedule == "gpipe":
        return n_micro
    return min(n_micro, p.pp * (2 if p.virtual_stages > 1 else 1))


def flops_per_token(cfg: Config, total_params: int, embed_params: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters + 12 L T d for attention scores."""
    m = cfg.model
    return 6.0 * (total_params - embed_params) + 12.0 * m.n_layers * cfg.data.seq_len * m.d_model


def plan(cfg: Config, gpus: int, mfu: float = 0.4, peak_tflops: float = 989.0) -> Plan:
    """The plan of `cfg` on `gpus` GPUs (ValueError when the layout cannot be formed)."""
    p = cfg.parallel
    dp = check_world(cfg, gpus)
    vocab = cfg.data.vocab_size
    stages = stage_param_shapes(cfg, vocab)
    shard = dp > 1 if cfg.optim.shard is None else cfg.optim.shard
    tokens_micro = cfg.train.micro_batch * cfg.data.seq_len
    layer_act = layer_activation_bytes(cfg, tokens_micro)
    n_flight = in_flight_micro_batches(cfg, dp)
    layers_per_stage = math.ceil(cfg.model.n_layers / p.pp)
    logits = tokens_micro * padded_vocab_size(vocab, p.tp) // p.tp * F32 * 2
    rows = []
    for s, shapes in enumerate(stages):
        numel = sum(math.prod(sh) for _, sh in shapes)
        if shard and dp > 1:
            optim = sharded_state_numel(shapes, cfg.optim, dp)
        else:
            optim = sum(optimizer_state_numel(sh, cfg.optim, n) for n, sh in shapes)
        head = logits if s == p.pp - 1 else 0
        act = n_flight * layers_per_stage * layer_act + head
        ckpt_input = tokens_micro * cfg.model.d_model * F32
        act_ckpt = n_flight * layers_per_stage * ckpt_input + layer_act + head
        rows.append(
            {"params": numel, "optim": optim * F32, "act": act, "act_ckpt": act_ckpt, "stage": s}
        )
    worst = max(rows, key=lambda r: r["params"] * 2 * F32 + r["optim"] + r["act"])
    total_params = param_count(cfg, vocab)
    embed = padded_vocab_size(vocab, 1) * cfg.model.d_model
    fpt = flops_per_token(cfg, total_params, embed)
    tokens_step = cfg.train.global_batch * cfg.data.seq_len
    step_time = fpt * tokens_step / (gpus * peak_tflops * 1e12 * mfu)
    return Plan(
        gpus=gpus,
        tp=p.tp,
        pp=p.pp,
        dp=dp,
        params=worst["params"],
        param_bytes=worst["params"] * F32,
        grad_bytes=worst["params"] * F32,
        optim_bytes=worst["optim"],
        act_bytes=worst["act"],
        act_ckpt_bytes=worst["act_ckpt"],
        total_params=total_params,
        flops_per_token=fpt,
        tokens_per_step=tokens_step,
        step_time_s=step_time,
        mfu=mfu,
        per_stage=rows,
    )
