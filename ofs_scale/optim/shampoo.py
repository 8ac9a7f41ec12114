"""Shampoo (Gupta et al., 2018) with blocking and Adam grafting (Anil et al., 2020).

Legend: G_MN gradient of an M x N weight; m_MN, v_MN Adam moments; per block (i, j) of at most
`max_precond_dim` rows and columns: L_BB, R_CC factors and PL_BB, PR_CC their inverse fourth roots.
"""

from __future__ import annotations

import torch

from ofs_scale.optim.settings import OptimSettings
from ofs_scale.optim.soap import (
    MatrixOptimizer,
    StateDict,
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


def inverse_fourth_root(f: torch.Tensor, what: str) -> torch.Tensor | None:
    """(F + eps * lambda_max(F) I)^(-1/4) of a symmetric PSD factor, or None if eigh fails."""
    # fp64: with eps 1e-6 the root spans a 1e6 eigenvalue range, where fp32 eigh loses the
    # small eigenvalues (Anil et al. compute these roots in fp64 for the same reason).
    found = safe_eigh(f, what, dtypes=(torch.float64,))
    if found is None:
        return None
    evals, evecs = found
    evals = evals.clamp_min(0.0)
    reg = (MATRIX_EPS * evals.max()).clamp_min(MATRIX_EPS_FLOOR)
    return (evecs * (evals + reg).pow(-0.25)) @ evecs.T


class Shampoo(MatrixOptimizer):
    """Blocked Shampoo grafted to Adam over named parameters (`optim.name=shampoo`).

    Each 2-D weight is cut into blocks of at most `max_precond_dim` rows and columns. Every step
    updates the Adam moments m, v and, per block, L = sb*L + (1-sb) G G^T and R likewise. From
    step `start_preconditioning_step` on, the inverse fourth roots are recomputed every
    `precondition_frequency` steps by eigh (regularised by MATRIX_EPS times the largest
    eigenvalue), and each block moves along L^{-1/4} m R^{-1/4} rescaled to the Frobenius norm of
    the block's Adam update (Adam grafting). Before that step the update is plain AdamW.
    """

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

    def _refresh_roots(self, p: torch.Tensor, st: StateDict) -> None:
        for i, j, _, _ in block_slices(*matrix_shape(p), self.cfg.max_precond_dim):
            for side in ("L", "R"):
                f, root = st[f"{side}_{i}_{j}"], st[f"P{side}_{i}_{j}"]
                new = inverse_fourth_root(f, f"Shampoo factor {side}_{i}_{j} of {self.names[p]}")
                if new is not None:
                    root.copy_(new)
                    continue
                if not bool(torch.isfinite(f).all()):
                    f.zero_()
                if not bool(root.any()):  # never computed: fall back to no rotation
                    root.copy_(torch.eye(root.shape[0], device=root.device))

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
        start = self.cfg.start_preconditioning_step
        if t < start:
            apply_update_(p, adam_MN, group["lr"], group["weight_decay"])
            return
        if (t - start) % self.cfg.precondition_frequency == 0:
            self._refresh_roots(p, st)
        update_MN = torch.empty_like(adam_MN)
        for i, j, r, c in blocks:
            d_BC = st[f"PL_{i}_{j}"] @ m_MN[r, c] @ st[f"PR_{i}_{j}"]
            scale = adam_MN[r, c].norm() / d_BC.norm().clamp_min(MATRIX_EPS_FLOOR)
            update_MN[r, c] = d_BC * scale
        apply_update_(p, update_MN, group["lr"], group["weight_decay"])
