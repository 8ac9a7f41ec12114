"""Muon (Jordan et al., 2024): momentum orthogonalised by a quintic Newton-Schulz iteration.

Every hidden weight matrix W (M x N) keeps one momentum buffer B and takes the step

    B <- mu B + (1 - mu) G                  (momentum as an EMA of the gradient)
    U  = (1 - mu) G + mu B  (Nesterov)      or U = B without Nesterov
    O  = NS(U)                              ~ the polar factor of U (U = P S Q^T -> P Q^T)
    W <- (1 - lr wd) W - lr * rms * sqrt(max(M, N)) * O

The last factor is Moonlight's rule (Liu et al., 2025, "Muon is Scalable for LLM Training",
arXiv:2502.16982): an M x N matrix with all singular values 1 has RMS 1/sqrt(max(M, N)), so the
update has RMS `rms` (0.2 by default, about AdamW's update RMS), and AdamW's learning rate and
weight decay transfer unchanged. Embeddings, the unembedding (name prefixes in
`optim.muon_adamw`) and every tensor with fewer than two dims take AdamW with the same lr.

Tensor parallelism: a matrix split over the TP group is orthogonalised whole. U's shards are
all-gathered over TP (every TP rank receives (tp - 1)/tp of the matrix), every TP rank runs the
iteration on the full matrix and keeps its own slice. NS(U) is not a function of U's shards
separately (X X^T mixes every column), so per-shard orthogonalisation would be a different
optimizer; gathering keeps TP=2 equal to TP=1 up to rounding. The momentum is elementwise and
stays sharded, so checkpoints reshard over TP like AdamW's.

Legend: G_MN gradient, B_MN momentum, U_MN Nesterov direction, X_MN the Newton-Schulz iterate.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ofs_scale.optim.named import NamedStateOptimizer, StateDict
from ofs_scale.optim.settings import OptimSettings
from ofs_scale.optim.soap import adam_direction, apply_update_, matrix_shape
from ofs_scale.parallel.tp import is_tp_sharded, tp_partition_dim

NS_EPS = 1e-7


def newton_schulz(
    g_MN: torch.Tensor, steps: int, coeffs: tuple[float, float, float]
) -> torch.Tensor:
    """Approximate orthogonal polar factor of a matrix, in fp32.

    X = G / (||G||_F + eps) (all singular values <= 1), then `steps` times
    X <- a X + (b A + c A A) X with A = X X^T, on the wide orientation (rows <= columns, so A
    is the smaller Gram matrix). The default coefficients (3.4445, -4.7750, 2.0315) push every
    normalised singular value above 0.01 into [0.68, 1.21] in five steps, not exactly to 1.
    """
    a, b, c = coeffs
    x_MN = g_MN.float()
    tall = x_MN.shape[0] > x_MN.shape[1]
    if tall:
        x_MN = x_MN.T
    x_MN = x_MN / (x_MN.norm() + NS_EPS)
    for _ in range(steps):
        gram = x_MN @ x_MN.T
        x_MN = a * x_MN + (b * gram + c * gram @ gram) @ x_MN
    return x_MN.T if tall else x_MN


def update_scale(m: int, n: int, rms: float) -> float:
    """Moonlight's factor rms * sqrt(max(m, n)): the orthogonalised update then has RMS `rms`."""
    return rms * math.sqrt(max(m, n))


def _adamw_by_name(name: str, prefixes: list[str] | tuple[str, ...]) -> bool:
    return any(name == pre or name.startswith(pre.rstrip(".") + ".") for pre in prefixes)


def uses_muon(name: str, p: torch.Tensor, adamw_prefixes: list[str] | tuple[str, ...]) -> bool:
    """Whether a parameter takes the Muon update: matrices whose name does not start with one
    of the module prefixes in `optim.muon_adamw` (default embeddings and unembedding)."""
    return p.ndim >= 2 and not _adamw_by_name(name, adamw_prefixes)


