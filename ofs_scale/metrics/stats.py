"""Outlier-feature formulas: per-rank partial sums, and metrics finished from reduced moments.

Everything here runs in one process and never communicates; `collect.py` reduces the partial
sums across ranks. Sums are accumulated in float64 so that the order in which ranks add them up
changes the result by far less than the 1e-5 relative tolerance the parallel tests demand.

Shapes: N tokens (batch x sequence, flattened), F neurons of a site on this rank, B sequences,
T tokens per sequence, D width, H heads, K head dim.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Attention entropy materialises (heads x T x T) score blocks; cap one block at this many
# elements so a long sequence does not allocate the full (B, H, T, T) tensor at once.
ENTROPY_BLOCK_ELEMENTS = 1 << 24


def lower_median_rank(width: int) -> int:
    """0-based rank of the median among `width` values: the lower median for even widths.

    This is `torch.median`'s convention: the median is always one of the values, so it can be
    found exactly by selection across tensor-parallel shards.
    """
    return (width - 1) // 2


def neuron_sums(x_NF: torch.Tensor, mean_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-neuron sums over tokens of x^2 and of the width-centred (x - mean_N)^2, in float64
    (on CPU as fast as float32 squares with float64 accumulation, and exact to ~1e-16)."""
    x_NF = x_NF.double()
    sq_F = (x_NF * x_NF).sum(dim=0)
    c_NF = x_NF.sub_(mean_N.double()[:, None])  # x_NF is our own float64 copy
    return sq_F, c_NF.square_().sum(dim=0)


