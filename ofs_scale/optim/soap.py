"""SOAP (Vyas et al., 2024): Adam run in the eigenbasis of Shampoo's Kronecker factors.

Every 2-D weight is its own problem; gains, biases and scalars use plain AdamW. The shared
machinery for matrix optimizers (parameter groups, lazily created state addressed by name, the
AdamW path, a guarded eigendecomposition) lives here too and is reused by Shampoo.

Legend: G_MN gradient of an M x N weight; L_MM, R_NN its left/right factors; QL_MM, QR_NN their
eigenbases (columns in descending eigenvalue order); m_MN, v_MN Adam moments in the rotated space.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ofs_scale.optim.named import NamedStateOptimizer, StateDict
from ofs_scale.optim.precision import check_precision, refresh_mm
from ofs_scale.optim.settings import OptimSettings

log = logging.getLogger("ofs_scale.optim")


EIGH_SHIFT = 1e-30
# optim.soap_mode: the published SOAP code's semantics, or this project's earlier variant.
SOAP_MODES = ("published", "ofs")
# The vocabulary matrices (token embedding, output head; rows = vocabulary) and the policies of
# optim.vocab_precondition: SOAP leaves their vocabulary side unrotated, or treats them as any.
VOCAB_PARAMS = ("embed.tok.", "head.")
VOCAB_POLICIES = ("one_sided", "full")
# A factor side this many times longer than every non-vocabulary matrix's longest side makes
# the step far slower than the model (eigh and refresh are cubic in it): warn.
FACTOR_WARN_RATIO = 4


def skips_vocab_side(name: str, cfg: OptimSettings) -> bool:
    """Whether `name` is a vocabulary matrix whose vocabulary side (rows) gets no factor."""
    policy = getattr(cfg, "vocab_precondition", "one_sided")
    return policy == "one_sided" and name.startswith(VOCAB_PARAMS)


def safe_eigh(
    mat: torch.Tensor,
    what: str,
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64),
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Eigenvalues (ascending) and eigenvectors of a symmetric matrix, returned in fp32.

    Tried in each of `dtypes` in turn (fp32, then fp64 if that fails); None with a logged
    warning when the matrix is not finite or every attempt fails, so the caller keeps its
    previous preconditioner instead of crashing.
    """
    if not bool(torch.isfinite(mat).all()):
        log.warning("%s is not finite: preconditioner update skipped and the factor reset", what)
        return None
    for dtype in dtypes:
        shifted = mat.to(dtype, copy=True)
        # Exactly-zero rows (e.g. embedding rows of tokens absent from the batch) make LAPACK's
        # syevd fail to converge most of the time in fp32; a diagonal shift below the resolution
        # of any nonzero entry prevents that and leaves the eigenvectors unchanged.
        shifted.diagonal().add_(EIGH_SHIFT)
        try:
            evals, evecs = torch.linalg.eigh(shifted)
        except RuntimeError as e:  # torch.linalg.LinAlgError derives from RuntimeError
            log.warning("eigh of %s failed in %s (%s)", what, dtype, str(e)[:120])
            continue
        if bool(torch.isfinite(evecs).all()):
            return evals.float(), evecs.float()
    tried = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
    log.warning("eigh of %s failed (tried %s): previous preconditioner kept", what, tried)
    return None


def adam_direction(
    m: torch.Tensor,
    v: torch.Tensor,
    t: int,
    betas: tuple[float, float],
    eps: float,
    eps_before_correction: bool = False,
) -> torch.Tensor:
    """Bias-corrected Adam direction after `t` moment updates: m_hat / (sqrt(v_hat) + eps), or
    with `eps_before_correction` (the published SOAP code, torch.optim.Adam's own order)
    m / (sqrt(v) + eps) * sqrt(1 - beta2^t) / (1 - beta1^t), an effective epsilon of
    eps / sqrt(1 - beta2^t) on sqrt(v_hat)."""
    beta1, beta2 = betas
    bc1 = 1.0 - beta1**t
    bc2_sqrt = math.sqrt(1.0 - beta2**t)
    if eps_before_correction:
        return (m / (v.sqrt() + eps)).mul_(bc2_sqrt / bc1)
    return (m / bc1) / (v.sqrt() / bc2_sqrt + eps)


