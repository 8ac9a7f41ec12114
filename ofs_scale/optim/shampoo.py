"""Shampoo (Gupta et al., 2018) with blocking and Adam grafting (Anil et al., 2020).

Legend: G_MN gradient of an M x N weight; m_MN, v_MN Adam moments; per block (i, j) of at most
`max_precond_dim` rows and columns: L_BB, R_CC factors and PL_BB, PR_CC their inverse fourth roots.
"""

from __future__ import annotations

import torch
from torch import nn

from ofs_scale.optim.named import StateDict
from ofs_scale.optim.precision import refresh_mm
from ofs_scale.optim.settings import OptimSettings
from ofs_scale.optim.soap import (
    MatrixOptimizer,
    adam_direction,
    apply_update_,
    matrix_shape,
    safe_eigh,
)

# Regularisation of the factors before the inverse root, relative to their largest eigenvalue.
MATRIX_EPS = 1e-6
# Floor of that regulariser, for a factor that is exactly zero (a weight that never got gradient).
MATRIX_EPS_FLOOR = 1e-30


def block_slices(m: int, n: int, size: int) -> list[tuple[int, int, slice, slice]]:
    """(i, j, rows, cols) of the blocks of an m x n matrix cut every `size` rows and columns."""
    rows = [slice(a, min(a + size, m)) for a in range(0, m, size)]
    cols = [slice(b, min(b + size, n)) for b in range(0, n, size)]
    return [(i, j, r, c) for i, r in enumerate(rows) for j, c in enumerate(cols)]


# optim.shampoo_mode: this project's variant, or Meta's Distributed Shampoo's semantics.
SHAMPOO_MODES = ("ofs", "meta")


def inverse_fourth_root(
    f: torch.Tensor,
    what: str,
    abs_eps: float | None = None,
    exponent: float = 0.25,
    precision: str = "fp32",
) -> torch.Tensor | None:
    """(F + eps I)^(-exponent) of a symmetric PSD factor, or None if eigh fails. eps is
    MATRIX_EPS * lambda_max(F) by default, or the absolute `abs_eps` (Meta's epsilon); the
    product V diag(s) V^T that rebuilds it runs in `precision` (optim/precision.py)."""
    # fp64: with eps 1e-6 the root spans a 1e6 eigenvalue range, where fp32 eigh loses the
    # small eigenvalues (Anil et al. compute these roots in fp64 for the same reason).
    found = safe_eigh(f, what, dtypes=(torch.float64,))
    if found is None:
        return None
    evals, evecs = found
    evals = evals.clamp_min(0.0)
    if abs_eps is None:
        reg = (MATRIX_EPS * evals.max()).clamp_min(MATRIX_EPS_FLOOR)
    else:
        reg = torch.tensor(abs_eps)
    return refresh_mm(evecs * (evals + reg).pow(-exponent), evecs.T, precision)


def _vector_factor(shape: tuple[int, ...], cfg: OptimSettings) -> bool:
    """Whether a 1-D tensor gets a factor: meta mode, at most max_precond_dim entries."""
    return (
        getattr(cfg, "shampoo_mode", "ofs") == "meta"
        and len(shape) == 1
        and shape[0] <= cfg.max_precond_dim
    )


