"""OF metrics under TP, DP, PP, mixes and micro-batch splits equal one process on the same
measured sequences and weights; hooks are live only on metric steps; the CLI prints the table
and plots."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist

from ofs_scale.config import load_config
from ofs_scale.data import collate
from ofs_scale.instruments.of_metrics import MetricsCallback
from ofs_scale.metrics.collect import Collector, distributed_kth, select_sites
from ofs_scale.metrics.measured import measured_positions
from ofs_scale.testing.distributed import run_distributed
from ofs_scale.trainer.callbacks import Callback
from ofs_scale.trainer.loop import Trainer
from tests.helpers import tiny_overrides

BLOCKS = ["pre", "op"]  # op: QK-norm, ReLU MLP (many zero medians), no block norms
PREFIXES = ("of/", "sigprop/", "attn/")
# global_batch 8, metrics.sequences 4: positions 0, 2, 4, 6 of the global batch are measured,
# spread over both DP ranks and over several micro batches, whatever the layout.
SEQUENCES = 4
LAYOUTS_2 = {
    "tp2": ["parallel.tp=2", "train.micro_batch=4"],
    "dp2": ["train.micro_batch=2"],
    "pp2": ["parallel.pp=2", "train.micro_batch=2"],
    "pp2_interleaved": [
        "parallel.pp=2",
        "parallel.virtual_stages=2",
        "parallel.schedule=interleaved",
        "train.micro_batch=4",
    ],
}
LAYOUTS_4 = {
    "tp2_dp2": ["parallel.tp=2", "train.micro_batch=2"],
    "pp2_tp2": ["parallel.pp=2", "parallel.tp=2", "train.micro_batch=1"],
    "pp2_dp2": ["parallel.pp=2", "train.micro_batch=2"],
}


class Capture(Callback):
    """Records every step record and the number of live forward hooks at each hook point."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.hooks: dict[str, list[int]] = {"pre": [], "post": [], "eval": []}

    @staticmethod
    def live_hooks(trainer: Trainer) -> int:
        return sum(len(m._forward_hooks) for c in trainer.engine.chunks for m in c.modules())

    def pre_step(self, trainer, step):
        self.hooks["pre"].append(self.live_hooks(trainer))

    def post_step(self, trainer, step, record):
        self.hooks["post"].append(self.live_hooks(trainer))
        self.records.append(dict(record))

    def on_eval(self, trainer, step, record):
        self.hooks["eval"].append(self.live_hooks(trainer))


def layout_blocks(name: str) -> list[str]:
    """Both block types where TP splits MLP neurons and heads (zero medians in ReLU hidden
    units, QK-norm); the Pre-Norm block alone elsewhere, to keep the test short."""
    return BLOCKS if "tp" in name else ["pre"]


def metric_part(record: dict) -> dict[str, float]:
    return {k: v for k, v in record.items() if k.startswith(PREFIXES)}


def _base(corpus, cache, out) -> list[str]:
    return [
        *tiny_overrides(corpus, cache, out),
        "model.n_layers=4",
        "metrics.every=1",
        f"metrics.sequences={SEQUENCES}",
        "train.stages=[{name: main, steps: 1}]",
    ]


def _direct(trainer: Trainer, ids) -> dict[str, float]:
    """Metrics of one forward pass over samples `ids` in this (single) process."""
    x, _ = collate(trainer.train_split, ids)
    collector = Collector(select_sites(["all"], trainer.cfg.model.n_layers), trainer.mesh)
    collector.attach(trainer.engine.chunks)
    try:
        with torch.no_grad():
            trainer.engine.model(x)
        return collector.reduce()
    finally:
        collector.detach()


def _reference(rank, base):
    """One process, one micro batch of the whole global batch (a spawned process like the
    layouts': one thread, no state left over from other tests)."""
    out = {}
    for block in BLOCKS:
        cfg = load_config(None, [*base, f"model.block={block}", "train.micro_batch=8"])
        cap = Capture()
        trainer = Trainer(cfg, callbacks=[MetricsCallback(plots=False), cap])
        ids = trainer.sampler.global_batch_ids(0)
        out[block, "measured"] = _direct(trainer, ids[measured_positions(8, SEQUENCES).numpy()])
        out[block, "full"] = _direct(trainer, ids)
        trainer.fit()
        out[block, "trainer"] = metric_part(cap.records[0])
    # hooks only on metric steps, never during evaluation
    cfg = load_config(
        None,
        [*base, "metrics.every=2", "train.eval_every=1", "train.stages=[{name: main, steps: 3}]"],
    )
    cap = Capture()
    Trainer(cfg, callbacks=[MetricsCallback(plots=False), cap]).fit()
    out["steps"] = [sorted(metric_part(r)) for r in cap.records]
    out["hooks"] = cap.hooks
    return out


def _layouts(rank, base, layouts):
    out = {}
    for name, over in layouts.items():
        for block in layout_blocks(name):
            cfg = load_config(None, [*base, *over, f"model.block={block}"])
            cap = Capture()
            Trainer(cfg, callbacks=[MetricsCallback(plots=False), cap]).fit()
            out[name, block] = metric_part(cap.records[0])
    if dist.get_world_size() == 2:
        out["kth"] = _kth_check(rank)
    return out


