"""Regional torch.compile (`train.compile`) against the eager model, and the cached RoPE tables.

The compiled runs use the `aot_eager` backend: the same Dynamo graphs and AOTAutograd joint
graphs as inductor, without inductor's C++ build, which takes minutes per graph on the 2-core
test machine (inductor itself is exercised by benchmarks/bench_compile.py).
"""

from __future__ import annotations

import math

import torch

from ofs_scale.config import load_config
from ofs_scale.model.blocks import rope_tables
from ofs_scale.testing.distributed import run_distributed
from tests.helpers import Losses, tiny_overrides


def _fit(overrides: list[str], compiled: bool) -> tuple[list[float], dict, dict]:
    """Losses, final weights and the step-2 OF metrics of a 3-step run."""
    from torch._dynamo.utils import counters

    from ofs_scale.instruments.of_metrics import MetricsCallback
    from ofs_scale.trainer.loop import Trainer

    cfg = load_config(None, overrides)
    losses, metrics = Losses(), MetricsCallback(plots=False)
    trainer = Trainer(cfg, callbacks=[losses, metrics])
    if compiled:
        torch._dynamo.reset()  # compile afresh, so the counter below sees this run's blocks
        for chunk in trainer.engine.chunks:
            chunk.compile_blocks(backend="aot_eager")
    counters.clear()
    trainer.fit()
    assert not compiled or counters["frames"]["ok"] > 0, "no block ran compiled"
    params = {n: p.detach().clone() for n, p in trainer.named_params}
    return losses.losses, params, metrics.last


def _metrics_once(overrides: list[str]) -> tuple[dict, dict]:
    """OF metrics of one forward pass of the same weights, compiled and eager."""
    from ofs_scale.metrics.collect import Collector, select_sites
    from ofs_scale.model.build import build_model
    from ofs_scale.parallel.mesh import init_mesh

    cfg = load_config(None, overrides)
    mesh = init_mesh(1, 1)
    model = build_model(cfg, mesh, 512)
    tokens = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(1))
    out = []
    for compiled in (True, False):
        model.compiled = {}
        if compiled:
            model.compile_blocks(backend="aot_eager")
        collector = Collector(select_sites(["all"], cfg.model.n_layers), mesh)
        collector.attach([model])
        with torch.no_grad():
            model(tokens)
        out.append(collector.reduce())
        collector.detach()
    return out[0], out[1]


def _all_checks(rank: int, base: list[str], tmp) -> dict:
    torch.manual_seed(0)
    res = {}
    metric = [*base, "metrics.every=2"]
    res["eager"] = _fit([*metric, f"run.out_dir={tmp}/eager"], compiled=False)
    res["compiled"] = _fit([*metric, f"run.out_dir={tmp}/compiled"], compiled=True)
    recompute = [*metric, "train.activation_checkpointing=true"]
    res["recompute"] = _fit([*recompute, f"run.out_dir={tmp}/recompute"], compiled=True)
    res["metrics"] = _metrics_once(base)
    return res


def test_compiled_blocks_match_eager(tiny_corpus, cache_dir, tmp_path):
    base = [*tiny_overrides(tiny_corpus, cache_dir, tmp_path / "run"), "train.compile=false"]
    (res,) = run_distributed(_all_checks, 1, base, tmp_path)
    l_eager, p_eager, m_eager = res["eager"]
    for key in ("compiled", "recompute"):
        losses, params, metrics = res[key]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(l_eager), rtol=1e-5, atol=0)
        for n, p in p_eager.items():
            torch.testing.assert_close(params[n], p, rtol=1e-5, atol=1e-5, msg=n)
        assert metrics.keys() == m_eager.keys() and metrics
        for k, v in m_eager.items():
            assert math.isclose(metrics[k], v, rel_tol=1e-4, abs_tol=1e-6), k
    got, want = res["metrics"]
    assert got == want  # metric steps run the blocks eagerly: identical, not just close


def test_rope_tables_are_cached_and_exact():
    T, K, theta = 12, 8, 10000.0
    cos, sin = rope_tables(T, K, theta, "cpu", torch.float32)
    again = rope_tables(T, K, theta, torch.device("cpu"), torch.float32)
    assert again[0] is cos and again[1] is sin  # built once, shared by every layer and step
    assert rope_tables(T, K, theta, "cpu", torch.bfloat16)[0].dtype == torch.bfloat16
    # RoPE from its definition: pair (i, i + K/2) at position t turns by t * theta^(-2i/K)
    t = torch.arange(T, dtype=torch.float64)[:, None]
    ang = t * theta ** (-torch.arange(0, K, 2, dtype=torch.float64) / K)
    want_cos = torch.cat([ang.cos(), ang.cos()], dim=-1)
    want_sin = torch.cat([ang.sin(), ang.sin()], dim=-1)
    torch.testing.assert_close(cos.double(), want_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin.double(), want_sin, rtol=0, atol=1e-6)
    with torch.inference_mode():
        fresh = rope_tables(T + 1, K, theta, "cpu", torch.float32)[0]
    assert not fresh.is_inference()  # usable later by a training forward


def _pipeline_checks(rank: int, base: list[str], tmp) -> dict:
    pp = [*base, "parallel.pp=2", "train.activation_checkpointing=true"]
    eager = _fit([*pp, f"run.out_dir={tmp}/eager"], compiled=False)
    compiled = _fit([*pp, f"run.out_dir={tmp}/compiled"], compiled=True)
    return {"eager": eager, "compiled": compiled}


def test_compiled_blocks_under_pipeline_parallelism(tiny_corpus, cache_dir, tmp_path):
    base = [*tiny_overrides(tiny_corpus, cache_dir, tmp_path / "run"), "train.compile=false"]
    for res in run_distributed(_pipeline_checks, 2, base, tmp_path):
        (l_eager, p_eager, _), (losses, params, _) = res["eager"], res["compiled"]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(l_eager), rtol=1e-5, atol=0)
        assert params.keys() == p_eager.keys() and params
        for n, p in p_eager.items():
            torch.testing.assert_close(params[n], p, rtol=1e-5, atol=1e-5, msg=n)
