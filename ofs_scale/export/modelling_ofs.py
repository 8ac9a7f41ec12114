"""An ofs_scale GPT as a Hugging Face transformers model (loaded with `trust_remote_code=True`).

`ofs-scale export` copies this file into the export directory; it imports only torch and
transformers, so the export loads on a machine without ofs_scale. Parameter names are those of
ofs_scale's single-process model (`embed.tok.weight`, `layers.0.attn.qkv.weight`, ...), and the
maths is the same: fused qkv laid out (head, q/k/v, head_dim), QK-RMSNorm before rotate-half
RoPE, attention scaled by 1/sqrt(head_dim), Pre-Norm / Post-Norm / Outlier Protected blocks,
learned-statistics (batchless) and post-shifted batch norms in their evaluation form.

Shapes: B batch, T tokens, D model width, H heads, K head dim, V (padded) vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class OFSConfig(PretrainedConfig):
    """The model section of an ofs_scale config, with the resolved block defaults."""

    model_type = "ofs_gpt"
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
    }

    def __init__(
        self,
        vocab_size: int = 512,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        d_ff: int = 256,
        block: str = "pre",
        norm: str = "layernorm",
        activation: str = "gelu",
        qk_norm: bool = False,
        beta: float = 0.2,
        beta_trainable: bool = False,
        embed_norm: bool = False,
        final_norm: bool = True,
        tie_embeddings: bool = False,
        position: str = "rope",
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 2048,
        bias: bool = False,
        psbn_alpha: float = 0.1,
        **kwargs,
    ) -> None:
        self.vocab_size, self.d_model, self.n_layers = vocab_size, d_model, n_layers
        self.n_heads, self.d_ff, self.block, self.norm = n_heads, d_ff, block, norm
        self.activation, self.qk_norm, self.beta = activation, qk_norm, beta
        self.beta_trainable, self.embed_norm, self.final_norm = (
            beta_trainable,
            embed_norm,
            final_norm,
        )
        self.tie_embeddings, self.position, self.rope_theta = tie_embeddings, position, rope_theta
        self.max_position_embeddings, self.bias, self.psbn_alpha = (
            max_position_embeddings,
            bias,
            psbn_alpha,
        )
        kwargs["tie_word_embeddings"] = False  # a tied head reads embed.tok.weight directly
        kwargs.setdefault("use_cache", False)
        super().__init__(**kwargs)


class BatchlessNorm(nn.Module):
    """(x - mu) / exp(log_sigma) * weight (+ bias): learned statistics, no batch ones."""

    def __init__(self, dim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.mu = nn.Parameter(torch.zeros(dim))
        self.log_sigma = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x - self.mu) * torch.exp(-self.log_sigma) * self.weight
        return y + self.bias if self.bias is not None else y


class PostShiftBatchNorm(nn.Module):
    """Batch norm with running statistics (its evaluation form) plus a constant post-shift."""

    def __init__(self, dim: int, bias: bool, alpha: float, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.alpha, self.eps = alpha, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x - self.running_mean) * torch.rsqrt(self.running_var + self.eps) * self.weight
        return (y + self.bias if self.bias is not None else y) + self.alpha


def make_norm(cfg: OFSConfig) -> nn.Module:
    """A norm layer of kind `cfg.norm` over the model width."""
    d = cfg.d_model
    return {
        "layernorm": lambda: nn.LayerNorm(d, bias=cfg.bias),
        "rmsnorm": lambda: nn.RMSNorm(d),
        "srms": lambda: nn.RMSNorm(d, elementwise_affine=False),
        "none": nn.Identity,
        "batchless": lambda: BatchlessNorm(d, cfg.bias),
        "psbn": lambda: PostShiftBatchNorm(d, cfg.bias, cfg.psbn_alpha),
    }[cfg.norm]()


class HeadRMSNorm(nn.Module):
    """RMSNorm over head_dim with one gain shared by all heads (QK-norm)."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim))

    def forward(self, x_BHTK: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x_BHTK, (x_BHTK.shape[-1],), weight=self.weight)