class Shampoo(MatrixOptimizer):
    """Blocked Shampoo grafted to Adam over named parameters (`optim.name=shampoo`).

    Each 2-D weight is cut into blocks of at most `max_precond_dim` rows and columns. Every step
    updates the Adam moments m, v and, per block, L = sb*L + (1-sb) G G^T and R likewise. From
    step `start_preconditioning_step` on, the inverse fourth roots are recomputed every
    `precondition_frequency` steps by eigh (regularised by MATRIX_EPS times the largest
    eigenvalue), and each block moves along L^{-1/4} m R^{-1/4} rescaled to the Frobenius norm of
    the block's Adam update (Adam grafting). Before that step the update is plain AdamW.

    `optim.shampoo_mode="meta"` follows Meta's Distributed Shampoo instead: the factors are
    bias-corrected (divided by 1 - sb^t) and regularised by the absolute `optim.shampoo_epsilon`
    (F / (1 - sb^t) + eps I); roots are recomputed on steps t with t % precondition_frequency
    == 0 (and at t = start_preconditioning_step), Shampoo runs from that step on; 1-D
    parameters of at most `max_precond_dim` entries are preconditioned too, by their one D x D
    factor with exponent -1/2 (grafted to Adam's norm likewise).
    """

    def __init__(self, named: list[tuple[str, nn.Parameter]], cfg: OptimSettings) -> None:
        super().__init__(named, cfg)
        mode = getattr(cfg, "shampoo_mode", "ofs")
        if mode not in SHAMPOO_MODES:
            raise ValueError(f"optim.shampoo_mode={mode!r}: use one of {', '.join(SHAMPOO_MODES)}")
        self.meta = mode == "meta"

    def factor_sides(self, name: str, m: int, n: int) -> list[int]:
        """The longest row and column block of the m x n matrix (blocks bound the factors)."""
        size = self.cfg.max_precond_dim
        return [min(m, size), min(n, size)]

    @classmethod
    def state_numel(cls, shape: tuple[int, ...], cfg: OptimSettings) -> int:
        """As `MatrixOptimizer.state_numel`, plus a vector's factor and root in the meta mode."""
        numel = super().state_numel(shape, cfg)
        if len(shape) < 2 and _vector_factor(shape, cfg):
            numel += 2 * shape[0] * shape[0]
        return numel

    @staticmethod
    def _matrix_cost(m: int, n: int, cfg: OptimSettings) -> float:
        total = 0.0
        for _, _, r, c in block_slices(m, n, cfg.max_precond_dim):
            bm, bn = r.stop - r.start, c.stop - c.start
            total += bm**3 + bn**3 + bm * bn * (bm + bn + 1)
        return total

    @staticmethod
    def _factor_numel(m: int, n: int, cfg: OptimSettings) -> int:
        """Per block (bm x bn): L and its root (bm x bm), R and its root (bn x bn)."""
        total = 0
        for _, _, r, c in block_slices(m, n, cfg.max_precond_dim):
            bm, bn = r.stop - r.start, c.stop - c.start
            total += 2 * bm * bm + 2 * bn * bn
        return total

    def _init_matrix_state(self, p: torch.Tensor, st: StateDict) -> None:
        m, n = matrix_shape(p)
        dev = p.device
        st["exp_avg"] = torch.zeros(m, n, device=dev)
        st["exp_avg_sq"] = torch.zeros(m, n, device=dev)
        for i, j, r, c in block_slices(m, n, self.cfg.max_precond_dim):
            bm, bn = r.stop - r.start, c.stop - c.start
            st[f"L_{i}_{j}"] = torch.zeros(bm, bm, device=dev)
            st[f"R_{i}_{j}"] = torch.zeros(bn, bn, device=dev)
            st[f"PL_{i}_{j}"] = torch.zeros(bm, bm, device=dev)
            st[f"PR_{i}_{j}"] = torch.zeros(bn, bn, device=dev)

    def _init_state(self, p: torch.Tensor, st: StateDict) -> None:
        super()._init_state(p, st)
        if p.ndim < 2 and _vector_factor(tuple(p.shape), self.cfg):
            st["L_0_0"] = torch.zeros(p.numel(), p.numel(), device=p.device)
            st["PL_0_0"] = torch.zeros(p.numel(), p.numel(), device=p.device)

    def _refresh_roots(self, p: torch.Tensor, st: StateDict, t: int) -> None:
        eps = self.cfg.shampoo_epsilon if self.meta else None
        bc = 1.0 - self.shampoo_beta**t if self.meta and self.shampoo_beta < 1 else 1.0
        exponent = 0.5 if p.ndim < 2 else 0.25
        blocks = (
            [(0, 0)] if p.ndim < 2 else block_slices(*matrix_shape(p), self.cfg.max_precond_dim)
        )
        for i, j, *_ in blocks:
            for side in ("L",) if p.ndim < 2 else ("L", "R"):
                f, root = st[f"{side}_{i}_{j}"], st[f"P{side}_{i}_{j}"]
                what = f"Shampoo factor {side}_{i}_{j} of {self.names[p]}"
                precision = self.precond_precision
                new = inverse_fourth_root(f / bc, what, eps, exponent, precision)
                if new is not None:
                    root.copy_(new)
                    continue
                if not bool(torch.isfinite(f).all()):
                    f.zero_()
                if not bool(root.any()):  # never computed: fall back to no rotation
                    root.copy_(torch.eye(root.shape[0], device=root.device))

    def _preconditioning(self, t: int) -> tuple[bool, bool]:
        """(use the Shampoo direction at step t, recompute the roots first)."""
        start, freq = self.cfg.start_preconditioning_step, self.cfg.precondition_frequency
        if t < start:
            return False, False
        if self.meta:
            return True, t % freq == 0 or t == start
        return True, (t - start) % freq == 0

    def _adamw_step(self, p: torch.Tensor, g: torch.Tensor, st: StateDict, group) -> None:
        if "L_0_0" not in st:
            return MatrixOptimizer._adamw_step(p, g, st, group)
        # meta mode: a vector is preconditioned by its one factor, exponent -1/2, grafted
        st["step"] += 1
        t = int(st["step"])
        beta1, beta2 = group["betas"]
        st["exp_avg"].lerp_(g, 1.0 - beta1)
        st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        adam = adam_direction(st["exp_avg"], st["exp_avg_sq"], t, group["betas"], group["eps"])
        sb = self.shampoo_beta
        st["L_0_0"].mul_(sb).add_(torch.outer(g, g), alpha=1.0 - sb)
        use, refresh = self._preconditioning(t)
        if refresh:
            self._refresh_roots(p, st, t)
        if use:
            d = st["PL_0_0"] @ st["exp_avg"]
            adam = d * (adam.norm() / d.norm().clamp_min(MATRIX_EPS_FLOOR))
        apply_update_(p, adam, group["lr"], group["weight_decay"])

    def _matrix_step(self, p: torch.Tensor, g_MN: torch.Tensor, st: StateDict, group) -> None:
        st["step"] += 1
        t = int(st["step"])
        beta1, beta2 = group["betas"]
        m_MN, v_MN = st["exp_avg"], st["exp_avg_sq"]
        m_MN.lerp_(g_MN, 1.0 - beta1)
        v_MN.mul_(beta2).addcmul_(g_MN, g_MN, value=1.0 - beta2)
        adam_MN = adam_direction(m_MN, v_MN, t, group["betas"], group["eps"])
        blocks = block_slices(*g_MN.shape, self.cfg.max_precond_dim)
        sb = self.shampoo_beta
        for i, j, r, c in blocks:
            g_BC = g_MN[r, c]
            st[f"L_{i}_{j}"].mul_(sb).add_(g_BC @ g_BC.T, alpha=1.0 - sb)
            st[f"R_{i}_{j}"].mul_(sb).add_(g_BC.T @ g_BC, alpha=1.0 - sb)
        use, refresh = self._preconditioning(t)
        if not use:
            apply_update_(p, adam_MN, group["lr"], group["weight_decay"])
            return
        if refresh:
            self._refresh_roots(p, st, t)
        update_MN = torch.empty_like(adam_MN)
        for i, j, r, c in blocks:
            d_BC = st[f"PL_{i}_{j}"] @ m_MN[r, c] @ st[f"PR_{i}_{j}"]
            scale = adam_MN[r, c].norm() / d_BC.norm().clamp_min(MATRIX_EPS_FLOOR)
            update_MN[r, c] = d_BC * scale
        apply_update_(p, update_MN, group["lr"], group["weight_decay"])
