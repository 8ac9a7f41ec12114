"""The block zoo, single process: the OP block against a direct formula on a 2-layer model, its
structure (no norms before attention/MLP, QK-norm, beta), and every model option's structure and
parameter count (checked against the analytic count the planner and dry run use)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ofs_scale.config import load_config
from ofs_scale.testing.distributed import run_distributed
from tests.helpers import tiny_overrides

VOCAB = 512


def _build(overrides: list[str]):
    from ofs_scale.model.build import build_model
    from ofs_scale.parallel.mesh import init_mesh

    cfg = load_config(None, overrides)
    return cfg, build_model(cfg, init_mesh(1, 1), VOCAB)


def op_reference(model, tokens: torch.Tensor, beta: float, n_heads: int) -> torch.Tensor:
    """The OP model written out from its weights: LayerNorm(embedding + learned positions);
    per block h = x + beta * Attn(x) with RMSNorm(q), RMSNorm(k) per head (learnable gains,
    before the 1/sqrt(head_dim) scaling), out = h + beta * W_down relu(W_up h); no final norm."""
    B, T = tokens.shape
    e = model.embed
    x = e.tok.weight[tokens] + e.pos.weight[:T]
    x = F.layer_norm(x, (x.shape[-1],), e.norm.weight, None, e.norm.eps)
    D = x.shape[-1]
    K = D // n_heads
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for block in model.layers.values():
        a = block.attn
        qkv = (x @ a.qkv.weight.T).view(B, T, n_heads, 3, K)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))

        def rms(t, gain):
            eps = torch.finfo(t.dtype).eps
            return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps) * gain

        q, k = rms(q, a.q_norm.weight), rms(k, a.k_norm.weight)
        s = (q @ k.transpose(-2, -1)) / math.sqrt(K)
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
        y = (p @ v).transpose(1, 2).reshape(B, T, D)
        h = x + beta * (y @ a.proj.weight.T)
        m = block.mlp
        x = h + beta * (torch.relu(h @ m.up.weight.T) @ m.down.weight.T)
    return x @ model.head.weight.T


def _op_checks(rank: int, base: list[str]) -> dict:
    from ofs_scale.model.blocks import HeadRMSNorm

    over = [*base, "model.block=op", "model.position=learned", "model.final_norm=false"]
    out = {}
    cfg, model = _build([*over, "model.beta=0.3"])
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(tokens)
        want = op_reference(model, tokens, 0.3, cfg.model.n_heads)
    out["formula_err"] = float((got - want).abs().max() / want.abs().max())
    norm_types = (torch.nn.LayerNorm, torch.nn.RMSNorm)
    out["block_norms"] = [
        n
        for b in model.layers.values()
        for n, mod in b.named_modules()
        if isinstance(mod, norm_types)
    ]
    out["qk_norm"] = all(
        isinstance(b.attn.q_norm, HeadRMSNorm) and isinstance(b.attn.k_norm, HeadRMSNorm)
        for b in model.layers.values()
    )
    out["embed_norm"] = isinstance(model.embed.norm, torch.nn.LayerNorm)
    out["relu"] = {b.mlp.activation for b in model.layers.values()}
    # beta: auto is 1/sqrt(n_layers); trainable makes one scalar parameter per branch and block
    _, auto = _build([*over, "model.beta=auto", "model.n_layers=4"])
    out["beta_auto"] = {b.beta_attn for b in auto.layers.values()}
    _, learn = _build([*over, "model.beta_trainable=true"])
    out["beta_params"] = sorted(n for n, p in learn.named_parameters() if "beta" in n)
    return out


def test_op_block_is_the_formula_and_has_no_branch_norms(tiny_corpus, cache_dir, tmp_path):
    (r,) = run_distributed(_op_checks, 1, tiny_overrides(tiny_corpus, cache_dir, tmp_path))
    assert r["formula_err"] < 1e-5
    assert r["block_norms"] == []  # no norm module before attention or MLP (QK-norm is per head)
    assert r["qk_norm"] and r["embed_norm"] and r["relu"] == {"relu"}
    assert r["beta_auto"] == {0.5}
    assert r["beta_params"] == [f"layers.{i}.beta_{s}" for i in (0, 1) for s in ("attn", "mlp")]


OPTIONS = {
    "pre layernorm": [],
    "pre rmsnorm": ["model.norm=rmsnorm"],
    "pre srms": ["model.norm=srms"],
    "pre none": ["model.norm=none"],
    "post qk_norm bias": ["model.block=post", "model.qk_norm=true", "model.bias=true"],
    "pre swiglu tied learned": [
        "model.activation=swiglu",
        "model.tie_embeddings=true",
        "model.position=learned",
    ],
    "op trainable beta, final norm": ["model.block=op", "model.beta_trainable=true"],
}


def _option_checks(rank: int, base: list[str]) -> dict:
    from ofs_scale.model.shapes import param_count

    out = {}
    for name, extra in OPTIONS.items():
        cfg, model = _build([*base, *extra])
        tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
        logits = model(tokens)
        logits.float().logsumexp(-1).mean().backward()
        block = model.layers["0"]
        out[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "analytic": param_count(cfg, VOCAB),
            "finite": bool(torch.isfinite(logits).all())
            and all(
                p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters()
            ),
            "norm1": type(getattr(block, "norm1", None)).__name__,
            "gate": block.mlp.gate is not None,
            "qk_norm": type(block.attn.q_norm).__name__,
            "tied": model.head.weight is None,
            "pos": model.embed.pos is not None,
        }
    # init: output projections scaled by 1/sqrt(2 n_layers) (d_model 64 for a steady estimate)
    _, wide = _build([*base, "model.d_model=64", "model.n_layers=8"])
    b = wide.layers["0"]
    out["std"] = {
        n: float(w.std())
        for n, w in [
            ("qkv", b.attn.qkv.weight),
            ("proj", b.attn.proj.weight),
            ("down", b.mlp.down.weight),
        ]
    }
    return out


def test_every_option_builds_trains_and_matches_the_analytic_count(
    tiny_corpus, cache_dir, tmp_path
):
    (r,) = run_distributed(_option_checks, 1, tiny_overrides(tiny_corpus, cache_dir, tmp_path))
    for name in OPTIONS:
        assert r[name]["params"] == r[name]["analytic"], name
        assert r[name]["finite"], name
    norms = {k: r[f"pre {k}"]["norm1"] for k in ("layernorm", "rmsnorm", "srms", "none")}
    assert norms == {
        "layernorm": "LayerNorm",
        "rmsnorm": "RMSNorm",
        "srms": "RMSNorm",
        "none": "Identity",
    }
    assert r["pre srms"]["params"] < r["pre rmsnorm"]["params"]  # srms has no gain
    assert r["post qk_norm bias"]["qk_norm"] == "HeadRMSNorm"
    assert r["pre layernorm"]["qk_norm"] == "Identity"
    opts = r["pre swiglu tied learned"]
    assert opts["gate"] and opts["tied"] and opts["pos"]
    std = r["std"]
    assert abs(std["qkv"] - 0.02) < 0.002
    for n in ("proj", "down"):
        assert abs(std[n] - 0.02 / math.sqrt(16)) < 0.0005, n


def test_layout_refusals_name_the_fix():
    import pytest

    from ofs_scale.config import ConfigError

    with pytest.raises(ConfigError, match=r"not divisible by parallel\.tp=2"):
        load_config(None, ["model.n_heads=3", "model.d_model=24", "parallel.tp=2"])
    with pytest.raises(ConfigError, match=r"set model\.tie_embeddings=false"):
        load_config(None, ["model.tie_embeddings=true", "parallel.pp=2"])