def rope(x_BHTK: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE (the GPT-NeoX / Llama convention) at positions 0..T-1."""
    T, K = x_BHTK.shape[-2:]
    inv = 1.0 / theta ** (torch.arange(0, K, 2, device=x_BHTK.device, dtype=torch.float32) / K)
    ang_TK2 = torch.outer(torch.arange(T, device=x_BHTK.device, dtype=torch.float32), inv)
    ang_TK = torch.cat([ang_TK2, ang_TK2], dim=-1)
    cos, sin = ang_TK.cos().to(x_BHTK.dtype), ang_TK.sin().to(x_BHTK.dtype)
    x1, x2 = x_BHTK[..., : K // 2], x_BHTK[..., K // 2 :]
    return x_BHTK * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Causal self-attention, fused qkv with outputs laid out (head, q/k/v, head_dim)."""

    def __init__(self, cfg: OFSConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.q_norm = HeadRMSNorm(self.head_dim) if cfg.qk_norm else nn.Identity()
        self.k_norm = HeadRMSNorm(self.head_dim) if cfg.qk_norm else nn.Identity()
        self.theta = cfg.rope_theta if cfg.position == "rope" else None

    def forward(self, x_BTD: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x_BTD.shape
        qkv = self.qkv(x_BTD).view(B, T, self.n_heads, 3, self.head_dim)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
        q, k = self.q_norm(q), self.k_norm(k)
        if self.theta is not None:
            q, k = rope(q, self.theta), rope(k, self.theta)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    """GELU / ReLU MLP or SwiGLU (silu(gate(x)) * up(x))."""

    def __init__(self, cfg: OFSConfig) -> None:
        super().__init__()
        self.activation = cfg.activation
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        swiglu = cfg.activation == "swiglu"
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias) if swiglu else None
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        u = self.up(x_BTD)
        if self.gate is not None:
            h = F.silu(self.gate(x_BTD)) * u
        else:
            h = F.relu(u) if self.activation == "relu" else F.gelu(u)
        return self.down(h)


class Block(nn.Module):
    """Pre-Norm, Post-Norm or Outlier Protected (OP) block, as `cfg.block` says."""

    def __init__(self, cfg: OFSConfig) -> None:
        super().__init__()
        self.kind = cfg.block
        self.attn, self.mlp = Attention(cfg), MLP(cfg)
        if self.kind == "op":
            if cfg.beta_trainable:
                self.beta_attn = nn.Parameter(torch.tensor(float(cfg.beta)))
                self.beta_mlp = nn.Parameter(torch.tensor(float(cfg.beta)))
            else:
                self.beta_attn = self.beta_mlp = float(cfg.beta)
        else:
            self.norm1, self.norm2 = make_norm(cfg), make_norm(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "pre":
            h = x + self.attn(self.norm1(x), mask)
            return h + self.mlp(self.norm2(h))
        if self.kind == "post":
            h = self.norm1(x + self.attn(x, mask))
            return self.norm2(h + self.mlp(h))
        h = x + self.beta_attn * self.attn(x, mask)
        return h + self.beta_mlp * self.mlp(h)


class Embedding(nn.Module):
    """Token embedding, optional learned positions, optional LayerNorm."""

    def __init__(self, cfg: OFSConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        learned = cfg.position == "learned"
        self.pos = nn.Embedding(cfg.max_position_embeddings, cfg.d_model) if learned else None
        self.norm = nn.LayerNorm(cfg.d_model, bias=cfg.bias) if cfg.embed_norm else None

    def forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids_BT)
        if self.pos is not None:
            x = x + self.pos.weight[: ids_BT.shape[1]]
        return self.norm(x) if self.norm is not None else x


class OFSForCausalLM(PreTrainedModel, GenerationMixin):
    """The causal LM: embedding, blocks ("0".."L-1"), optional final norm, (tied) head."""

    config_class = OFSConfig
    base_model_prefix = "ofs"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config: OFSConfig) -> None:
        super().__init__(config)
        self.embed = Embedding(config)
        self.layers = nn.ModuleDict({str(i): Block(config) for i in range(config.n_layers)})
        self.final_norm = make_norm(config) if config.final_norm else None
        tied = config.tie_embeddings
        self.head = None if tied else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Weights always come from the exported checkpoint; nothing to draw."""

    def get_input_embeddings(self) -> nn.Module:
        """The token embedding table."""
        return self.embed.tok

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits over the padded vocabulary; with `labels`, the shifted cross-entropy."""
        T = input_ids.shape[1]
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            causal_TT = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            mask = causal_TT[None, None] & attention_mask.bool()[:, None, None, :]
        x = self.embed(input_ids)
        for block in self.layers.values():
            x = block(x, mask)
        if self.final_norm is not None:
            x = self.final_norm(x)
        weight = self.embed.tok.weight if self.head is None else self.head.weight
        logits = F.linear(x, weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **kwargs) -> dict:
        """No KV cache: every generation step reruns the whole prefix."""
        return {"input_ids": input_ids, "attention_mask": kwargs.get("attention_mask")}
