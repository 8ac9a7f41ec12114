"""OF metric formulas on hand-built activations, against closed forms and plain numpy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ofs_scale.metrics import stats
from ofs_scale.metrics.collect import select_sites
from ofs_scale.metrics.measured import measured_positions, measured_rows
from ofs_scale.metrics.plots import load_records, write_plots


def np_kurtosis(x: np.ndarray) -> float:
    s2 = (x.astype(np.float64) ** 2).mean(0)
    return float((s2**2).mean() / s2.mean() ** 2)


def np_kurtosis_c1(x: np.ndarray) -> float:
    """The reference code's form: width-centred, divided by the global RMS, unbiased (D-1)
    variance over neurons of the per-neuron mean squares."""
    x = x.astype(np.float64)
    c = x - x.mean(1, keepdims=True)
    c = c / np.sqrt((c**2).mean())
    return float(np.var((c**2).mean(0), ddof=1))


def np_mmr(x: np.ndarray) -> float:
    a = np.sort(np.abs(x.astype(np.float64)), axis=1)
    med = a[:, (a.shape[1] - 1) // 2]
    ok = med > 0
    return float((a[ok, -1] / med[ok]).mean())


def np_mmr_centred(x: np.ndarray) -> float:
    x = x.astype(np.float64)
    return np_mmr(x - x.mean(1, keepdims=True))


def np_cos(x_btd: np.ndarray) -> np.ndarray:
    out = []
    for seq in x_btd.astype(np.float64):
        u = seq / np.linalg.norm(seq, axis=1, keepdims=True)
        g = u @ u.T
        t = g.shape[0]
        out.append((g.sum() - np.trace(g)) / (t * (t - 1)))
    return np.array(out)


def np_entropy(q: np.ndarray, k: np.ndarray) -> float:
    t, d = q.shape[2:]
    s = np.einsum("bhtd,bhsd->bhts", q.astype(np.float64), k.astype(np.float64)) / math.sqrt(d)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ent = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1)
    return float(ent.mean())


def from_partials(x_ND: torch.Tensor, token_parts: int, neuron_parts: int) -> dict[str, float]:
    """The metrics as the distributed path builds them: partial sums over token pieces (DP),
    added up, then moments over neuron pieces (TP), added up."""
    mean_N = x_ND.double().mean(-1)
    fields = dict.fromkeys(("sum_s2", "sum_s4", "sum_cs2", "sum_cs4", "width"), 0.0)
    for cols in torch.tensor_split(torch.arange(x_ND.shape[1]), neuron_parts):
        sq = csq = 0.0
        for rows in torch.tensor_split(torch.arange(x_ND.shape[0]), token_parts):
            a, b = stats.neuron_sums(x_ND[rows][:, cols], mean_N[rows])
            sq, csq = sq + a, csq + b
        n = torch.tensor(float(x_ND.shape[0]), dtype=torch.float64)
        for key, v in zip(("sum_s2", "sum_s4"), stats.neuron_moments(sq, n), strict=True):
            fields[key] += float(v)
        for key, v in zip(("sum_cs2", "sum_cs4"), stats.neuron_moments(csq, n), strict=True):
            fields[key] += float(v)
        fields["width"] += len(cols)
    max_N, median_N = stats.abs_max_and_median(x_ND)
    mmr_sum, mmr_n = stats.mmr_terms(max_N, median_N)
    fields.update(mmr_sum=float(mmr_sum), mmr_n=float(mmr_n), cos_sum=0.0, cos_n=1.0)
    cmax_N, cmedian_N = stats.abs_max_and_median(x_ND.double() - mean_N[:, None])
    cmmr_sum, cmmr_n = stats.mmr_terms(cmax_N, cmedian_N)
    fields.update(cmmr_sum=float(cmmr_sum), cmmr_n=float(cmmr_n))
    return stats.finish_site(fields, float(x_ND.abs().max()), "mlp")


def test_gaussian_kurtosis_is_one_within_sampling_error():
    n, d = 4096, 64
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    k = stats.kurtosis(x)
    # Kurt - 1 = var_j(s_j^2) / mean_j(s_j^2)^2, whose mean is 2/n for Gaussian columns
    assert abs(k - 1.0) < 4 * 2 / n
    assert abs(k - 1.0) > 0


def test_one_neuron_with_all_energy_gives_width():
    for d in (7, 32, 128):
        x = torch.zeros(50, d)
        x[:, 3] = torch.linspace(-2.0, 3.0, 50)
        assert stats.kurtosis(x) == pytest.approx(d, rel=1e-12)
        assert from_partials(x, 3, 2)["of/kurtosis"] == pytest.approx(d, rel=1e-12)


def test_constant_scale_vector_closed_form():
    d, n = 16, 200
    a = torch.linspace(0.1, 5.0, d, dtype=torch.float64)
    signs = torch.randint(0, 2, (n, d), generator=torch.Generator().manual_seed(1)) * 2 - 1
    x = signs * a  # |x_tj| = a_j, so s_j = a_j exactly
    closed = float((a**4).mean() / (a**2).mean() ** 2)
    assert stats.kurtosis(x) == pytest.approx(closed, rel=1e-12)
    assert from_partials(x, 4, 3)["of/kurtosis"] == pytest.approx(closed, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_formulas_match_numpy(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 24, generator=g) * torch.rand(24, generator=g) * 3 + 0.3
    xn = x.numpy()
    assert stats.kurtosis(x) == pytest.approx(np_kurtosis(xn), rel=1e-10)
    assert stats.kurtosis_c1(x) == pytest.approx(np_kurtosis_c1(xn), rel=1e-10)
    assert stats.mmr(x) == pytest.approx(np_mmr(xn), rel=1e-10)
    assert stats.mmr_centred(x) == pytest.approx(np_mmr_centred(xn), rel=1e-6)
    # DP x TP style combination of partial sums equals the direct formulas
    for tokens, neurons in ((1, 1), (2, 2), (3, 4)):
        got = from_partials(x, tokens, neurons)
        assert got["of/kurtosis"] == pytest.approx(np_kurtosis(xn), rel=1e-10)
        assert got["of/kurtosis_c1"] == pytest.approx(np_kurtosis_c1(xn), rel=1e-10)
        assert got["of/mmr"] == pytest.approx(np_mmr(xn), rel=1e-10)
        assert got["of/mmr_centred"] == pytest.approx(np_mmr_centred(xn), rel=1e-6)
        assert got["of/rms"] == pytest.approx(float(np.sqrt((xn**2).mean())), rel=1e-6)
    x_btd = x.reshape(4, 24, 24)
    cos = stats.cosine_offdiag(x_btd)
    np.testing.assert_allclose(cos.numpy(), np_cos(x_btd.numpy()), rtol=1e-10)
    q, k = torch.randn(2, 3, 10, 8, generator=g), torch.randn(2, 3, 10, 8, generator=g) * 2
    ent_sum, ent_n = stats.attention_entropy(q, k)
    assert float(ent_sum / ent_n) == pytest.approx(np_entropy(q.numpy(), k.numpy()), rel=1e-5)


def test_reference_variants_written_out():
    """kurtosis_c1 is D/(D-1) times Kurt - 1 of the width-centred activations; the centred MMR
    differs from the paper's MMR when the tokens have a non-zero mean over the width."""
    x = torch.tensor([[1.0, 2.0, 3.0, 10.0], [0.5, -0.5, 1.5, 2.5], [4.0, 0.0, 1.0, 1.0]])
    c = x.double() - x.double().mean(-1, keepdim=True)
    d = x.shape[1]
    assert stats.kurtosis_c1(x) == pytest.approx(d / (d - 1) * (stats.kurtosis(c) - 1), rel=1e-12)
    # row 0: |x| = 1,2,3,10 -> 10/2; |x - 4| = 3,2,1,6 -> 6/2 (lower median of 4 values)
    # row 1: 2.5/0.5 and |x - 1| = 0.5,1.5,0.5,1.5 -> 1.5/0.5
    # row 2: |x| median 1 -> 4/1; |x - 1.5| = 2.5,1.5,0.5,0.5 -> 2.5/0.5
    assert stats.mmr(x) == pytest.approx((5.0 + 5.0 + 4.0) / 3, rel=1e-12)
    assert stats.mmr_centred(x) == pytest.approx((3.0 + 3.0 + 5.0) / 3, rel=1e-12)


