"""checkpoint.init_from and checkpoint.resume_from=<path> on a TP=2 run's checkpoint, loaded by
TP=1 runs: resume_from continues at the saved step with its optimizer; init_from starts a new
run at step 0 with the same weights (and optimizer state when asked), evaluates as the TP=2 run
did, and a restart of that run resumes its own checkpoint; a different model is refused."""

from __future__ import annotations

import pytest
import torch

from ofs_scale.testing.distributed import run_distributed
from tests.helpers import tiny_overrides

pytestmark = pytest.mark.usefixtures("single_thread")


def _train(rank, overrides):
    from ofs_scale.config import load_config
    from ofs_scale.trainer.checkpointing import CheckpointCallback
    from ofs_scale.trainer.loop import Trainer

    trainer = Trainer(load_config(None, overrides), callbacks=[CheckpointCallback()])
    trainer.fit()
    return trainer.last_eval["val_loss"]


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.named_params}


def _moments(trainer) -> dict[str, torch.Tensor]:
    return {
        f"{n}/{k}": v.clone()
        for n, st in trainer.optimizer.named_state().items()
        for k, v in st.items()
        if isinstance(v, torch.Tensor)
    }


def _branch(rank, base, source_run, root):
    from ofs_scale.checkpoint import CheckpointError
    from ofs_scale.config import load_config
    from ofs_scale.parallel.mesh import init_mesh
    from ofs_scale.trainer.checkpointing import CheckpointCallback
    from ofs_scale.trainer.loop import Trainer

    mesh = init_mesh(1, 1)
    ckpt = source_run / "checkpoints" / "stage_main"

    def trainer(name, *extra):
        cfg = load_config(None, [*base, f"run.out_dir={root / name}", *extra])
        return Trainer(cfg, callbacks=[CheckpointCallback()], mesh=mesh)

    out = {}
    resumed = trainer("resumed", f"checkpoint.resume_from={ckpt}")
    resumed.resume()
    with_opt = trainer("with_opt", f"checkpoint.init_from={ckpt}", "checkpoint.init_optimizer=true")
    with_opt.resume()
    weights_only = trainer("weights", f"checkpoint.init_from={source_run}")  # a run directory
    weights_only.resume()
    out["steps"] = [t.step for t in (resumed, with_opt, weights_only)]
    out["tokens"] = [t.tokens for t in (resumed, with_opt, weights_only)]
    want = _weights(resumed)
    out["same_weights"] = [
        all(torch.equal(w[n], want[n]) for n in want)
        for w in map(_weights, (with_opt, weights_only))
    ]
    moments = _moments(resumed)
    out["resumed_moments_nonzero"] = all(bool(v.abs().sum() > 0) for v in moments.values())
    out["opt_same"] = all(torch.equal(_moments(with_opt)[k], v) for k, v in moments.items())
    out["weights_only_zero"] = all(
        bool(v.abs().sum() == 0) for v in _moments(weights_only).values()
    )
    out["val_loss"] = weights_only.evaluate()["val_loss"]
    # the branch trains from step 0; a restart then resumes its own checkpoint, not init_from
    weights_only.fit()
    trained = _weights(weights_only)
    restarted = trainer("weights", f"checkpoint.init_from={source_run}")
    restarted.resume()
    out["restart_step"] = restarted.step
    out["restart_own"] = all(torch.equal(trained[n], p) for n, p in _weights(restarted).items())
    out["moved_off_init"] = not all(torch.equal(trained[n], want[n]) for n in want)
    try:
        trainer("bad", f"checkpoint.init_from={ckpt}", "model.d_model=64").resume()
    except CheckpointError as e:
        out["refusal"] = str(e)
    return out


def test_init_from_and_resume_from_a_tp2_checkpoint(tiny_corpus, cache_dir, tmp_path):
    source = tmp_path / "source"
    base = tiny_overrides(tiny_corpus, cache_dir, source)
    (tp2_val, _) = run_distributed(_train, 2, [*base, "parallel.tp=2"])
    (got,) = run_distributed(_branch, 1, base, source, tmp_path)
    assert got["steps"] == [3, 0, 0]
    assert got["tokens"][1:] == [0, 0] and got["tokens"][0] > 0
    assert got["same_weights"] == [True, True]
    assert got["resumed_moments_nonzero"] and got["opt_same"] and got["weights_only_zero"]
    # the resharded weights compute what the TP=2 run computed on the same validation windows
    assert got["val_loss"] == pytest.approx(tp2_val, rel=1e-5)
    assert got["restart_step"] == 3 and got["restart_own"] and got["moved_off_init"]
    assert "checkpoint.init_from=" in got["refusal"]
    assert "model.d_model=32 (this run: 64)" in got["refusal"]


def test_init_from_settings_are_checked(tiny_cfg):
    from ofs_scale.config import ConfigError

    with pytest.raises(ConfigError, match="set only one"):
        tiny_cfg("checkpoint.init_from=/x", "checkpoint.resume_from=/y")
    with pytest.raises(ConfigError, match=r"init_optimizer=true needs checkpoint\.init_from"):
        tiny_cfg("checkpoint.init_optimizer=true")
    assert tiny_cfg("checkpoint.init_from=/x", "checkpoint.resume_from=latest")
