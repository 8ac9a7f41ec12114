"""Correlation mode decomposition (CMD, Turjeman et al. 2022) of parameter trajectories.

Parameters move in a few highly correlated modes. Given trajectories of K sampled weights over T
records:

1. C = |Pearson correlation| between every pair of trajectories (K x K).
2. Complete-linkage clustering of the rows of C (Euclidean distance between rows) into M modes.
3. Per mode, the reference weight: the member with the highest mean |corr| to its cluster.
4. Every weight is assigned to the mode whose reference it correlates with most (|corr|) and
   fitted affinely, w_i(t) ~ a_i r_m(t) + b_i (least squares).
5. Reconstruction error ||W - W_hat||_F / ||W||_F, overall and per parameter tensor.

`IncrementalAffine` is the online form of step 4 for every weight of a tensor: with the modes and
references frozen, a and b are updated from each new record without keeping the trajectory
(2 numbers per weight plus a few sums per mode).

Shapes: K sampled weights, N weights of a tensor, T records, M modes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist


def allocate_samples(numels: list[int], total: int, min_per_layer: int) -> list[int]:
    """Samples per tensor: at least `min_per_layer` (or all of a smaller tensor), the rest of
    `total` in proportion to size (largest remainders), never more than a tensor holds."""
    if total < 1:
        raise ValueError(f"metrics.cmd.num_weights={total} must be positive")
    counts = [min(min_per_layer, n) for n in numels]
    left = total - sum(counts)
    room = np.array([n - c for n, c in zip(numels, counts)], dtype=np.float64)
    if left > 0 and room.sum() > 0:
        share = room / room.sum() * min(left, room.sum())
        extra = np.minimum(np.floor(share), room).astype(np.int64)
        rest = int(min(left, room.sum())) - int(extra.sum())
        order = np.argsort(-(share - extra), kind="stable")
        for i in order:
            if rest <= 0:
                break
            if extra[i] < room[i]:
                extra[i] += 1
                rest -= 1
        counts = [c + int(e) for c, e in zip(counts, extra)]
    return counts


def abs_correlation(W_KT: np.ndarray) -> np.ndarray:
    """|Pearson correlation| between rows; a constant row correlates 0 with others, 1 with
    itself."""
    W = np.asarray(W_KT, dtype=np.float64)
    centered = W - W.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centered, axis=1)
    scale = np.where(norms > 0, norms, 1.0)
    unit = centered / scale[:, None]
    C = np.abs(unit @ unit.T)
    np.fill_diagonal(C, 1.0)
    return np.clip(C, 0.0, 1.0)


def cluster_modes(W_KT: np.ndarray, num_modes: int) -> tuple[np.ndarray, np.ndarray]:
    """(cluster label per row in 0..M'-1, reference row index per cluster); M' <= num_modes
    when fewer distinct clusters exist."""
    K = W_KT.shape[0]
    if K < 2 or num_modes <= 1:
        C = abs_correlation(W_KT)
        return np.zeros(K, dtype=np.int64), np.array([int(np.argmax(C.mean(axis=1)))])
    C = abs_correlation(W_KT)
    Z = linkage(pdist(C, metric="euclidean"), method="complete")
    raw = fcluster(Z, t=min(num_modes, K), criterion="maxclust")
    _, labels = np.unique(raw, return_inverse=True)
    refs = []
    for m in range(labels.max() + 1):
        members = np.flatnonzero(labels == m)
        refs.append(int(members[np.argmax(C[np.ix_(members, members)].mean(axis=1))]))
    return labels.astype(np.int64), np.array(refs, dtype=np.int64)


def assign_modes(W_NT: torch.Tensor, R_MT: torch.Tensor) -> torch.Tensor:
    """Mode index per weight: the reference with the largest |corr| (ties: the first)."""
    W = W_NT.double() - W_NT.double().mean(dim=1, keepdim=True)
    R = R_MT.double() - R_MT.double().mean(dim=1, keepdim=True)
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-300)
    R = R / R.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return (W @ R.T).abs().argmax(dim=1)


def affine_fit(
    W_NT: torch.Tensor, R_MT: torch.Tensor, labels_N: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares (a, b) of w_i(t) ~ a_i r_{label_i}(t) + b_i (a = 0 for a constant
    reference)."""
    W, R = W_NT.double(), R_MT.double()[labels_N]
    rc = R - R.mean(dim=1, keepdim=True)
    var = rc.pow(2).sum(dim=1)
    cov = (rc * (W - W.mean(dim=1, keepdim=True))).sum(dim=1)
    a = torch.where(var > 0, cov / var.clamp_min(1e-300), torch.zeros_like(var))
    b = W.mean(dim=1) - a * R.mean(dim=1)
    return a, b


def reconstruct(
    R_MT: torch.Tensor, labels_N: torch.Tensor, a_N: torch.Tensor, b_N: torch.Tensor
) -> torch.Tensor:
    """W_hat_NT = a * r_label(t) + b."""
    return a_N[:, None] * R_MT.double()[labels_N] + b_N[:, None]


def relative_error(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """||W - W_hat||_F / ||W||_F."""
    denom = float(W.double().norm())
    return float((W.double() - W_hat.double()).norm()) / denom if denom > 0 else 0.0


@dataclass
class CmdResult:
    """Post-hoc CMD of K sampled trajectories."""

    labels: np.ndarray
    """Mode of each weight (assignment by reference correlation)."""
    references: np.ndarray
    """Row index of each mode's reference weight."""
    a: np.ndarray
    b: np.ndarray
    error: float
    """Relative Frobenius reconstruction error over all weights."""
    layer_errors: dict[str, float] = field(default_factory=dict)
    """The same error per group (parameter tensor name)."""


def decompose(W_KT: np.ndarray, num_modes: int, groups: list[str] | None = None) -> CmdResult:
    """Full post-hoc CMD (module docstring, steps 1-5)."""
    W = torch.as_tensor(np.asarray(W_KT, dtype=np.float64))
    _, refs = cluster_modes(W.numpy(), num_modes)
    R = W[torch.as_tensor(refs)]
    labels = assign_modes(W, R)
    a, b = affine_fit(W, R, labels)
    W_hat = reconstruct(R, labels, a, b)
    layer_errors = {}
    if groups is not None:
        names = np.asarray(groups)
        for name in dict.fromkeys(groups):
            rows = torch.as_tensor(np.flatnonzero(names == name))
            layer_errors[name] = relative_error(W[rows], W_hat[rows])
    return CmdResult(
        labels.numpy(), refs, a.numpy(), b.numpy(), relative_error(W, W_hat), layer_errors
    )


class IncrementalAffine:
    """Online least-squares a, b for every weight of one tensor against its mode's reference.

    Stored per weight: a and b' (the intercept against the reference shifted by its first
    value, which keeps the sums well conditioned). Per mode: count T, sum r', sum r'^2. A new
    record recovers each weight's sums from the normal equations (S_w = T b' + a S_r,
    S_wr = b' S_r + a S_rr), adds the new point and solves again, so the result equals the batch
    fit over every record seen.
    """

    def __init__(
        self, labels_N: torch.Tensor, shift_M: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> None:
        self.labels = labels_N
        self.shift = shift_M.double()
        self.a = torch.zeros(labels_N.shape, dtype=dtype, device=labels_N.device)
        self.b = torch.zeros_like(self.a)
        self.count = 0
        self.sum_r = torch.zeros_like(self.shift)
        self.sum_rr = torch.zeros_like(self.shift)

    def update(self, w_N: torch.Tensor, r_M: torch.Tensor) -> None:
        """Add one record: this tensor's weights and the reference values."""
        rs_M = r_M.double().to(self.shift.device) - self.shift
        T, Sr, Srr = self.count, self.sum_r[self.labels], self.sum_rr[self.labels]
        a, b = self.a.double(), self.b.double()
        Sw = T * b + a * Sr
        Swr = b * Sr + a * Srr
        r = rs_M[self.labels]
        w = w_N.detach().double().reshape(-1)
        T1, Sr1, Srr1 = T + 1, Sr + r, Srr + r * r
        Sw1, Swr1 = Sw + w, Swr + w * r
        den = T1 * Srr1 - Sr1 * Sr1
        ok = den > 1e-12 * T1 * Srr1.clamp_min(1e-300)
        a1 = torch.where(ok, (T1 * Swr1 - Sr1 * Sw1) / torch.where(ok, den, 1.0), 0.0)
        self.a.copy_(a1)
        self.b.copy_((Sw1 - a1 * Sr1) / T1)
        self.count = T1
        self.sum_r += rs_M
        self.sum_rr += rs_M * rs_M

    def state_dict(self) -> dict[str, Any]:
        keys = ("labels", "shift", "a", "b", "sum_r", "sum_rr")
        return {"count": self.count, **{k: getattr(self, k).cpu() for k in keys}}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> IncrementalAffine:
        fit = cls(state["labels"].to(device), state["shift"].to(device), state["a"].dtype)
        fit.count = int(state["count"])
        for k in ("a", "b", "sum_r", "sum_rr"):
            getattr(fit, k).copy_(state[k])
        return fit

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) against the unshifted reference: w ~ a r + b."""
        a = self.a.double()
        return a, self.b.double() - a * self.shift[self.labels]

    def reconstruct(self, r_M: torch.Tensor) -> torch.Tensor:
        """a * r_label + b for the current reference values (flat, float64)."""
        rs = (r_M.double().to(self.shift.device) - self.shift)[self.labels]
        return self.a.double() * rs + self.b.double()
