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
* FLOPs per token 6 N_matmul + 12 L T d (model/flops.py), and step time at a given MFU.

The GPU fast paths (config switches; the plan is for GPUs, so `auto` counts as on unless the
config pins train.device=cpu):

* `parallel.sequence_parallel` (tp > 1): the per-layer activations that are otherwise replicated
  over TP ranks (residual stream, norm inputs and outputs, the inputs of the column layers) are
  split along the sequence, so that part is divided by TP;
* `train.master_weights` (dtype bf16): bf16 weights (2 bytes/param), fp32 gradient buffers
  (4), and fp32 master weights (4) owned with the optimizer state, so sharded over DP with it;
* `checkpoint.async_save`: host RAM per rank for the CPU staging copy of that rank's share of
  the checkpoint (its weights, master weights and optimizer state);
* communication bytes per step and GPU (`comm_bytes`): DP gradient reduction and weight
  gather (reduce-to-owner with `parallel.overlap_grad_reduce` and a sharded optimizer; an
  all-reduce otherwise), TP activation collectives, PP sends. analysis/layouts.py turns them
  into an assumed MFU per layout and ranks layouts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ofs_scale.config import Config, OptimConfig, check_world, switch_on
from ofs_scale.config.checks import sequence_parallel_on
from ofs_scale.model.blocks import BLOCKS
from ofs_scale.model.flops import flops_per_token
from ofs_scale.model.gpt import resolved
from ofs_scale.model.shapes import param_count, stage_param_shapes
from ofs_scale.optim.registry import OPTIMIZER_SPECS
from ofs_scale.optim.sharded import assign_owners
from ofs_scale.parallel.tp import padded_vocab_size

GIB = 1024**3
F32 = 4
BF16 = 2


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
    """Optimizer state of the fullest DP rank (master weights apart, in master_bytes)."""
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
    master_bytes: int = 0
    """fp32 master weights the fullest DP rank owns (train.master_weights; 0 when off)."""
    staging_bytes: int = 0
    """Host RAM for the async checkpoint's CPU staging copy on one rank (0 when off)."""
    comm_bytes: dict[str, int] = field(default_factory=dict)
    """Bytes one GPU sends per step: `dp_reduce`, `dp_gather`, `tp`, `pp` (see comm_bytes)."""
    fast: dict[str, bool] = field(default_factory=dict)
    """The GPU fast paths counted: sequence_parallel, master_weights, overlap_grad_reduce,
    async_save (each resolved as on CUDA)."""
    micro_batch: int = 1
    n_micro: int = 1
    """Micro batches per DP rank and step."""

    @property
    def static_bytes(self) -> int:
        """Parameters + gradients + master weights + optimizer state."""
        return self.param_bytes + self.grad_bytes + self.master_bytes + self.optim_bytes

    def total(self, checkpointing: bool) -> int:
        return self.static_bytes + (self.act_ckpt_bytes if checkpointing else self.act_bytes)


def optimizer_state_numel(shape: tuple[int, ...], cfg: OptimConfig, name: str = "") -> int:
    """fp32 elements of optimizer state for one tensor of `shape` (step counter included);
    `name` matters to optimizers that route tensors by name (Muon's AdamW prefixes)."""
    return OPTIMIZER_SPECS[cfg.name].state_numel(shape, cfg, name)


def sharded_state_numel(
    shapes: list[tuple[str, tuple[int, ...]]], cfg: OptimConfig, dp: int, master: bool = False
) -> tuple[int, int]:
    """(optimizer-state elements, owned parameter elements) of the fullest DP rank under
    whole-tensor ownership; with `master` the owned parameters' fp32 masters count too."""
    named = [(n, torch.empty(s, device="meta")) for n, s in shapes]
    owners = assign_owners(named, OPTIMIZER_SPECS[cfg.name].cost, cfg, dp)
    state, owned = [0] * dp, [0] * dp
    for n, s in shapes:
        state[owners[n]] += optimizer_state_numel(s, cfg, n)
        owned[owners[n]] += math.prod(s)
    worst = max(range(dp), key=lambda r: state[r] + (owned[r] if master else 0))
    return state[worst], owned[worst]


