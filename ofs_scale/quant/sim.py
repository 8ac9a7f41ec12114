"""Fake-quantise a model in place for the length of a `with` block, without touching its classes.

Weights of every linear layer are swapped for their quantised round trip (int8, FP8 or INT4,
as the spec's `wfmt` says) on entry and the fp32 originals are copied back on exit.
Activations are rounded by forward (pre-)hooks (uint8 or FP8, as `afmt` says):

* scope `linear`: the input of every linear layer (megatron-core Column/RowParallelLinear,
  including the unembedding unless `head=False`);
* scope `all` adds the residual stream (the embedding output, every block output, the residual
  `h` between attention and MLP inside every block, which both the skip path and the MLP branch
  then read rounded, and the input of every norm) and the attention probabilities, which need an
  explicit softmax (see `_QuantAttentionF`). Queries, keys and values entering the attention
  matmuls stay in floating point.

Static activation ranges come from `calibrate` (min-max, reduced over tensor- and data-parallel
ranks so every layout quantises with the ranges of the single-process model).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from ofs_scale.model import blocks
from ofs_scale.parallel.tp import is_tp_sharded, tp_partition_dim
from ofs_scale.quant.fake import (
    fake_fp8,
    fake_quant_asym,
    fake_quant_dynamic,
    fake_quant_weight,
    token_range,
)
from ofs_scale.quant.spec import QuantSpec

Group = dist.ProcessGroup | None
# transform(site name, activation, TP group its last dim is split over) -> replacement or None
Transform = Callable[[str, torch.Tensor, Group], "torch.Tensor | None"]
ATTN_PROBS = "attn_probs"


@dataclass
class Sites:
    """Where a model gets quantised: (name, module, TP group the activation is split over)."""

    linears: list[tuple[str, nn.Module]]
    inputs: list[tuple[str, nn.Module, Group]]
    outputs: list[tuple[str, nn.Module]]


def find_sites(chunks: list[nn.Module], scope: str, head: bool, tp_group: Group) -> Sites:
    """The quantisation sites of this rank's model chunks, in a rank-independent order."""
    linears, inputs, outputs = [], [], []
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    for chunk in chunks:
        for name, mod in chunk.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(mod, ColumnParallelLinear | RowParallelLinear):
                if leaf == "head" and not head:
                    continue
                split = isinstance(mod, RowParallelLinear) and mod.input_is_parallel and tp > 1
                linears.append((name, mod))
                inputs.append((f"{name}:in", mod, tp_group if split else None))
            elif scope == "all" and leaf in ("norm1", "norm2", "final_norm"):
                inputs.append((f"{name}:in", mod, None))
            elif scope == "all" and (
                isinstance(mod, blocks.Block) or leaf in ("embed_tap", "mid_tap")
            ):
                outputs.append((f"{name}:out", mod))
    return Sites(linears, inputs, outputs)