def apply_update_(
    p: torch.Tensor,
    update: torch.Tensor,
    lr: float,
    weight_decay: float,
    decay_after: bool = False,
) -> None:
    """Decoupled weight decay p *= 1 - lr * wd, before (default, AdamW's order) or after
    (`decay_after`, the published SOAP code) p -= lr * update (update may be the 2-D view)."""
    if weight_decay and not decay_after:
        p.mul_(1.0 - lr * weight_decay)
    p.add_(update.reshape(p.shape).to(p.dtype), alpha=-lr)
    if weight_decay and decay_after:
        p.mul_(1.0 - lr * weight_decay)


def matrix_shape(p: torch.Tensor) -> tuple[int, int]:
    """The 2-D shape a weight is preconditioned as (leading dim x everything else)."""
    return p.shape[0], p[0].numel()


class MatrixOptimizer(NamedStateOptimizer):
    """Base of SOAP and Shampoo: AdamW for tensors with ndim < 2, a matrix rule for the rest.

    State is created lazily per parameter (`_init_matrix_state`) and is also materialised by
    `named_state`, so a checkpoint can be loaded into it in place; `step` counts the calls that
    reached each parameter and is part of that state, so a reloaded optimizer continues exactly.
    """

    def __init__(self, named: list[tuple[str, nn.Parameter]], cfg: OptimSettings) -> None:
        if cfg.precondition_frequency < 1:
            raise ValueError(
                f"optim.precondition_frequency={cfg.precondition_frequency} must be >= 1"
            )
        if cfg.max_precond_dim < 1:
            raise ValueError(f"optim.max_precond_dim={cfg.max_precond_dim} must be >= 1")
        super().__init__(named, cfg)
        self.shampoo_beta = cfg.betas[1] if cfg.shampoo_beta is None else cfg.shampoo_beta
        self.precond_precision = check_precision(getattr(cfg, "precond_precision", "fp32"))
        self._warn_large_factors(named)

    def factor_sides(self, name: str, m: int, n: int) -> list[int]:
        """Side lengths of the factors (or factor blocks) of the m x n matrix `name`."""
        raise NotImplementedError

    def _warn_large_factors(self, named: list[tuple[str, nn.Parameter]]) -> None:
        """Warn when a factor is far wider than the model's other matrices (see
        FACTOR_WARN_RATIO): its eigendecompositions would dominate the step."""
        mats = [(n, matrix_shape(p)) for n, p in named if p.ndim >= 2]
        widest = max((max(s) for n, s in mats if not n.startswith(VOCAB_PARAMS)), default=0)
        if not widest:
            return
        for name, (m, n) in mats:
            side = max(self.factor_sides(name, m, n), default=0)
            if side > FACTOR_WARN_RATIO * widest:
                log.warning(
                    "%s: a %d x %d preconditioner factor for a %d x %d matrix, %dx the widest "
                    "other matrix side (%d): its eigendecompositions will dominate the step "
                    "time and memory. Set optim.vocab_precondition=one_sided (SOAP) or lower "
                    "optim.max_precond_dim",
                    name,
                    side,
                    side,
                    m,
                    n,
                    side // widest,
                    widest,
                )

    @classmethod
    def cost(cls, shape: tuple[int, ...], cfg: OptimSettings) -> float:
        """Relative compute cost of one parameter's update (used to balance ownership)."""
        if len(shape) < 2:
            return float(math.prod(shape))
        return cls._matrix_cost(shape[0], math.prod(shape[1:]), cfg)

    @classmethod
    def state_numel(cls, shape: tuple[int, ...], cfg: OptimSettings) -> int:
        """fp32 state elements of one parameter: step counter, Adam moments and, for a matrix
        (preconditioned as `matrix_shape`: rows x the rest), its factors."""
        numel = math.prod(shape)
        if len(shape) < 2:
            return 2 * numel + 1
        return 2 * numel + 1 + cls._factor_numel(shape[0], numel // shape[0], cfg)

    @staticmethod
    def _matrix_cost(m: int, n: int, cfg: OptimSettings) -> float:
        raise NotImplementedError

    @staticmethod
    def _factor_numel(m: int, n: int, cfg: OptimSettings) -> int:
        raise NotImplementedError

    def _init_matrix_state(self, p: torch.Tensor, st: StateDict) -> None:
        raise NotImplementedError

    def _matrix_step(self, p: torch.Tensor, g_MN: torch.Tensor, st: StateDict, group) -> None:
        raise NotImplementedError

    def _init_state(self, p: torch.Tensor, st: StateDict) -> None:
        st["step"] = torch.zeros((), dtype=torch.float32)
        if p.ndim < 2:
            st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        else:
            self._init_matrix_state(p, st)

    @torch.no_grad()
    def step(self, closure=None) -> None:
        """One update of every parameter that has a gradient."""
        for p, st, group in self._with_grads(closure, "SOAP/Shampoo"):
            g = p.grad.float()
            if p.ndim < 2:
                self._adamw_step(p, g, st, group)
            else:
                self._matrix_step(p, g.reshape(matrix_shape(p)), st, group)

    @staticmethod
    def _adamw_step(p: torch.Tensor, g: torch.Tensor, st: StateDict, group) -> None:
        beta1, beta2 = group["betas"]
        st["step"] += 1
        st["exp_avg"].lerp_(g, 1.0 - beta1)
        st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        t = int(st["step"])
        d = adam_direction(st["exp_avg"], st["exp_avg_sq"], t, group["betas"], group["eps"])
        apply_update_(p, d, group["lr"], group["weight_decay"])


class SOAP(MatrixOptimizer):
    """SOAP over named parameters (`optim.name=soap`).

    Per 2-D weight: factors L = sb*L + (1-sb) G G^T and R = sb*R + (1-sb) G^T G (a side longer
    than `max_precond_dim` gets none and stays unrotated). The first step only builds L, R and
    their eigenbases. Afterwards each step rotates G' = QL^T G QR, updates Adam moments there,
    applies p -= lr * QL D QR^T with D the Adam direction, decays the weight, and then folds G
    into L and R. Every `precondition_frequency` Adam steps the bases are refreshed by one power
    iteration plus QR, after sorting by the estimated eigenvalues diag(Q^T L Q) (v is permuted
    alongside, m is re-expressed in the new basis).

    `optim.soap_mode="published"` (default) follows the published code (Vyas et al.): eps added
    before the bias correction, weight decay after the update, every tensor's first step
    skipped. "ofs", this project's earlier variant: eps after bias correction, decay before the
    update, 1-D tensors by AdamW from the first step (docs/optimizers.md).
    """

    def __init__(self, named: list[tuple[str, nn.Parameter]], cfg: OptimSettings) -> None:
        super().__init__(named, cfg)
        mode = getattr(cfg, "soap_mode", "published")
        if mode not in SOAP_MODES:
            raise ValueError(f"optim.soap_mode={mode!r}: use one of {', '.join(SOAP_MODES)}")
        self.published = mode == "published"
        policy = getattr(cfg, "vocab_precondition", "one_sided")
        if policy not in VOCAB_POLICIES:
            raise ValueError(
                f"optim.vocab_precondition={policy!r}: use one of {', '.join(VOCAB_POLICIES)}"
            )

    def _adamw_step(self, p: torch.Tensor, g: torch.Tensor, st: StateDict, group) -> None:
        if not self.published:
            return MatrixOptimizer._adamw_step(p, g, st, group)
        t = int(st["step"])  # the published code skips the first step of every parameter
        st["step"] += 1
        if t == 0:
            return
        beta1, beta2 = group["betas"]
        st["exp_avg"].lerp_(g, 1.0 - beta1)
        st["exp_avg_sq"].lerp_(g * g, 1.0 - beta2)
        d = adam_direction(st["exp_avg"], st["exp_avg_sq"], t, group["betas"], group["eps"], True)
        apply_update_(p, d, group["lr"], group["weight_decay"], decay_after=True)

    @staticmethod
    def _matrix_cost(m: int, n: int, cfg: OptimSettings) -> float:
        sides = [d for d in (m, n) if d <= cfg.max_precond_dim]
        return float(sum(d**3 for d in sides) + m * n * (sum(sides) + 1))

    @staticmethod
    def _factor_numel(m: int, n: int, cfg: OptimSettings) -> int:
        """L and QL (m x m), R and QR (n x n); a side longer than max_precond_dim has neither."""
        return sum(2 * d * d for d in (m, n) if d <= cfg.max_precond_dim)

    @classmethod
    def state_numel(cls, shape: tuple[int, ...], cfg: OptimSettings, name: str = "") -> int:
        """As `MatrixOptimizer.state_numel`, less a one-sided vocabulary matrix's row factor."""
        numel = super().state_numel(shape, cfg)
        if len(shape) >= 2 and skips_vocab_side(name, cfg) and shape[0] <= cfg.max_precond_dim:
            numel -= 2 * shape[0] * shape[0]
        return numel

    @staticmethod
    def _sides(name: str, m: int, n: int, cfg: OptimSettings) -> tuple[bool, bool]:
        """Whether the left (rows) and right (columns) side of matrix `name` get a factor."""
        left = m <= cfg.max_precond_dim and not skips_vocab_side(name, cfg)
        return left, n <= cfg.max_precond_dim

    def factor_sides(self, name: str, m: int, n: int) -> list[int]:
        """Side lengths of the factors SOAP keeps for the m x n matrix `name`."""
        return [d for d, on in zip((m, n), self._sides(name, m, n, self.cfg)) if on]

    def _init_matrix_state(self, p: torch.Tensor, st: StateDict) -> None:
        m, n = matrix_shape(p)
        dev = p.device
        st["exp_avg"] = torch.zeros(m, n, device=dev)
        st["exp_avg_sq"] = torch.zeros(m, n, device=dev)
        sides = self._sides(self.names[p], m, n, self.cfg)
        for (side, d), on in zip((("L", m), ("R", n)), sides):
            if on:
                st[side] = torch.zeros(d, d, device=dev)
                st["Q" + side] = torch.zeros(d, d, device=dev)

    @staticmethod
    def rotate(x_MN: torch.Tensor, st: StateDict) -> torch.Tensor:
        """QL^T x QR (sides without a factor are left alone)."""
        if "QL" in st:
            x_MN = st["QL"].T @ x_MN
        if "QR" in st:
            x_MN = x_MN @ st["QR"]
        return x_MN

    @staticmethod
    def unrotate(x_MN: torch.Tensor, st: StateDict) -> torch.Tensor:
        """QL x QR^T, the inverse of `rotate`."""
        if "QL" in st:
            x_MN = st["QL"] @ x_MN
        if "QR" in st:
            x_MN = x_MN @ st["QR"].T
        return x_MN

    def _update_factors(self, g_MN: torch.Tensor, st: StateDict) -> None:
        sb = self.shampoo_beta
        if "L" in st:
            st["L"].mul_(sb).add_(g_MN @ g_MN.T, alpha=1.0 - sb)
        if "R" in st:
            st["R"].mul_(sb).add_(g_MN.T @ g_MN, alpha=1.0 - sb)

    def _init_bases(self, p: torch.Tensor, st: StateDict) -> None:
        for side in ("L", "R"):
            if side not in st:
                continue
            found = safe_eigh(st[side], f"SOAP factor {side} of {self.names[p]}")
            q = st["Q" + side]
            if found is None:
                st[side].zero_()
                q.copy_(torch.eye(q.shape[0], device=q.device))
            else:
                q.copy_(found[1].flip(1))  # descending eigenvalues

    def _refresh_bases(self, p: torch.Tensor, st: StateDict) -> None:
        m_MN = self.unrotate(st["exp_avg"], st)
        v_MN = st["exp_avg_sq"]
        for dim, side in enumerate(("L", "R")):
            if side not in st:
                continue
            f, q = st[side], st["Q" + side]
            if not bool(torch.isfinite(f).all()):
                log.warning(
                    "SOAP factor %s of %s is not finite: basis kept, factor reset",
                    side,
                    self.names[p],
                )
                f.zero_()
                continue
            precision = self.precond_precision
            est = (q * refresh_mm(f, q, precision)).sum(0)  # diag(Q^T F Q)
            order = torch.argsort(est, descending=True)
            q_sorted = q[:, order]
            v_MN.copy_(v_MN.index_select(dim, order))
            q.copy_(torch.linalg.qr(refresh_mm(f, q_sorted, precision))[0])  # QR in fp32
        st["exp_avg"].copy_(self.rotate(m_MN, st))

    def _matrix_step(self, p: torch.Tensor, g_MN: torch.Tensor, st: StateDict, group) -> None:
        t = int(st["step"])  # Adam steps taken so far are t - 1; the first call only builds bases
        st["step"] += 1
        if t == 0:
            self._update_factors(g_MN, st)
            self._init_bases(p, st)
            return
        beta1, beta2 = group["betas"]
        gr_MN = self.rotate(g_MN, st)
        st["exp_avg"].lerp_(gr_MN, 1.0 - beta1)
        st["exp_avg_sq"].mul_(beta2).addcmul_(gr_MN, gr_MN, value=1.0 - beta2)
        pub = self.published
        d_MN = adam_direction(st["exp_avg"], st["exp_avg_sq"], t, group["betas"], group["eps"], pub)
        apply_update_(p, self.unrotate(d_MN, st), group["lr"], group["weight_decay"], pub)
        # Factors take G only after the update, so a gradient never preconditions itself.
        self._update_factors(g_MN, st)
        if t % self.cfg.precondition_frequency == 0:
            self._refresh_bases(p, st)
