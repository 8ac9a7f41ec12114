"""DeepSpeed ZeRO-1/2 engine: same losses as the native engine, exact resume, zero_to_fp32.py
consolidation, config checks.

All multi-process checks share one `run_distributed` call per layout (spawning and building
DeepSpeed's shared-memory extension dominate the cost). The extension is cached under
~/.cache/ofs_scale/torch_extensions so only the first run on a machine compiles it (~1 min).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ofs_scale.checkpoint import CheckpointError
from ofs_scale.config import ConfigError, load_config
from ofs_scale.testing.distributed import run_distributed
from ofs_scale.trainer.checkpointing import CheckpointCallback
from tests.helpers import Records, assert_weights_close, crashed_save, tiny_overrides

# Before DeepSpeed is imported: its accelerator is chosen once, at first use.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path("~/.cache/ofs_scale/torch_extensions").expanduser())
)
pytest.importorskip("deepspeed")
# The first run on a machine compiles the extension (~1 min idle, several on a busy machine):
# the multi-process tests get more than pytest's default 300 s (the harness itself waits as long
# as the ranks live).
SLOW_FIRST_RUN = pytest.mark.timeout(1200)

TEN_STEPS = (
    "train.stages=[{name: warm, steps: 4, lr_schedule: warmup}, "
    "{name: decay, steps: 6, lr_schedule: cosine}]"
)
FIRST_STAGE = "train.stages=[{name: warm, steps: 4, lr_schedule: warmup}]"


def _fit(overrides: list[str], *extra: str, checkpoints: bool = False, metrics: bool = False):
    from ofs_scale.instruments.of_metrics import MetricsCallback
    from ofs_scale.trainer.loop import Trainer

    rec = Records()
    trainer = Trainer(load_config(None, [*overrides, *extra]), callbacks=[rec])
    if checkpoints:
        trainer.callbacks.append(CheckpointCallback())
    if metrics:
        trainer.callbacks.append(MetricsCallback(plots=False))
    trainer.fit()
    params = {n: p.detach().float().clone() for n, p in trainer.named_params}
    return trainer, [r["loss"] for r in rec.records], params, rec.records


def _dp2_checks(rank: int, base: list[str], out: Path) -> dict:
    """Native vs ZeRO-1 vs ZeRO-2 over 10 fp32 steps (losses, weights, OF metrics), resume 4+6,
    quantisation eval of a DeepSpeed checkpoint, bf16 and non-finite skip checks."""
    ds = "train.engine=deepspeed"
    of = "metrics.every=5"
    res: dict = {}
    _, res["native"], res["native_params"], recs = _fit(
        base, TEN_STEPS, of, f"run.out_dir={out}/n", metrics=True
    )
    res["native_of"] = [{k: v for k, v in r.items() if k.startswith("of/")} for r in recs]
    for stage in (1, 2):
        t, res[f"zero{stage}"], res[f"zero{stage}_params"], recs = _fit(
            base,
            TEN_STEPS,
            ds,
            of,
            f"train.zero_stage={stage}",
            f"run.out_dir={out}/z{stage}",
            metrics=True,
        )
        res[f"zero{stage}_of"] = [{k: v for k, v in r.items() if k.startswith("of/")} for r in recs]
        res[f"zero{stage}_norms"] = [r["grad_norm"] for r in recs]
        res[f"zero{stage}_bytes"] = t.engine.optimizer_state_bytes()
    # Exact resume: 4 steps, stage checkpoint, then a fresh trainer resumes and runs 6 more.
    resumed = f"run.out_dir={out}/resumed"
    _, first, _, _ = _fit(base, FIRST_STAGE, ds, "train.zero_stage=2", resumed, checkpoints=True)
    # (the second part recomputes its blocks in backward: activation checkpointing changes
    # nothing under DeepSpeed either)
    t, second, res["resumed_params"], _ = _fit(
        base,
        TEN_STEPS,
        ds,
        "train.zero_stage=2",
        resumed,
        "train.activation_checkpointing=true",
        checkpoints=True,
    )
    res["resumed"], res["resumed_step"] = first + second, t.step
    # Quantisation eval rebuilds the native model from the DCP weights of the checkpoint.
    from ofs_scale.quant.evaluate import load_run, resolve, val_loss

    res["val_loss"] = t.last_eval["val_loss"]
    res["quant_val_loss"] = val_loss(load_run(resolve(out / "resumed")), 1)
    # bf16 (DeepSpeed's bf16 weights, fp32 master): close to the fp32 run, loosely.
    _, res["zero2_bf16"], _, _ = _fit(
        base, TEN_STEPS, ds, "train.dtype=bf16", f"run.out_dir={out}/zb"
    )
    # A NaN weight in bf16: DeepSpeed skips the update, the trainer counts bad steps and stops
    # with a checkpoint (marked unhealthy) that a fresh trainer resumes when told to.
    from ofs_scale.trainer.loop import Trainer, TrainingStopped

    nan = [*base, ds, "train.dtype=bf16", "train.max_bad_steps=2", f"run.out_dir={out}/nan"]
    cfg = load_config(None, nan)
    trainer = Trainer(cfg, callbacks=[])
    with torch.no_grad():
        trainer.params[0].fill_(float("nan"))
    before = [p.detach().clone() for p in trainer.params[1:]]
    with pytest.raises(TrainingStopped, match="2 non-finite steps"):
        trainer.fit()
    res["nan_unchanged"] = all(torch.equal(a, p) for a, p in zip(before, trainer.params[1:]))
    cfg.checkpoint.resume_from = "latest"
    res["nan_resumed"] = Trainer(cfg, callbacks=[]).resume()
    return res


@SLOW_FIRST_RUN
def test_deepspeed_matches_native_and_resumes(tiny_corpus, cache_dir, tmp_path):
    # 2 micro batches per rank (DeepSpeed's gradient accumulation), clipping on every step
    over = ["train.micro_batch=2", "train.grad_clip=0.5"]
    base = [*tiny_overrides(tiny_corpus, cache_dir, tmp_path / "run"), *over]
    ranks = run_distributed(_dp2_checks, 2, base, tmp_path)
    r = ranks[0]
    native = torch.tensor(r["native"])
    assert native[-1] < native[0]
    for stage in (1, 2):
        torch.testing.assert_close(torch.tensor(r[f"zero{stage}"]), native, rtol=1e-5, atol=0)
        assert_weights_close(r[f"zero{stage}_params"], r["native_params"], lr=1e-3)
        for other in ranks[1:]:  # every DP rank holds the same weights after the all-gather
            for n, p in r[f"zero{stage}_params"].items():
                torch.testing.assert_close(other[f"zero{stage}_params"][n], p, rtol=0, atol=0)
    # grad_clip=0.5 is below every norm, so every step above was clipped, by both engines
    assert min(r["zero2_norms"]) > 0.5
    torch.testing.assert_close(
        torch.tensor(r["zero1_norms"]), torch.tensor(r["zero2_norms"]), rtol=1e-5, atol=0
    )
    assert r["resumed_step"] == 10 and len(r["resumed"]) == 10
    torch.testing.assert_close(torch.tensor(r["resumed"]), torch.tensor(r["zero2"]), rtol=0, atol=0)
    for n, p in r["zero2_params"].items():
        torch.testing.assert_close(r["resumed_params"][n], p, rtol=0, atol=0, msg=n)
    stage_dir = tmp_path / "resumed/checkpoints/stage_warm"
    assert (stage_dir / "ofs_meta.json").is_file() and (stage_dir / ".metadata").is_file()
    assert (stage_dir / "mp_rank_00_model_states.pt").is_file()
    assert (tmp_path / "resumed/checkpoints/latest").read_text().strip() == "stage_decay"
    # ZeRO: each rank holds about half of the AdamW moments and master weights
    full = sum(p.numel() for p in r["native_params"].values()) * 4
    for stage in (1, 2):
        b = r[f"zero{stage}_bytes"]
        assert full <= 2 * b["master"] <= full + 4096
    torch.testing.assert_close(torch.tensor(r["zero2_bf16"]), native, rtol=2e-2, atol=0)
    assert r["nan_unchanged"] and r["nan_resumed"] == tmp_path / "nan/checkpoints/step_000002"
    # the OF metrics see the same activations through trainer.engine.chunks
    assert r["native_of"][4] and r["native_of"][9]
    for stage in (1, 2):
        for mine, ref in zip(r[f"zero{stage}_of"], r["native_of"]):
            assert mine.keys() == ref.keys()
            for k in ref:
                assert mine[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-6), k
    assert r["quant_val_loss"] == pytest.approx(r["val_loss"], rel=1e-5)
    # DeepSpeed's zero_to_fp32.py (dropped next to the checkpoints) follows our `latest` and
    # merges the two ZeRO-2 partitions into the weights the run ended with
    root, merged = tmp_path / "resumed/checkpoints", tmp_path / "merged"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(root / "zero_to_fp32.py"), str(root), str(merged)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    state = torch.load(merged / "pytorch_model.bin", weights_only=True)
    for n, p in r["resumed_params"].items():
        torch.testing.assert_close(state[n], p, rtol=0, atol=0, msg=n)


def _tp2_checks(rank: int, base: list[str], out: Path) -> dict:
    """TP=2, DP=1: DeepSpeed's DP group must be our (size 1) DP group, not the world; then
    checkpoint safety: a crash before the rename is skipped, and a run whose only checkpoint
    is a native one stops instead of starting over it."""
    from ofs_scale.engine import deepspeed as deepspeed_engine
    from ofs_scale.trainer.loop import Trainer

    tp, ds = "parallel.tp=2", "train.engine=deepspeed"
    _, native, _, _ = _fit(base, tp, f"run.out_dir={out}/n", checkpoints=True)
    t, zero, good, _ = _fit(base, tp, ds, f"run.out_dir={out}/z", checkpoints=True)

    # after DeepSpeed's files and the DCP part, before the rename
    crashed_save(t, deepspeed_engine, "save_shard_state")
    fresh = Trainer(load_config(None, [*base, tp, ds, f"run.out_dir={out}/z"]), callbacks=[])
    path = fresh.resume()
    restored = all(torch.equal(p.detach(), good[n]) for n, p in fresh.named_params)
    messages: list[str] = []
    other = Trainer(load_config(None, [*base, tp, ds, f"run.out_dir={out}/n"]), callbacks=[])
    other.log = messages.append
    with pytest.raises(CheckpointError, match="none of the 1 checkpoints") as refused:
        other.resume()  # a fresh DeepSpeed run would overwrite the native run's stage_main
    return {
        "native": native,
        "zero": zero,
        "leftovers": sorted(p.name for p in (out / "z/checkpoints").iterdir()),
        "resumed": (path.name, fresh.step, restored),
        "native_ckpt": (str(refused.value), messages),
    }


@SLOW_FIRST_RUN
def test_deepspeed_tensor_parallel_and_checkpoint_safety(tiny_corpus, cache_dir, tmp_path):
    base = tiny_overrides(tiny_corpus, cache_dir, tmp_path / "run")
    ranks = run_distributed(_tp2_checks, 2, base, tmp_path)
    for r in ranks:
        torch.testing.assert_close(
            torch.tensor(r["zero"]), torch.tensor(r["native"]), rtol=1e-5, atol=0
        )
        assert ".tmp-step_000099" in r["leftovers"] and "step_000099" not in r["leftovers"]
        assert r["resumed"] == ("stage_main", 3, True)
        assert "new run.out_dir" in r["native_ckpt"][0]
    # rank 0 reports why the native run's checkpoint cannot resume a DeepSpeed engine
    assert any("written by the native engine" in m for m in ranks[0]["native_ckpt"][1])
    assert (tmp_path / "z/checkpoints/latest").read_text().strip() == "stage_main"
    stage = tmp_path / "z/checkpoints/stage_main"
    assert (stage / "mp_rank_00_model_states.pt").is_file()
    assert (stage / "mp_rank_01_model_states.pt").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["parallel.pp=2"], "does not support parallel.pp=2"),
        (["optim.name=soap"], "supports only optim.name=adamw"),
        (["train.zero_stage=3"], "train.zero_stage=3 is not allowed"),
    ],
)
def test_deepspeed_config_is_checked(extra, message, tiny_corpus, cache_dir, tmp_path):
    base = tiny_overrides(tiny_corpus, cache_dir, tmp_path)
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*base, "train.engine=deepspeed", *extra])
