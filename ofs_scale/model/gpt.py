"""Decoder-only transformer; the same class builds the whole model or one pipeline chunk.

Layers live in an `nn.ModuleDict` keyed by their global index ("0".."L-1"), so parameter names are
identical under any pipeline split and checkpoints load across layouts. Each submodule is
initialised from a generator seeded by (seed, its name), so weights do not depend on the layout.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
from collections.abc import Iterable

import torch
from torch import nn

from ofs_scale.config import ModelConfig
from ofs_scale.model.blocks import BLOCKS, MLP, Attention, BlockOptions, Tap, resolve_beta
from ofs_scale.model.compiled import DEFAULT_BACKEND, block_runner, compiled_forwards
from ofs_scale.model.layers import ParallelLayers
from ofs_scale.model.norms import build_norm
from ofs_scale.model.recompute import checkpointed


@contextlib.contextmanager
def seeded(seed: int, name: str):
    """Run the body with torch's CPU generator seeded by (seed, name), then restore it."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
        yield


def resolved(cfg: ModelConfig) -> dict:
    """activation, qk_norm and embed_norm as set, or the block type's defaults where unset."""
    spec = BLOCKS[cfg.block]
    return {
        "activation": spec.activation if cfg.activation is None else cfg.activation,
        "qk_norm": spec.qk_norm if cfg.qk_norm is None else cfg.qk_norm,
        "embed_norm": spec.embed_norm if cfg.embed_norm is None else cfg.embed_norm,
    }


class Embedding(nn.Module):
    """Token embedding, optional learned positions, optional LayerNorm (the OP block's)."""

    def __init__(self, cfg: ModelConfig, vocab: int, seq_len: int, layers: ParallelLayers) -> None:
        super().__init__()
        self.tok = layers.embedding(vocab, cfg.d_model, cfg.init_std)
        self.pos = nn.Embedding(seq_len, cfg.d_model) if cfg.position == "learned" else None
        if self.pos is not None:
            nn.init.normal_(self.pos.weight, std=cfg.init_std)
        self.norm = (
            nn.LayerNorm(cfg.d_model, bias=cfg.bias) if resolved(cfg)["embed_norm"] else None
        )
        for module in (self.pos, self.norm):
            if module is not None:
                layers.on_sequence_shard(module.parameters())
        self.positions = layers.local_positions

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """Embeddings of this rank's positions: all, or its part under sequence parallelism."""
        x_BTD = self.tok(tokens_BT)
        if self.pos is not None:
            x_BTD = x_BTD + self.pos.weight[self.positions(tokens_BT.shape[1])]
        return self.norm(x_BTD) if self.norm is not None else x_BTD


class GPT(nn.Module):
    """The model, or the chunk holding `layer_ids` (with the embedding if `first`, the final norm
    and head if `last`). Input: token ids (first chunk) or hidden states; output: vocab-parallel
    logits (last chunk) or hidden states."""

    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: int,
        seq_len: int,
        layers: ParallelLayers,
        seed: int = 0,
        layer_ids: Iterable[int] | None = None,
        first: bool = True,
        last: bool = True,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.factory = layers
        self.first, self.last = first, last
        self.recompute = False  # activation checkpointing of every block (model/recompute.py)
        self.compiled: dict = {}  # block key -> compiled forward (`compile_blocks`)
        ids = list(range(cfg.n_layers)) if layer_ids is None else list(layer_ids)
        r = resolved(cfg)
        block_cls = BLOCKS[cfg.block].cls
        std = cfg.init_std
        out_std = std / math.sqrt(2 * cfg.n_layers) if cfg.scale_out_init else std
        beta = resolve_beta(cfg.beta, cfg.n_layers)
        rope = cfg.rope_theta if cfg.position == "rope" else None
        d_ff = int(cfg.ffn_mult * cfg.d_model)
        if d_ff % layers.tp:
            raise ValueError(f"MLP width {d_ff} is not divisible by parallel.tp={layers.tp}")
        norm = functools.partial(
            build_norm, cfg.norm, cfg.d_model, cfg.bias, layers=layers, cfg=cfg
        )

        def make_norm() -> nn.Module:
            module = norm()
            layers.on_sequence_shard(module.parameters())  # norms act on the residual stream
            return module

        options = BlockOptions(make_norm, beta, cfg.beta_trainable)

        self.embed = None
        if first:
            with seeded(seed, "embed"):
                self.embed = Embedding(cfg, vocab_size, seq_len, layers)
        self.embed_tap = Tap()
        self.layers = nn.ModuleDict()
        for i in ids:
            with seeded(seed, f"layers.{i}"):
                attn = Attention(
                    cfg.d_model, cfg.n_heads, layers, std, out_std, cfg.bias, r["qk_norm"], rope
                )
                mlp = MLP(cfg.d_model, d_ff, r["activation"], layers, std, out_std, cfg.bias)
                self.layers[str(i)] = block_cls(attn, mlp, options)
                # a block's own parameters (OP's betas) scale what joins the residual stream
                layers.on_sequence_shard(self.layers[str(i)].parameters(recurse=False))
        self.final_norm = self.head = None
        self.final_tap = Tap()
        if last:
            with seeded(seed, "head"):
                if cfg.final_norm:
                    self.final_norm = make_norm()
                tied = cfg.tie_embeddings
                if tied and self.embed is None:
                    raise ValueError("tied embeddings need the embedding and head in one chunk")
                self.head = layers.head(cfg.d_model, vocab_size, std, tied)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed_tap(self.embed(x))
        recompute = self.recompute and self.training and torch.is_grad_enabled()
        for key, block in self.layers.items():
            run = block_runner(block, self.compiled.get(key), x)
            x = checkpointed(run, x) if recompute else run(x)
        if self.head is None:  # hidden states for the next pipeline stage, which P2P sends
            return x.contiguous()  # whole (the sequence-parallel stream is a transposed view)
        x = self.final_tap(x)
        if self.final_norm is not None:
            x = self.final_norm(x)
        weight = self.embed.tok.weight if self.cfg.tie_embeddings else None
        return self.head(x, weight=weight)

    def compile_blocks(self, backend: str = DEFAULT_BACKEND) -> None:
        """Regional torch.compile: each block compiled on its own (`train.compile`)."""
        self.compiled = compiled_forwards(self.layers, backend)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy from vocab-parallel logits."""
        return self.factory.cross_entropy(logits, targets).mean()