def test_measured_rows_do_not_depend_on_layout():
    """The measured sequences are the same positions of the global batch under any DP size and
    micro-batch split, each measured exactly once."""
    for g, n in ((8, 4), (16, 16), (16, 0), (12, 5), (8, 100)):
        want = measured_positions(g, n)
        assert len(set(want.tolist())) == len(want) == (min(n, g) if n else g)
        for dp in (1, 2, 4):
            for mb in (1, 2, g // dp):
                if (g // dp) % mb:
                    continue
                got = [
                    r * (g // dp) + m * mb + rows
                    for r in range(dp)
                    for m, rows in enumerate(measured_rows(g, mb, dp, r, n))
                ]
                assert torch.equal(torch.cat(got), want), (g, n, dp, mb)
    assert measured_positions(16, 4).tolist() == [0, 4, 8, 12]


def test_entropy_blocks_and_uniform_attention(monkeypatch):
    t = 12
    q, k = torch.zeros(2, 3, t, 4), torch.randn(2, 3, t, 4)
    expected = sum(math.log(i + 1) for i in range(t)) / t  # query i attends uniformly to i+1 keys
    monkeypatch.setattr(stats, "ENTROPY_BLOCK_ELEMENTS", t * t)  # one head per block
    ent_sum, ent_n = stats.attention_entropy(q, k)
    assert float(ent_n) == 2 * 3 * t
    assert float(ent_sum / ent_n) == pytest.approx(expected, rel=1e-6)


def test_cosine_extremes_and_zero_median_tokens():
    same = torch.ones(2, 5, 8)
    np.testing.assert_allclose(stats.cosine_offdiag(same).numpy(), [1.0, 1.0], rtol=1e-12)
    eye = torch.eye(6)[None]  # orthogonal tokens
    assert float(stats.cosine_offdiag(eye)[0]) == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        stats.cosine_offdiag(torch.ones(1, 1, 4))
    relu = torch.tensor([[0.0, 0.0, 0.0, 2.0], [1.0, 2.0, 0.0, 4.0]])
    total, count = stats.mmr_terms(*stats.abs_max_and_median(relu))
    assert (float(total), float(count)) == (4.0, 1.0)  # row 0 has median 0 and is left out
    assert math.isnan(stats.mmr(torch.zeros(3, 4)))
    assert math.isnan(stats.kurtosis_from_moments(0.0, 0.0, 4))


def test_select_sites_and_bad_names():
    assert [s.name for s in select_sites(["all"], 2)] == [
        "embed",
        "block_00",
        "block_01",
        "final",
        "mlp_00",
        "mlp_01",
        "attn_00",
        "attn_01",
    ]
    assert [s.name for s in select_sites(["mlp", "block_1", "final"], 3)] == [
        "block_01",
        "final",
        "mlp_00",
        "mlp_01",
        "mlp_02",
    ]
    with pytest.raises(ValueError, match=r"unknown site 'block_07'.*n_layers=2"):
        select_sites(["block_07"], 2)
    with pytest.raises(ValueError, match="unknown site 'kurtosis'"):
        select_sites(["kurtosis"], 2)


def test_plots_from_jsonl(tmp_path):
    recs = []
    for step in range(1, 7):
        rec = {"step": step, "loss": 5.0 / step}
        if step % 2 == 0:
            for site in ("embed", "block_00", "final", "mlp_00"):
                rec[f"of/kurtosis/{site}"] = 1.0 + step
                rec[f"of/mmr/{site}"] = "nan" if site == "mlp_00" else 3.0
            rec["sigprop/cos/block_00"] = 0.1 * step
            rec["attn/entropy/attn_00"] = 1.5
        recs.append(rec)
    recs.append({"step": 6, "val_loss": 4.0, "val_ppl": 54.6})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + "{torn")
    assert len(load_records(tmp_path / "metrics.jsonl")) == len(recs)
    paths = write_plots(tmp_path)
    assert [p.name for p in paths] == ["kurtosis.png", "mmr.png", "sigprop.png", "loss.png"]
    for p in paths:
        assert p.read_bytes()[:4] == b"\x89PNG" and p.stat().st_size > 5000
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl does not exist"):
        write_plots(tmp_path / "nothing")
    # the training-dynamics instruments get their own figure, CMD's val loss joins loss.png
    for step, rec in enumerate(recs[:6], start=1):
        rec["collapse/dead_frac/mlp_00"] = 0.1 * step
        rec["collapse/gamma_small_frac/layers.0.norm2"] = 0.0
        rec["bln/aux_loss"] = 1.0 / step
        rec["cmd/rel_error"] = 0.01 * step
    recs.append({"step": 6, "val_loss": 4.0, "val_loss_cmd": 4.2})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    paths = write_plots(tmp_path, tmp_path / "again")
    assert [p.name for p in paths][-2:] == ["loss.png", "instruments.png"]
    assert (tmp_path / "again/instruments.png").stat().st_size > 5000
