"""Attention, MLP and the three block types: Pre-Norm, Post-Norm, Outlier Protected (OP), one
`BLOCKS` entry each.

Shapes: B batch, T tokens, D model width, H heads on this TP rank, K head dim, F MLP width on
this TP rank.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from ofs_scale.model.layers import ParallelLayers


def _build_rope_tables(T: int, K: int, theta: float, device, dtype) -> tuple[torch.Tensor, ...]:
    inv = 1.0 / theta ** (torch.arange(0, K, 2, device=device, dtype=torch.float32) / K)
    ang_TK2 = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv)
    ang_TK = torch.cat([ang_TK2, ang_TK2], dim=-1)
    return ang_TK.cos().to(dtype), ang_TK.sin().to(dtype)


@functools.lru_cache(maxsize=16)
def _cached_rope_tables(T: int, K: int, theta: float, device, dtype) -> tuple[torch.Tensor, ...]:
    # plain tensors even when first asked for under inference_mode: training saves them for
    # the backward pass, which inference tensors refuse
    with torch.no_grad(), torch.inference_mode(False):
        return _build_rope_tables(T, K, theta, device, dtype)


def rope_tables(T: int, K: int, theta: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos_TK, sin_TK of RoPE for positions 0..T-1, built once per (T, K, theta, device, dtype)
    and shared by every layer and step. Inside a torch.compile region they are computed in the
    graph instead (the compiler folds them; a Python cache there would only add guards)."""
    if torch.compiler.is_compiling():
        return _build_rope_tables(T, K, theta, device, dtype)
    return _cached_rope_tables(T, K, theta, torch.device(device), dtype)


def apply_rope(x_BHTK: torch.Tensor, cos_TK: torch.Tensor, sin_TK: torch.Tensor) -> torch.Tensor:
    half = x_BHTK.shape[-1] // 2
    x1, x2 = x_BHTK[..., :half], x_BHTK[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x_BHTK * cos_TK + rotated * sin_TK


class Tap(nn.Identity):
    """A named point whose forward hooks see an activation (metrics attach here)."""


class HeadRMSNorm(nn.Module):
    """RMSNorm over head_dim with a learnable gain shared by all heads. Under TP each rank sees
    only its heads, so the gain's gradient is summed over the TP group."""

    def __init__(self, head_dim: int, layers: ParallelLayers) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim))
        self.factory = layers

    def forward(self, x_BHTK: torch.Tensor) -> torch.Tensor:
        weight = self.factory.replicated(self.weight)
        return F.rms_norm(x_BHTK, (x_BHTK.shape[-1],), weight=weight)


class Attention(nn.Module):
    """Causal multi-head self-attention with optional QK-RMSNorm and RoPE; heads split over TP."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        layers: ParallelLayers,
        std: float,
        out_std: float,
        bias: bool,
        qk_norm: bool,
        rope_theta: float | None,
    ) -> None:
        super().__init__()
        self.head_dim = d_model // n_heads
        self.local_heads = n_heads // layers.tp
        # Output features laid out (head, q/k/v, head_dim) so a TP split keeps whole heads.
        self.qkv = layers.column(d_model, 3 * d_model, bias, std)
        self.proj = layers.row(d_model, d_model, bias, out_std)
        self.q_norm = HeadRMSNorm(self.head_dim, layers) if qk_norm else nn.Identity()
        self.k_norm = HeadRMSNorm(self.head_dim, layers) if qk_norm else nn.Identity()
        self.rope_theta = rope_theta
        self.qk_tap = Tap()

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x_BTD)
        B, T = qkv.shape[:2]  # the whole sequence, also when x_BTD is its part (sequence parallel)
        qkv = qkv.view(B, T, self.local_heads, 3, self.head_dim)
        q_BHTK, k_BHTK, v_BHTK = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
        q_BHTK, k_BHTK = self.q_norm(q_BHTK), self.k_norm(k_BHTK)
        if self.rope_theta is not None:
            cos, sin = rope_tables(T, self.head_dim, self.rope_theta, x_BTD.device, q_BHTK.dtype)
            q_BHTK, k_BHTK = apply_rope(q_BHTK, cos, sin), apply_rope(k_BHTK, cos, sin)
        q_BHTK, k_BHTK = self.qk_tap((q_BHTK, k_BHTK))
        y_BHTK = F.scaled_dot_product_attention(q_BHTK, k_BHTK, v_BHTK, is_causal=True)
        return self.proj(y_BHTK.transpose(1, 2).reshape(B, T, self.local_heads * self.head_dim))


class MLP(nn.Module):
    """Two-layer MLP (GELU/ReLU) or SwiGLU; hidden units split over TP."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        activation: str,
        layers: ParallelLayers,
        std: float,
        out_std: float,
        bias: bool,
    ) -> None:
        super().__init__()
        self.activation = activation
        self.up = layers.column(d_model, d_ff, bias, std)
        self.gate = layers.column(d_model, d_ff, bias, std) if activation == "swiglu" else None
        self.down = layers.row(d_ff, d_model, bias, out_std)
        self.hidden = Tap()

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        u_BTF = self.up(x_BTD)
        if self.activation == "swiglu":
            h_BTF = F.silu(self.gate(x_BTD)) * u_BTF
        elif self.activation == "relu":
            h_BTF = F.relu(u_BTF)
        else:
            h_BTF = F.gelu(u_BTF)
        return self.down(self.hidden(h_BTF))