def _kth_check(rank) -> bool:
    """distributed_kth over two ranks' columns equals kthvalue of the full rows, for every k,
    with ties, zeros, subnormals and infinities."""
    g = torch.Generator().manual_seed(0)
    full = torch.randn(6, 10, generator=g).abs() * torch.logspace(-30, 30, 10)
    full[0] = 0.0
    full[1, :7] = 0.0
    full[2] = 3.0
    full[3, 4] = math.inf
    full[4, 2] = 1e-42  # subnormal float32
    mine = full[:, :5] if rank == 0 else full[:, 5:]
    group = dist.new_group([0, 1])
    for k in range(10):
        got = distributed_kth(mine, k, group)
        if not torch.equal(got, full.kthvalue(k + 1, dim=-1).values):
            return False
    return True


@pytest.fixture(scope="module")
def runs(tiny_corpus, cache_dir, tmp_path_factory):
    base = _base(tiny_corpus, cache_dir, tmp_path_factory.mktemp("metrics_par"))
    (ref,) = run_distributed(_reference, 1, base)
    two = run_distributed(_layouts, 2, base, LAYOUTS_2)
    four = run_distributed(_layouts, 4, base, LAYOUTS_4)
    return ref, two, four


def assert_same(got: dict, want: dict, what: str, rtol: float = 1e-5) -> None:
    """Same keys, and every value within `rtol` (NaN equals NaN); a failure names the key and
    prints both values."""
    assert sorted(got) == sorted(want), what
    for key, value in want.items():
        a, b = torch.tensor(got[key]), torch.tensor(value)
        torch.testing.assert_close(
            a,
            b,
            rtol=rtol,
            atol=0,
            equal_nan=True,
            msg=lambda m, k=key, a=got[key], b=value: f"{what} {k}: got {a!r}, want {b!r}\n{m}",
        )


def test_trainer_measures_the_chosen_sequences_like_one_forward(runs):
    ref, _, _ = runs
    for block in BLOCKS:
        want = ref[block, "measured"]
        assert_same(ref[block, "trainer"], want, f"{block} trainer", rtol=1e-12)
        assert ref[block, "full"]["of/kurtosis/block_00"] != want["of/kurtosis/block_00"]
    keys = ref["pre", "measured"]
    assert {
        f"of/{m}/block_03"
        for m in ("kurtosis", "kurtosis_c1", "mmr", "mmr_centred", "max_abs", "rms")
    } <= set(keys)
    assert {"sigprop/cos/embed", "sigprop/cos/final", "attn/entropy/attn_03"} <= set(keys)
    assert {"of/kurtosis/mlp_02", "of/kurtosis_max", "of/kurtosis_mean"} <= set(keys)
    assert "sigprop/cos/mlp_00" not in keys


@pytest.mark.parametrize("world", [2, 4])
def test_layouts_equal_single_process(runs, world):
    ref, two, four = runs
    results, layouts = (two, LAYOUTS_2) if world == 2 else (four, LAYOUTS_4)
    for name in layouts:
        for block in layout_blocks(name):
            for rank, res in enumerate(results):  # every rank ends with every value
                assert_same(res[name, block], ref[block, "trainer"], f"{name} {block} rank {rank}")


def test_distributed_median_is_exact(runs):
    _, two, _ = runs
    assert all(r["kth"] for r in two)


def test_hooks_only_on_metric_steps(runs):
    ref, _, _ = runs
    no_metrics, with_metrics, _ = ref["steps"]
    assert no_metrics == [] and len(with_metrics) > 30 and ref["steps"][2] == []
    hooks = ref["hooks"]
    assert hooks["pre"][0] == 0 and hooks["pre"][1] > 0 and hooks["pre"][2] == 0
    assert hooks["post"] == [0, 0, 0] and hooks["eval"] == [0, 0, 0]


def test_cli_prints_table_and_writes_plots(tiny_corpus, cache_dir, tmp_path, capsys):
    from ofs_scale.analysis.plot_cli import main as plot_main
    from ofs_scale.trainer.main import main

    over = [
        *tiny_overrides(tiny_corpus, cache_dir, tmp_path),
        "metrics.every=2",
        "train.stages=[{name: main, steps: 4}]",
    ]
    assert main(over) == 0
    out = capsys.readouterr().out
    assert "outlier features, step 4" in out and "kurt / MMR / cos block_01" in out
    for name in ("kurtosis.png", "mmr.png", "sigprop.png", "loss.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 5000 and name in out
    # GELU: no dead units, no small gains; an all-zero instruments figure is not drawn
    assert "instruments.png not drawn: every instrument logged only zeros" in out
    assert not (tmp_path / "plots/instruments.png").exists()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [("of/kurtosis/final" in r) for r in recs if "loss" in r]
    assert steps == [False, True, False, True]
    assert not any(k.startswith(PREFIXES) for r in recs if "val_loss" in r for k in r)
    assert plot_main([str(tmp_path), "--out", str(tmp_path / "again")]) == 0
    assert len(list((tmp_path / "again").glob("*.png"))) == 4
    assert main([*over, "metrics.sites=[block_09]"]) == 2
    assert "unknown site 'block_09'" in capsys.readouterr().out