def layer_activation_bytes(cfg: Config, tokens: int, sp: bool = False) -> int:
    """Bytes autograd keeps for one block's backward on one TP rank, for `tokens` tokens.

    Replicated over TP (fp32 residual stream, bf16 copies feeding the column layers): the two
    norm inputs (pre/post blocks) and the inputs of qkv and MLP-up; sequence parallelism (`sp`)
    splits this part along the sequence, dividing it by TP. Split over TP: qkv output,
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
    if sp:
        replicated //= tp  # exact: tp divides n_heads, which divides d_model
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


def fast_paths(cfg: Config, dp: int) -> dict[str, bool]:
    """The GPU fast paths of `cfg` as they resolve with `dp` data-parallel ranks: on CUDA,
    unless the config pins train.device=cpu."""
    p, t = cfg.parallel, cfg.train
    cuda = t.device != "cpu"
    return {
        "sequence_parallel": sequence_parallel_on(cfg, cuda),
        "master_weights": switch_on(t.master_weights, cuda, requires=t.dtype == "bf16"),
        "overlap_grad_reduce": switch_on(p.overlap_grad_reduce, cuda, requires=dp > 1),
        "async_save": switch_on(cfg.checkpoint.async_save, cuda),
    }


def comm_bytes(cfg: Config, dp: int, params: int, n_micro: int, fast: dict[str, bool]) -> dict:
    """Bytes one GPU sends per step: `dp_reduce` and `dp_gather` for the gradients and weights
    of its `params`, `tp` for the activation collectives of its layers, `pp` for the
    stage-boundary sends.

    DP, per parameter, times (dp-1)/dp: a sharded optimizer with overlap_grad_reduce reduces
    each gradient to its owner (g bytes: 4 fp32, 2 with grad_reduce_dtype bf16) and the owners
    send the updated weights (w: 2 bf16 with master weights, else 4); without overlap the
    gradients are all-reduced (2g); an unsharded optimizer all-reduces only (2g). So 12 bytes per
    parameter on the plain fp32 path, 2 + 2 on the fast bf16 path. TP: per layer and micro batch
    two all-reduces forward and two backward of a tokens x d activation, 2(tp-1)/tp of it each
    (with sequence parallelism the all-gather + reduce-scatter pairs move the same bytes), one
    more forward with activation checkpointing. PP: the activation forward, its gradient back."""
    p, t, m = cfg.parallel, cfg.train, cfg.model
    shard = dp > 1 if cfg.optim.shard is None else cfg.optim.shard
    g = BF16 if p.grad_reduce_dtype == "bf16" else F32
    w = BF16 if fast["master_weights"] else F32
    if shard and dp > 1:
        reduce, gather = (g if fast["overlap_grad_reduce"] else 2 * g), w
    else:
        reduce, gather = 2 * g, 0
    act = t.micro_batch * cfg.data.seq_len * m.d_model * (BF16 if t.dtype == "bf16" else F32)
    passes = 6 if t.activation_checkpointing else 4
    layers = math.ceil(m.n_layers / p.pp)
    tp = layers * n_micro * passes * 2 * (p.tp - 1) * act // p.tp
    boundary = act // p.tp if fast["sequence_parallel"] else act
    return {
        "dp_reduce": params * reduce * (dp - 1) // dp,
        "dp_gather": params * gather * (dp - 1) // dp,
        "tp": tp,
        "pp": 2 * n_micro * boundary if p.pp > 1 else 0,
    }


def _stage_state(cfg: Config, dp: int, master: bool, cache: dict | None) -> list[dict]:
    """Per pipeline stage: parameter numel, optimizer-state and owned-parameter numel of the
    fullest DP rank; memoised in `cache` (the layouts search asks for the same shapes often)."""
    p = cfg.parallel
    shard = dp > 1 if cfg.optim.shard is None else cfg.optim.shard
    key = (p.tp, p.pp, p.virtual_stages, dp, shard, master)
    if cache is not None and key in cache:
        return cache[key]
    rows = []
    for shapes in stage_param_shapes(cfg, cfg.data.vocab_size):
        numel = sum(math.prod(sh) for _, sh in shapes)
        if shard and dp > 1:
            optim, owned = sharded_state_numel(shapes, cfg.optim, dp, master)
        else:
            optim = sum(optimizer_state_numel(sh, cfg.optim, n) for n, sh in shapes)
            owned = numel
        rows.append({"params": numel, "optim": optim, "owned": owned})
    if cache is not None:
        cache[key] = rows
    return rows


def plan(
    cfg: Config,
    gpus: int,
    mfu: float = 0.4,
    peak_tflops: float = 989.0,
    cache: dict | None = None,
) -> Plan:
    """The plan of `cfg` on `gpus` GPUs (ConfigError when the layout cannot be formed);
    `cache` (a dict) memoises shapes and counts across calls for configs that differ only in
    layout (tp, pp, micro batch, checkpointing)."""
    p, t = cfg.parallel, cfg.train
    dp = check_world(cfg, gpus)
    fast = fast_paths(cfg, dp)
    master = fast["master_weights"]
    vocab = cfg.data.vocab_size
    tokens_micro = t.micro_batch * cfg.data.seq_len
    layer_act = layer_activation_bytes(cfg, tokens_micro, fast["sequence_parallel"])
    n_flight = in_flight_micro_batches(cfg, dp)
    layers_per_stage = math.ceil(cfg.model.n_layers / p.pp)
    logits = tokens_micro * padded_vocab_size(vocab, p.tp) // p.tp * F32 * 2
    # the block input kept under checkpointing is a residual-stream tensor: split by SP too
    ckpt_input = tokens_micro * cfg.model.d_model * F32
    if fast["sequence_parallel"]:
        ckpt_input //= p.tp
    weight = BF16 if master else F32
    rows = []
    for s, st in enumerate(_stage_state(cfg, dp, master, cache)):
        head = logits if s == p.pp - 1 else 0
        rows.append(
            {
                "params": st["params"],
                "optim": st["optim"] * F32,
                "master": st["owned"] * F32 if master else 0,
                "act": n_flight * layers_per_stage * layer_act + head,
                "act_ckpt": n_flight * layers_per_stage * ckpt_input + layer_act + head,
                "stage": s,
            }
        )
    worst = max(
        rows, key=lambda r: r["params"] * (weight + F32) + r["master"] + r["optim"] + r["act"]
    )
    if cache is None or "total_params" not in cache:  # the same for every layout
        total = param_count(cfg, vocab)
        cache = {} if cache is None else cache
        cache["total_params"] = total
    total_params = cache["total_params"]
    fpt = flops_per_token(cfg, vocab)
    tokens_step = t.global_batch * cfg.data.seq_len
    step_time = fpt * tokens_step / (gpus * peak_tflops * 1e12 * mfu)
    n_micro = t.global_batch // (t.micro_batch * dp)
    param_bytes = worst["params"] * weight
    staging = param_bytes + worst["master"] + worst["optim"] if fast["async_save"] else 0
    return Plan(
        gpus=gpus,
        tp=p.tp,
        pp=p.pp,
        dp=dp,
        params=worst["params"],
        param_bytes=param_bytes,
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
        master_bytes=worst["master"],
        staging_bytes=staging,
        comm_bytes=comm_bytes(cfg, dp, worst["params"], n_micro, fast),
        fast=fast,
        micro_batch=t.micro_batch,
        n_micro=n_micro,
    )
