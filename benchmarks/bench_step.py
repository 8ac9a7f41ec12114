"""Tokens/s of one training step: ofs_scale's model + trainer vs a plain PyTorch reference.

The reference is a single-file Pre-Norm GPT of the same shapes (nn.Linear, RoPE, SDPA, GELU,
AdamW, grad clipping) fed the same batches. Steps alternate between the two in one process and
the medians are compared: prints `ratio=<ours/reference>` (target >= 0.95 on CPU).

    python benchmarks/bench_step.py [--steps 15] [section.key=value ...]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ofs_scale.config import load_config
from ofs_scale.data import collate
from ofs_scale.model.blocks import apply_rope, rope_tables
from ofs_scale.trainer.loop import Trainer


class RefBlock(nn.Module):
    def __init__(self, d: int, h: int, ff: int) -> None:
        super().__init__()
        self.h = h
        self.n1, self.n2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, ff, bias=False)
        self.down = nn.Linear(ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        K = D // self.h
        qkv = self.qkv(self.n1(x)).view(B, T, self.h, 3, K)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
        cos, sin = rope_tables(T, K, 10000.0, x.device, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.down(F.gelu(self.up(self.n2(x))))


class RefGPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, ff: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(RefBlock(d, heads, ff) for _ in range(layers))
        self.norm = nn.LayerNorm(d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for b in self.blocks:
            h = b(h)
        return self.head(self.norm(h))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    out = tempfile.mkdtemp()
    cfg = load_config(
        "configs/smoke.yaml",
        [
            f"run.out_dir={out}",
            "logging.wandb=disabled",
            "logging.progress=false",
            "metrics.every=0",
            *args.overrides,
        ],
    )
    trainer = Trainer(cfg, callbacks=[])
    m, t = cfg.model, cfg.train
    ref = RefGPT(
        trainer.engine.model.vocab_size,
        m.d_model,
        m.n_layers,
        m.n_heads,
        int(m.ffn_mult * m.d_model),
    )
    decay = [p for p in ref.parameters() if p.ndim >= 2]
    rest = [p for p in ref.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.optim.weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ],
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        foreach=True,
    )

    def ref_step() -> None:
        ids = trainer.sampler.rank_micro_batches(0)
        for x, y in (collate(trainer.train_split, i) for i in ids):
            loss = F.cross_entropy(ref(x).flatten(0, 1), y.flatten()) / len(ids)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    tokens = t.global_batch * cfg.data.seq_len
    ours, theirs = [], []
    for i in range(args.steps + 2):
        t0 = time.perf_counter()
        trainer.train_step()
        t1 = time.perf_counter()
        ref_step()
        t2 = time.perf_counter()
        if i >= 2:  # warm-up
            ours.append(tokens / (t1 - t0))
            theirs.append(tokens / (t2 - t1))
    a, b = statistics.median(ours), statistics.median(theirs)
    print(
        f"ours {a:,.0f} tok/s  reference {b:,.0f} tok/s  ({args.steps} alternating steps, medians)"
    )
    print(f"ratio={a / b:.3f}")
    assert math.isfinite(a / b)


if __name__ == "__main__":
    main()