@contextlib.contextmanager
def _activation_hooks(sites: Sites, transform: Transform) -> Iterator[None]:
    def pre_hook(name: str, group: Group):
        def hook(module, args, kwargs):
            new = transform(name, args[0], group)
            return None if new is None else ((new, *args[1:]), kwargs)

        return hook

    def post_hook(name: str):
        def hook(module, args, output):
            return transform(name, output, None)

        return hook

    handles = [
        mod.register_forward_pre_hook(pre_hook(name, group), with_kwargs=True)
        for name, mod, group in sites.inputs
    ]
    handles += [mod.register_forward_hook(post_hook(name)) for name, mod in sites.outputs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _QuantAttentionF:
    """Stands in for `torch.nn.functional` inside the blocks module: attention is computed with
    an explicit softmax so that its probabilities can be rounded; everything else delegates.

    The blocks call fused `scaled_dot_product_attention`, which never materialises the
    probabilities, so no hook can reach them; swapping the module's `F` for the length of the
    `with` block changes no class and is undone on exit."""

    def __init__(self, transform: Transform) -> None:
        self._transform = transform
        self.calls = 0

    def __getattr__(self, name: str):
        return getattr(torch.nn.functional, name)

    def scaled_dot_product_attention(
        self, q_BHTK, k_BHSK, v_BHSK, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None
    ) -> torch.Tensor:
        if attn_mask is not None or dropout_p:
            raise NotImplementedError("quantised attention supports causal masks only")
        self.calls += 1
        scale = scale if scale is not None else 1.0 / math.sqrt(q_BHTK.shape[-1])
        s_BHTS = (q_BHTK.float() @ k_BHSK.float().transpose(-2, -1)) * scale
        if is_causal:
            T, S = s_BHTS.shape[-2:]
            keep_TS = torch.ones(T, S, dtype=torch.bool, device=s_BHTS.device).tril()
            s_BHTS = s_BHTS.masked_fill(~keep_TS, float("-inf"))
        p_BHTS = self._transform(ATTN_PROBS, torch.softmax(s_BHTS, dim=-1), None)
        return (p_BHTS @ v_BHSK.float()).to(v_BHSK.dtype)


@contextlib.contextmanager
def _attention_probs(transform: Transform) -> Iterator[_QuantAttentionF]:
    proxy = _QuantAttentionF(transform)
    original = blocks.F
    blocks.F = proxy
    try:
        yield proxy
    finally:
        blocks.F = original


def _reduce(t: torch.Tensor, op: dist.ReduceOp, groups: list[Group]) -> None:
    for g in groups:
        if g is not None and dist.get_world_size(g) > 1:
            dist.all_reduce(t, op=op, group=g)


def calibrate(
    chunks: list[nn.Module],
    spec: QuantSpec,
    run_batches: Callable[[], None],
    tp_group: Group,
    dp_group: Group,
) -> dict[str, tuple[float, float]]:
    """Min-max range of every activation site while `run_batches()` runs the fp model, reduced
    over the tensor- and data-parallel groups. Attention probabilities need none: [0, 1]."""
    sites = find_sites(chunks, spec.scope, spec.head, tp_group)
    seen: dict[str, list[float]] = {}

    def observe(name: str, x: torch.Tensor, group: Group) -> None:
        lo, hi = float(x.detach().min()), float(x.detach().max())
        old = seen.get(name)
        seen[name] = [lo, hi] if old is None else [min(old[0], lo), max(old[1], hi)]

    with _activation_hooks(sites, observe):
        run_batches()
    names = sorted(seen)
    lo = torch.tensor([seen[n][0] for n in names], dtype=torch.float64)
    hi = torch.tensor([seen[n][1] for n in names], dtype=torch.float64)
    # Row-parallel inputs are split over TP, and batches over DP: the model-wide range needs both.
    _reduce(lo, dist.ReduceOp.MIN, [tp_group, dp_group])
    _reduce(hi, dist.ReduceOp.MAX, [tp_group, dp_group])
    return {n: (float(a), float(b)) for n, a, b in zip(names, lo, hi)}


def _act_transform(spec: QuantSpec, ranges: dict[str, tuple[float, float]]) -> Transform:
    fp8 = spec.afmt != "int8"

    def transform(name: str, x: torch.Tensor, group: Group) -> torch.Tensor:
        if spec.acts == "dynamic":
            if fp8:
                lo, hi = token_range(x, group)
                return fake_fp8(x, torch.maximum(-lo, hi), spec.afmt)
            return fake_quant_dynamic(x, group)
        if name == ATTN_PROBS:
            lo, hi = 0.0, 1.0
        elif name in ranges:
            lo, hi = ranges[name]
        else:
            raise KeyError(f"activation site {name} has no calibrated range; run calibrate first")
        if fp8:
            return fake_fp8(x, torch.tensor(max(-lo, hi)), spec.afmt)
        return fake_quant_asym(x, torch.tensor(lo), torch.tensor(hi))

    return transform


def _quantised_weight(p: torch.Tensor, spec: QuantSpec, tp_group: Group) -> torch.Tensor:
    group = tp_group if is_tp_sharded(p) else None
    dim = tp_partition_dim(p) if group else -1
    per_channel = spec.weights == "channel"
    return fake_quant_weight(p.data, per_channel, group, dim, spec.wfmt, spec.group_size)


@contextlib.contextmanager
def fake_quantized(
    chunks: list[nn.Module],
    spec: QuantSpec,
    ranges: dict[str, tuple[float, float]] | None = None,
    tp_group: Group = None,
) -> Iterator[None]:
    """Inside the block the model computes with int8-rounded weights and/or activations as
    `spec` says; on exit the fp weights are restored exactly and every hook is removed."""
    sites = find_sites(chunks, spec.scope, spec.head, tp_group)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    with contextlib.ExitStack() as stack:
        try:
            if spec.weights != "none":
                for _, mod in sites.linears:
                    if mod.weight is not None:
                        w = mod.weight
                        saved.append((w, w.data.clone()))
                        w.data.copy_(_quantised_weight(w, spec, tp_group))
                    else:  # tied unembedding: the embedding weight arrives as an argument
                        stack.enter_context(_tied_weight_hook(mod, spec, tp_group))
            proxy = None
            if spec.acts != "none":
                transform = _act_transform(spec, ranges or {})
                stack.enter_context(_activation_hooks(sites, transform))
                if spec.scope == "all":
                    proxy = stack.enter_context(_attention_probs(transform))
            yield
            if proxy is not None and proxy.calls == 0:
                raise RuntimeError(
                    "scope=all quantised no attention probabilities: the attention code no "
                    "longer calls F.scaled_dot_product_attention; update quant/sim.py"
                )
        finally:
            for w, original in saved:
                w.data.copy_(original)


@contextlib.contextmanager
def _tied_weight_hook(mod: nn.Module, spec: QuantSpec, tp_group: Group) -> Iterator[None]:
    def hook(module, args, kwargs):
        w = kwargs.get("weight")
        if w is None:
            return None
        return args, {**kwargs, "weight": _quantised_weight(w, spec, tp_group)}

    handle = mod.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
