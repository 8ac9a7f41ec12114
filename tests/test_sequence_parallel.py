"""Sequence parallelism (gloo: megatron-core layers plus parallel/sequence.py's gather / split)
against TP without it and one process: same first-step gradients, losses, weights after a few
steps and OF metrics; TP=2 x PP=2 too. And when `parallel.sequence_parallel` is on."""

from __future__ import annotations

import pytest
import torch

from ofs_scale.config import ConfigError, load_config
from ofs_scale.config.checks import sequence_parallel_on
from ofs_scale.data import collate
from ofs_scale.instruments.of_metrics import MetricsCallback
from ofs_scale.parallel.gather import full_named
from ofs_scale.parallel.grads import average_across_dp, sum_sequence_parallel_grads
from ofs_scale.testing.distributed import run_distributed
from ofs_scale.trainer.loop import Trainer
from tests.helpers import Records, assert_weights_close, tiny_overrides

LR = 1e-3
# pre: norm gains and biases, learned positions (added to the sequence part), tied head;
# op: QK-norm, embedding LayerNorm, trainable betas, no block norms.
BLOCKS = {
    "pre": ["model.block=pre", "model.bias=true", "model.position=learned"],
    "op": ["model.block=op", "model.beta_trainable=true", "model.tie_embeddings=true"],
}
SP = ["parallel.tp=2", "parallel.sequence_parallel=true"]
LAYOUTS_2 = {
    "tp2": ["parallel.tp=2", "parallel.sequence_parallel=false"],
    "tp2_sp": SP,
    # the fp32 gradient buffers (`main_grad`) of the GPU step hold the gradients to sum
    "tp2_sp_buffers": [*SP, "parallel.overlap_grad_reduce=true"],
}
LAYOUTS_4 = {"tp2_pp2_sp": [*SP, "parallel.pp=2"]}
PREFIXES = ("of/", "sigprop/", "attn/")
# Each world size is one spawn that trains several tiny models; on the shared 2-core machine
# that can outlast the default 300 s.
pytestmark = pytest.mark.timeout(1200)


def _base(corpus, cache, out) -> list[str]:
    return [
        *tiny_overrides(corpus, cache, out),
        f"optim.lr={LR}",
        "metrics.every=1",
        "metrics.sequences=4",
    ]


def _first_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Full gradients of the first global batch after the step's reductions (DP average, TP sum
    of sequence-split gradients); the trainer is left as if nothing ran."""
    start = trainer.sampler.state_dict()
    batches = [collate(trainer.train_split, ids) for ids in trainer.sampler.next()]
    trainer.engine.forward_backward(batches)
    average_across_dp(trainer.params, trainer.mesh)
    sum_sequence_parallel_grads(trainer.params, trainer.mesh)
    grads = full_named(trainer.named_params, trainer.mesh, grads=True)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.sampler.load_state_dict(start)
    return grads


def _run(rank, base, layouts):
    out = {}
    for name, over in layouts.items():
        for block, block_over in BLOCKS.items():
            if ("pp2" in name or "buffers" in name) and block == "op":
                continue  # (PP: tied embeddings need one stage) the Pre-Norm block covers it
            cfg = load_config(None, [*base, *block_over, *over])
            records = Records()
            trainer = Trainer(cfg, callbacks=[MetricsCallback(plots=False), records])
            grads = _first_grads(trainer)
            trainer.fit()
            out[name, block] = {
                "sp": [c.factory.sequence_parallel for c in trainer.engine.chunks],
                "grads": grads,
                "weights": full_named(trainer.named_params, trainer.mesh),
                "losses": [r["loss"] for r in records.records],
                "metrics": [
                    {k: v for k, v in r.items() if k.startswith(PREFIXES)} for r in records.records
                ],
            }
    return out


@pytest.fixture(scope="module")
def base(tiny_corpus, cache_dir, tmp_path_factory):
    return _base(tiny_corpus, cache_dir, tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def one(base):
    return run_distributed(_run, 1, base, {"one": []})[0]


@pytest.fixture(scope="module")
def two(base):
    return run_distributed(_run, 2, base, LAYOUTS_2)


@pytest.fixture(scope="module")
def four(base):
    return run_distributed(_run, 4, base, LAYOUTS_4)


def _merged(results: list[dict], key: tuple[str, str], field: str) -> dict:
    out: dict = {}
    for res in results:
        out.update(res[key][field])
    return out


@pytest.mark.parametrize("layout", [*LAYOUTS_2, *LAYOUTS_4])
def test_layout_equals_single_process(one, layout, request):
    results = request.getfixturevalue("two" if layout in LAYOUTS_2 else "four")
    for block in BLOCKS:
        key = (layout, block)
        if key not in results[0]:
            continue
        want = one["one", block]
        for res in results:
            assert all(res[key]["sp"]) == ("_sp" in layout), key
            assert res[key]["losses"] == pytest.approx(want["losses"], rel=1e-5), key
            first, want_first = res[key]["metrics"][0], want["metrics"][0]
            assert sorted(first) == sorted(want_first), key
            for k, v in want_first.items():
                assert first[k] == pytest.approx(v, rel=1e-5, nan_ok=True), (key, k)
        grads = _merged(results, key, "grads")
        assert grads.keys() == want["grads"].keys(), key
        for name, g in want["grads"].items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=f"{key} {name}")
        assert_weights_close(_merged(results, key, "weights"), want["weights"], LR)


def _cfg(*over: str):
    return load_config(None, ["model.n_heads=4", *over])


def test_auto_is_on_with_cuda_and_tp_only():
    assert sequence_parallel_on(_cfg("parallel.tp=2"), cuda=True)
    assert not sequence_parallel_on(_cfg("parallel.tp=2"), cuda=False)
    assert not sequence_parallel_on(_cfg("parallel.tp=1"), cuda=True)
    assert not sequence_parallel_on(_cfg("parallel.tp=2", "model.norm=psbn"), cuda=True)
    assert sequence_parallel_on(_cfg(*SP), cuda=False)
    # a run's config with `true` still loads at tp=1 (evaluation, quantisation): off there
    assert not sequence_parallel_on(_cfg("parallel.sequence_parallel=true"), cuda=True)


@pytest.mark.parametrize(
    ("over", "words"),
    [
        (["parallel.tp=2", "data.seq_len=15"], "data.seq_len=15"),
        (["parallel.tp=2", "model.norm=batchless"], "model.norm=batchless"),
    ],
)
def test_explicit_true_that_cannot_run_is_refused(over, words):
    with pytest.raises(ConfigError, match=r"parallel\.sequence_parallel=true") as err:
        _cfg(*over, "parallel.sequence_parallel=true")
    assert words in str(err.value)