class Muon(NamedStateOptimizer):
    """Muon for hidden matrices and AdamW for the rest, over named parameters (`optim.name=muon`).

    One learning rate and weight decay for both kinds (the trainer's schedule writes
    `group["lr"]`); AdamW uses `optim.betas` and `optim.eps`, Muon `optim.muon_momentum`,
    `optim.muon_nesterov`, `optim.ns_steps`, `optim.ns_coeffs` and `optim.muon_update_rms`.
    With `tp_group` (more than one rank), TP-split matrices are gathered for the iteration.
    """

    def __init__(
        self,
        named: list[tuple[str, nn.Parameter]],
        cfg: OptimSettings,
        tp_group: dist.ProcessGroup | None = None,
    ) -> None:
        if cfg.ns_steps < 1:
            raise ValueError(f"optim.ns_steps={cfg.ns_steps} must be >= 1")
        super().__init__(named, cfg)
        self.muon = {p: uses_muon(n, p, cfg.muon_adamw) for n, p in named}
        self.tp_group = tp_group
        self.tp = dist.get_world_size(tp_group) if tp_group is not None else 1

    @staticmethod
    def cost(shape: tuple[int, ...], cfg: OptimSettings) -> float:
        """Relative compute cost of one tensor's update (ZeRO-1 ownership balancing): the
        Newton-Schulz flops of a matrix, ns_steps * (4 m^2 n + 2 m^3) with m <= n its sides."""
        if len(shape) < 2:
            return float(math.prod(shape))
        m, n = sorted((shape[0], math.prod(shape[1:])))
        return float(cfg.ns_steps * (4 * m * m * n + 2 * m**3) + m * n)

    @staticmethod
    def state_numel(shape: tuple[int, ...], cfg: OptimSettings, name: str = "") -> int:
        """fp32 state elements of one tensor named `name`: a Muon matrix keeps one momentum
        buffer, an AdamW tensor (embeddings, head, 1-D) two moments; plus the step counter."""
        numel = math.prod(shape)
        muon = len(shape) >= 2 and not _adamw_by_name(name, cfg.muon_adamw)
        return (numel if muon else 2 * numel) + 1

    def _init_state(self, p: torch.Tensor, st: StateDict) -> None:
        st["step"] = torch.zeros((), dtype=torch.float32)
        if self.muon[p]:
            st["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
        else:
            st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure=None) -> None:
        """One update of every parameter that has a gradient (same order on every TP rank)."""
        for p, st, group in self._with_grads(closure, "Muon"):
            st["step"] += 1
            if self.muon[p]:
                self._muon_step(p, p.grad.float(), st, group)
            else:
                self._adamw_step(p, p.grad.float(), st, group)

    @staticmethod
    def _adamw_step(p: torch.Tensor, g: torch.Tensor, st: StateDict, group) -> None:
        beta1, beta2 = group["betas"]
        st["exp_avg"].lerp_(g, 1.0 - beta1)
        st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        d = adam_direction(
            st["exp_avg"], st["exp_avg_sq"], int(st["step"]), group["betas"], group["eps"]
        )
        apply_update_(p, d, group["lr"], group["weight_decay"])

    def _muon_step(self, p: torch.Tensor, g: torch.Tensor, st: StateDict, group) -> None:
        mu = self.cfg.muon_momentum
        buf = st["momentum_buffer"]
        buf.lerp_(g, 1.0 - mu)
        u = g.lerp(buf, mu) if self.cfg.muon_nesterov else buf
        split = self.tp > 1 and is_tp_sharded(p)
        full = self._gather(u, tp_partition_dim(p)) if split else u
        o = newton_schulz(full.reshape(matrix_shape(full)), self.cfg.ns_steps, self.cfg.ns_coeffs)
        o = o.reshape(full.shape)
        if split:
            o = o.chunk(self.tp, dim=tp_partition_dim(p))[dist.get_rank(self.tp_group)]
        m, n = matrix_shape(full)
        scale = update_scale(m, n, self.cfg.muon_update_rms)
        apply_update_(p, o * scale, group["lr"], group["weight_decay"])

    def _gather(self, u: torch.Tensor, dim: int) -> torch.Tensor:
        parts = [torch.empty_like(u) for _ in range(self.tp)]
        dist.all_gather(parts, u.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=dim)