@dataclass
class BlockOptions:
    """What a block type may take besides attention and MLP (each type uses what it needs)."""

    make_norm: Callable[[], nn.Module]
    """A new norm layer of `model.norm` per call."""
    beta: float
    """Residual branch weight (OP)."""
    beta_trainable: bool
    """Learn beta, one scalar per branch (OP)."""


class Block(nn.Module):
    """Base of the block types: attention, MLP, and the tap on the residual stream between them
    (`mid_tap`, h below). Subclasses wire them; build one through `BLOCKS[model.block]`."""

    num_norms = 0
    """Norm layers in the block (the memory planner counts the inputs they keep)."""

    def __init__(self, attn: Attention, mlp: MLP) -> None:
        super().__init__()
        self.attn = attn
        self.mlp = mlp
        self.mid_tap = Tap()  # h, the residual stream between attention and MLP (quant scope all)


class PreNormBlock(Block):
    """Pre-Norm: h = x + Attn(N1(x)); out = h + MLP(N2(h))."""

    num_norms = 2

    def __init__(self, attn: Attention, mlp: MLP, options: BlockOptions) -> None:
        super().__init__(attn, mlp)
        self.norm1 = options.make_norm()
        self.norm2 = options.make_norm()

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        h = self.mid_tap(x_BTD + self.attn(self.norm1(x_BTD)))
        return h + self.mlp(self.norm2(h))


class PostNormBlock(PreNormBlock):
    """Post-Norm: h = N1(x + Attn(x)); out = N2(h + MLP(h))."""

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        h = self.mid_tap(self.norm1(x_BTD + self.attn(x_BTD)))
        return self.norm2(h + self.mlp(h))


class OPBlock(Block):
    """Outlier Protected: h = x + beta * Attn(x); out = h + beta * MLP(h). No norms (QK-norm
    sits inside Attn); beta is a float, or one trainable scalar per branch."""

    def __init__(self, attn: Attention, mlp: MLP, options: BlockOptions) -> None:
        super().__init__(attn, mlp)
        if options.beta_trainable:
            self.beta_attn = nn.Parameter(torch.tensor(float(options.beta)))
            self.beta_mlp = nn.Parameter(torch.tensor(float(options.beta)))
        else:
            self.beta_attn = self.beta_mlp = float(options.beta)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        h = self.mid_tap(x_BTD + self.beta_attn * self.attn(x_BTD))
        return h + self.beta_mlp * self.mlp(h)


@dataclass(frozen=True)
class BlockSpec:
    """One block type: its class (built as `cls(attn, mlp, options)`) and the defaults of the
    model options that depend on it (`model.gpt.resolved` applies them)."""

    cls: type[Block]
    activation: str
    """MLP activation when model.activation is unset."""
    qk_norm: bool
    """QK-RMSNorm when model.qk_norm is unset."""
    embed_norm: bool
    """LayerNorm on the embedding output when model.embed_norm is unset."""


# `model.block` -> its type. A leaf that ofs_scale.config reads for the allowed names, so this
# module imports nothing from the config (see optim/registry.py).
BLOCKS: dict[str, BlockSpec] = {
    "pre": BlockSpec(PreNormBlock, activation="gelu", qk_norm=False, embed_norm=False),
    "post": BlockSpec(PostNormBlock, activation="gelu", qk_norm=False, embed_norm=False),
    "op": BlockSpec(OPBlock, activation="relu", qk_norm=True, embed_norm=True),
}


def resolve_beta(beta: float | str, n_layers: int) -> float:
    return 1.0 / math.sqrt(n_layers) if beta == "auto" else float(beta)