def neuron_moments(sq_F: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """[sum_j s_j^2, sum_j s_j^4] with s_j^2 = sq_F[j] / num_tokens the neuron's mean square."""
    s2_F = sq_F.double() / num_tokens
    return torch.stack([s2_F.sum(), (s2_F * s2_F).sum()])


def kurtosis_from_moments(sum_s2: float, sum_s4: float, width: float) -> float:
    """Kurt = mean_j(s_j^4) / mean_j(s_j^2)^2 from the sums over all `width` neurons."""
    if width <= 0 or sum_s2 == 0.0:
        return math.nan
    return width * sum_s4 / (sum_s2 * sum_s2)


def kurtosis_c1_from_moments(sum_cs2: float, sum_cs4: float, width: float) -> float:
    """The reference code's value from the centred moments: D/(D-1) * (Kurt_c - 1), the
    unbiased variance over neurons of the mean squares normalised to mean 1."""
    if width <= 1:
        return math.nan
    return width / (width - 1) * (kurtosis_from_moments(sum_cs2, sum_cs4, width) - 1.0)


def mmr_terms(max_N: torch.Tensor, median_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over tokens of max/median, number of tokens counted).

    A token whose median |x| is 0 (e.g. a ReLU layer with at least half its units off) has no
    finite ratio; it is left out rather than reported as infinity.
    """
    ok_N = median_N > 0
    ratio_N = max_N.double()[ok_N] / median_N.double()[ok_N]
    return ratio_N.sum(), ok_N.sum().double()


def abs_max_and_median(x_NF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token max_j |x| and lower median_j |x| over the full width held here."""
    a_NF = x_NF.abs()
    return a_NF.amax(dim=-1), lower_median(a_NF)


def lower_median(a_NF: torch.Tensor) -> torch.Tensor:
    """Per-row lower median (an element of the row, `lower_median_rank`), exact."""
    if a_NF.device.type != "cpu":
        return a_NF.median(dim=-1).values
    # numpy's introselect is ~10x faster than torch's per-row median on CPU (same element)
    k = lower_median_rank(a_NF.shape[-1])
    part = np.partition(a_NF.detach().float().numpy(), k, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(part[:, k]))


def cosine_offdiag(x_BTD: torch.Tensor) -> torch.Tensor:
    """Mean off-diagonal cosine similarity between the tokens of each sequence, shape (B,).

    With unit vectors u_t, sum_{s != t} u_s . u_t = |sum_t u_t|^2 - sum_t |u_t|^2, so the
    (T x T) matrix is never formed. A zero token has no direction and contributes 0.
    """
    return cosine_from_terms(*cosine_terms(x_BTD), x_BTD.shape[1])


def cosine_terms(x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence, sum_t u_t (B, D) and sum_t |u_t|^2 (B,) of the tokens' unit vectors: sums
    over tokens, so those of the parts of a sequence (sequence parallelism) add up."""
    x = x_BTD.double()
    norm_BT = x.norm(dim=-1, keepdim=True)
    u_BTD = torch.where(norm_BT > 0, x / norm_BT.clamp_min(1e-300), torch.zeros_like(x))
    return u_BTD.sum(dim=1), (u_BTD * u_BTD).sum(dim=(1, 2))


def cosine_from_terms(total_BD: torch.Tensor, diag_B: torch.Tensor, T: int) -> torch.Tensor:
    """`cosine_offdiag` of sequences of T tokens from their `cosine_terms`."""
    if T < 2:
        raise ValueError("cosine similarity between tokens needs sequences of at least 2 tokens")
    return ((total_BD * total_BD).sum(-1) - diag_B) / (T * (T - 1))


def attention_entropy(
    q_BHTK: torch.Tensor, k_BHTK: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of entropies, number of rows) of causal softmax(q k^T / sqrt(K)) over all heads,
    sequences and query positions (query t attends to keys 0..t; its entropy is in nats)."""
    B, H, T, K = q_BHTK.shape
    q_NTK = q_BHTK.reshape(B * H, T, K).float()
    k_NKT = k_BHTK.reshape(B * H, T, K).float().transpose(1, 2)
    future_TT = torch.ones(T, T, dtype=torch.bool, device=q_NTK.device).triu(1)
    zero = torch.zeros((), device=q_NTK.device)
    step = max(1, ENTROPY_BLOCK_ELEMENTS // (T * T))
    total = torch.zeros((), dtype=torch.float64, device=q_NTK.device)
    for i in range(0, B * H, step):
        s_NTT = torch.baddbmm(zero, q_NTK[i : i + step], k_NKT[i : i + step], beta=0.0)
        # a finite fill keeps p * s = 0 on future keys (exp underflows to exactly 0)
        s_NTT.mul_(1.0 / math.sqrt(K)).masked_fill_(future_TT, -1e30)
        p_NTT = torch.softmax(s_NTT, dim=-1)
        # H = logsumexp(s) - sum_j p_j s_j, and logsumexp(s) = s_j - log p_j at the row's max
        # (p_max >= 1/(t+1), so its log is finite): no log of every entry is needed
        lse_NT = s_NTT.amax(dim=-1) - p_NTT.amax(dim=-1).log()
        ps_NT = torch.linalg.vecdot(p_NTT, s_NTT)
        total += torch.sum(lse_NT - ps_NT, dtype=torch.float64)
    return total, torch.tensor(float(B * H * T), dtype=torch.float64, device=total.device)


# -- single-process definitions (the reference the distributed path must reproduce) ------------


def kurtosis(x_ND: torch.Tensor) -> float:
    """Kurtosis of neuron RMS: mean_j(s_j^4) / mean_j(s_j^2)^2, s_j the RMS of column j."""
    s2_D = x_ND.double().pow(2).mean(0)
    return float(s2_D.pow(2).mean() / s2_D.mean().pow(2))


def kurtosis_c1(x_ND: torch.Tensor) -> float:
    """What the study's reference code logs: centre each token across the width, divide by the
    global RMS, take the unbiased (D-1) variance over neurons of the per-neuron mean squares
    (torch's default `var`). Equals D/(D-1) * (Kurt - 1) of the width-centred activations."""
    c_ND = x_ND.double() - x_ND.double().mean(-1, keepdim=True)
    c_ND = c_ND / c_ND.pow(2).mean().sqrt()
    return float(c_ND.pow(2).mean(0).var())


def mmr(x_ND: torch.Tensor) -> float:
    """Max-median ratio of |x| per token (the paper's formula), averaged over the tokens with a
    non-zero median."""
    max_N, median_N = abs_max_and_median(x_ND)
    total, count = mmr_terms(max_N, median_N)
    return float(total / count) if count else math.nan


def mmr_centred(x_ND: torch.Tensor) -> float:
    """The reference code's MMR: the same ratio of |x - mean_j x| (each token centred across the
    width first)."""
    return mmr(x_ND.double() - x_ND.double().mean(-1, keepdim=True))


def finish_site(sums: dict[str, float], max_abs: float, kind: str) -> dict[str, float]:
    """Metric values of one site from its globally reduced sums (keys without the site name).

    `sums` holds sum_s2, sum_s4, sum_cs2, sum_cs4, width, mmr_sum, mmr_n, cmmr_sum, cmmr_n,
    cos_sum, cos_n, ent_sum, ent_n; `kind` is "resid", "mlp" or "attn".
    """
    if kind == "attn":
        n = sums["ent_n"]
        return {"attn/entropy": sums["ent_sum"] / n if n else math.nan}
    width = sums["width"]
    out = {
        "of/kurtosis": kurtosis_from_moments(sums["sum_s2"], sums["sum_s4"], width),
        "of/kurtosis_c1": kurtosis_c1_from_moments(sums["sum_cs2"], sums["sum_cs4"], width),
        "of/mmr": sums["mmr_sum"] / sums["mmr_n"] if sums["mmr_n"] else math.nan,
        "of/mmr_centred": sums["cmmr_sum"] / sums["cmmr_n"] if sums["cmmr_n"] else math.nan,
        "of/max_abs": max_abs,
        "of/rms": math.sqrt(sums["sum_s2"] / width) if width else math.nan,
    }
    if kind == "resid":
        out["sigprop/cos"] = sums["cos_sum"] / sums["cos_n"] if sums["cos_n"] else math.nan
    return out
