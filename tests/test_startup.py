"""Validation and start-up (issue 18): what the dry run checks, a single .txt corpus split by its
tokens, the start-up table, model FLOPs per token and MFU, and wandb naming and credentials."""

from __future__ import annotations

import json
import math

import pytest

from ofs_scale.config import load_config
from ofs_scale.data.corpus import stdlib_root
from ofs_scale.model.flops import flops_per_token, matmul_params
from ofs_scale.trainer.callbacks import Callback
from ofs_scale.trainer.wandb_auth import missing_wandb_login, wandb_run_name
from tests.helpers import tiny_overrides

pytestmark = pytest.mark.usefixtures("single_thread")


def test_flops_per_token_by_hand(tiny_cfg):
    from ofs_scale.model.shapes import stage_param_shapes

    cfg = tiny_cfg()  # d 32, 2 layers, ffn 4 x 32 = 128, gelu, vocab 512, seq_len 16
    n = 2 * (4 * 32 * 32 + 2 * 32 * 128) + 512 * 32  # Q K V O and up/down per layer, head
    assert matmul_params(cfg, 512) == n == 40960
    assert flops_per_token(cfg, 512) == 6 * n + 12 * 2 * 16 * 32 == 258048
    swiglu = tiny_cfg("model.activation=swiglu")
    assert matmul_params(swiglu, 512) == 2 * (4 * 32 * 32 + 3 * 32 * 128) + 512 * 32
    # the same N from the built model: every matrix but the token embedding
    shapes = stage_param_shapes(cfg, 512)[0]
    matrices = [s for name, s in shapes if len(s) == 2 and name != "embed.tok.weight"]
    assert sum(math.prod(s) for s in matrices) == n


def test_dry_run_names_missing_corpus_unknown_sites_and_paths(
    tiny_corpus, cache_dir, tmp_path, capsys
):
    from ofs_scale.trainer.main import main

    base = tiny_overrides(tiny_corpus, cache_dir, tmp_path / "run")
    assert main(["--dry-run", *base]) == 0
    assert "parameters (total)" in capsys.readouterr().out
    nowhere = tmp_path / "nowhere.txt"
    bad = [
        f"data.corpus={nowhere}",
        "metrics.sites=[resid, block_05]",
        f"checkpoint.resume_from={tmp_path / 'no_ckpt'}",
        "parallel.tp=2",
    ]

    def errors(*overrides: str) -> list[str]:
        assert main(["--dry-run", *base, *overrides]) == 2
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("error")]

    found = errors(*bad)
    assert len(found) == 4, found
    assert f"data.corpus='{nowhere}' is neither" in found[0]
    assert "metrics.sites: unknown site 'block_05'" in found[1] and "n_layers=2" in found[1]
    assert f"checkpoint.resume_from={tmp_path / 'no_ckpt'} is not a checkpoint" in found[2]
    assert "parallel.tp*parallel.pp=2" in found[3] and "launch" in found[3]
    (found,) = errors(f"checkpoint.init_from={tmp_path / 'no_run'}")
    assert f"checkpoint.init_from={tmp_path / 'no_run'} does not exist" in found
    assert not (tmp_path / "run").exists()  # the dry run creates nothing


def test_wandb_name_and_missing_login(tiny_corpus, cache_dir, tmp_path, monkeypatch, capsys):
    from ofs_scale.trainer.main import main

    assert wandb_run_name("smoke", "runs/smoke") == "smoke"
    assert wandb_run_name("smoke", "runs/sweep/lr-3e-3/") == "smoke/lr-3e-3"
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert missing_wandb_login("offline") is None
    problem = missing_wandb_login("online")
    assert "wandb login" in problem and "logging.wandb=offline" in problem and "\n" not in problem
    base = tiny_overrides(tiny_corpus, cache_dir, tmp_path / "run")
    assert main([*base, "logging.wandb=online"]) == 2
    out = capsys.readouterr().out
    assert out.count("error:") == 1 and "wandb login" in out and "Traceback" not in out
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert missing_wandb_login("online") is None


class SeeWandb(Callback):
    """Reads the wandb run's name, group and tags while it is open."""

    def __init__(self) -> None:
        self.seen: dict = {}

    def post_step(self, trainer, step, record) -> None:
        for cb in trainer.callbacks:
            if type(cb).__name__ == "WandbLogger":
                run = cb.run
                self.seen = {"name": run.name, "group": run.group, "tags": list(run.tags)}


def test_single_txt_run_prints_itself_logs_mfu_and_names_wandb(
    cache_dir, tmp_path, capsys, monkeypatch
):
    from ofs_scale.model.shapes import param_count
    from ofs_scale.trainer.loop import Trainer
    from ofs_scale.trainer.startup import CPU_PEAK_TFLOPS

    book = tmp_path / "book.txt"  # one document: the split is by its tokens
    book.write_text("\n".join((stdlib_root() / n).read_text() for n in ("textwrap.py", "heapq.py")))
    monkeypatch.setenv("WANDB_MODE", "offline")
    over = tiny_overrides(book, cache_dir, tmp_path / "branch")
    extra = ["run.name=tiny", "logging.wandb=offline", "logging.group=g1", "logging.tags=[a, b]"]
    cfg = load_config(None, [*over, *extra, "logging.progress=true"])
    trainer = Trainer(cfg)
    see = SeeWandb()
    trainer.callbacks.append(see)
    trainer.fit()
    out = capsys.readouterr().out
    # the start-up table, then one console line per step with the gradient norm and MFU
    assert trainer.facts.num_params == param_count(cfg, 512)
    for text in ("run tiny", f"{trainer.facts.num_params:,}", "DP 1 x TP 1 x PP 1", "cpu"):
        assert text in out, text
    assert "2 micro batches of 4" in out and "fp32" in out
    assert out.count("grad_norm ") == 3 and "MFU " in out
    records = [json.loads(line) for line in (tmp_path / "branch/metrics.jsonl").open()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 3 and any("val_loss" in r for r in records)
    fpt = flops_per_token(cfg, 512)
    for r in steps:
        tflops = fpt * r["tokens_per_s"] / 1e12  # one process
        assert r["model_tflops_per_s"] == pytest.approx(tflops, rel=1e-6)
        assert r["mfu"] == pytest.approx(tflops / CPU_PEAK_TFLOPS, rel=1e-6)
    # one file, one part: validation is the last val_fraction of its windows, training the rest
    (stream,) = trainer.data.datasets[0].streams
    total = (len(stream) - 1) // 16
    val, train = trainer.val_split.parts[0], trainer.train_split.parts[0]
    assert (val.first, val.count) == (total - max(1, int(total * 0.2)), max(1, int(total * 0.2)))
    assert (train.first, train.count) == (0, val.first)
    assert see.seen == {"name": "tiny/branch", "group": "g1", "tags": ["a", "b"]}
