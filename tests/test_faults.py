"""Fault injection (issue 19): kills during a save, the metrics rewrite and the resume; two runs
on one out_dir; corrupted, incomplete and diverged checkpoints; a full disk (RLIMIT_FSIZE, which
stops root too, unlike permissions); bad paths and values that used to end in a traceback.

Runs that must die are subprocesses killed by SIGKILL at a named point (`_KILLER`); the rest run
`main()` in this process on copies of one trained run."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ofs_scale.checkpoint.cli import main as ckpt_main
from ofs_scale.config import load_config
from ofs_scale.testing.distributed import run_distributed
from ofs_scale.trainer.callbacks import Callback
from ofs_scale.trainer.checkpointing import CheckpointCallback
from ofs_scale.trainer.loop import Trainer, TrainingStopped
from ofs_scale.trainer.main import main as train_main
from ofs_scale.trainer.rundir import RunLock
from tests.helpers import Losses, tiny_overrides

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Messages on one line (rich wraps at 80 columns when not on a terminal)."""
    from ofs_scale.console import console

    monkeypatch.setattr(console, "width", 10_000)
    monkeypatch.setenv("COLUMNS", "10000")


def _over(corpus: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    return [
        *tiny_overrides(corpus, cache, out),
        "train.stages=[{name: main, steps: 4}]",
        "checkpoint.every=1",
        "train.eval_every=2",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(tiny_corpus, cache_dir, tmp_path_factory) -> Path:
    """One finished 4-step run (checkpoints every step, evaluation every 2); tests copy it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert train_main(_over(tiny_corpus, cache_dir, out)) == 0
    return out


def _copy(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _snapshot(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")}


# --- checkpoints that cannot be used ---------------------------------------------------------


def test_incomplete_checkpoints_stop_the_run(trained, tiny_corpus, cache_dir, tmp_path, capsys):
    out = _copy(trained, tmp_path)
    for md in (out / "checkpoints").glob("*/.metadata"):
        md.unlink()  # a copy tool that skips dotfiles
    before = _snapshot(out / "checkpoints")
    assert train_main(_over(tiny_corpus, cache_dir, out)) == 2
    text = capsys.readouterr().out
    assert "none of the" in text and "dotfiles" in text and "Traceback" not in text
    assert _snapshot(out / "checkpoints") == before  # nothing started over them


def test_corrupted_byte_is_caught_and_verify_command(
    trained, tiny_corpus, cache_dir, tmp_path, capsys
):
    out = _copy(trained, tmp_path)
    assert ckpt_main(["verify", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    shard = sorted((out / "checkpoints" / "stage_main").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size: only a checksum sees it
    shard.write_bytes(bytes(data))
    assert ckpt_main(["verify", str(out / "checkpoints")]) == 1
    assert "stage_main: BAD" in capsys.readouterr().out
    # the run skips it with a message and resumes from the newest intact checkpoint
    assert train_main(_over(tiny_corpus, cache_dir, out)) == 0
    text = capsys.readouterr().out
    assert "skipping" in text and "crc32 mismatch" in text and "at step 3" in text


def test_bad_paths_stop_with_one_line(trained, tiny_corpus, cache_dir, tmp_path, capsys):
    out = _copy(trained, tmp_path)
    latest = out / "checkpoints" / "latest"
    latest.write_bytes(b"\xff\xfe\x00")  # not UTF-8: ignored, newest by step resumes
    assert train_main(_over(tiny_corpus, cache_dir, out)) == 0
    assert "resumed from" in capsys.readouterr().out
    latest.unlink()
    latest.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (_over(tiny_corpus, cache_dir, out), "latest is a directory"),
        (_over(tiny_corpus, cache_dir, tmp_path / "b", f"checkpoint.dir={a_file}"), "is a file"),
        (_over(tiny_corpus, cache_dir, a_file), "is a file"),
        (_over(tiny_corpus, cache_dir, a_file / "sub"), "is a file"),
    ]
    for overrides, expected in cases:
        assert train_main(overrides) == 2, expected
        text = capsys.readouterr().out
        assert expected in text and "Traceback" not in text, text


@pytest.mark.parametrize(
    ("overrides", "env_world", "expected"),
    [
        (["logging.every=0"], "1", "logging.every=0 must be >= 1"),
        (["model.ffn_mult=0"], "1", "model.ffn_mult=0"),
        (["checkpoint.every=-1"], "1", "checkpoint.every=-1 must be >= 0"),
        (["train.eval_every=-2"], "1", "train.eval_every=-2 must be >= 0"),
        (["train.max_bad_steps=0"], "1", "train.max_bad_steps=0 must be >= 1"),
        (["parallel.tp=2"], "3", "world size 3 is not divisible by parallel.tp*parallel.pp=2"),
        (
            ["parallel.pp=2", "train.micro_batch=8", "model.tie_embeddings=false"],
            "2",
            "needs at least 2 micro batches",
        ),
    ],
)
def test_config_mistakes_are_messages(
    overrides, env_world, expected, tiny_corpus, cache_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("WORLD_SIZE", env_world)
    assert train_main([*tiny_overrides(tiny_corpus, cache_dir, tmp_path), *overrides]) == 2
    text = capsys.readouterr().out
    assert expected in text and "Traceback" not in text, text


def test_quant_with_another_models_config_names_the_setting(trained, capsys):
    from ofs_scale.quant.__main__ import main as quant_main

    assert quant_main([str(trained), "model.d_model=64", "--calib-batches", "1"]) == 2
    text = capsys.readouterr().out
    assert "model.d_model=32 (this run: 64)" in text and "Traceback" not in text


# --- divergence ------------------------------------------------------------------------------


class BlowUpLr(Callback):
    """Sets a learning rate that makes the weights overflow, after step `after`."""

    def __init__(self, after: int) -> None:
        self.after = after

    def pre_step(self, trainer, step):
        if step == self.after + 1:
            trainer.cfg.optim.lr = 1e30


def _diverge_then_recover(rank, overrides, tmp):
    cfg = load_config(None, overrides)
    with pytest.raises(TrainingStopped) as stopped:
        Trainer(cfg, callbacks=[BlowUpLr(after=3), CheckpointCallback()]).fit()
    names = sorted(p.name for p in (tmp / "checkpoints").iterdir())
    metas = {
        n: json.loads((tmp / "checkpoints" / n / "ofs_meta.json").read_text())
        for n in names
        if n.startswith("step_")
    }
    losses = Losses()
    again = Trainer(load_config(None, overrides), callbacks=[losses, CheckpointCallback()])
    again.fit()  # the advised rerun: resumes the last healthy checkpoint, trains to the end
    return str(stopped.value), names, metas, again.step, losses.losses


def test_divergence_keeps_the_last_healthy_checkpoint_and_recovers(
    tiny_corpus, cache_dir, tmp_path
):
    over = [
        *tiny_overrides(tiny_corpus, cache_dir, tmp_path),
        "train.stages=[{name: main, steps: 8}]",
        "checkpoint.every=1",
        "checkpoint.keep=1",
        "train.max_bad_steps=2",
    ]
    ((msg, names, metas, step, losses),) = run_distributed(_diverge_then_recover, 1, over, tmp_path)
    # steps 5 and 6 were non-finite: step_000004 holds the weights that caused them
    assert "2 non-finite steps in a row at step 6" in msg and "step_000003" in msg, msg
    assert names == ["latest", "step_000003", "step_000006"], names  # keep=1 kept step 3 too
    assert metas["step_000003"]["healthy"] and not metas["step_000006"]["healthy"]
    assert step == 8 and len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    abandoned = [p.name for p in (tmp_path / "checkpoints" / ".abandoned").iterdir()]
    assert [n.split("-")[0] for n in abandoned] == ["step_000006"]


# --- kills, concurrent runs, full disks ------------------------------------------------------

_KILLER = """
import os, signal, sys
from ofs_scale.checkpoint import manager
from ofs_scale.trainer import loggers, main

point, nth, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
calls = [0]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def counted(orig):
    def f(*a, **k):
        calls[0] += 1
        if calls[0] == nth:
            die()
        return orig(*a, **k)
    return f

def half_written(path, text):  # dies with half of the new metrics file written
    with open(str(path) + ".tmp", "w") as f:
        f.write(text[: len(text) // 2])
        f.flush()
    die()

if point == "after_commit":
    manager.CheckpointManager.prune = counted(manager.CheckpointManager.prune)
elif point == "during_save":
    manager.commit_dir = counted(manager.commit_dir)
elif point == "metrics_rewrite":
    loggers.write_atomic = half_written
sys.exit(main.main(argv))
"""


def _run(args: list[str], fsize: int | None = None) -> subprocess.CompletedProcess:
    def limit():
        if fsize is not None:  # a full disk: writes past `fsize` bytes fail with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, preexec_fn=limit
    )


def test_kills_and_a_full_disk_lose_nothing(tiny_corpus, cache_dir, tmp_path):
    out = tmp_path / "run"
    over = _over(tiny_corpus, cache_dir, out)
    steps = []
    for point, nth in [("after_commit", 2), ("metrics_rewrite", 1), ("during_save", 1)]:
        p = _run(["-c", _KILLER, point, str(nth), *over])
        assert p.returncode == -9, (point, p.stdout, p.stderr)
        steps.append([r["step"] for r in _records(out) if "loss" in r])
    # killed right after step 2's checkpoint: its evaluation ran before it (issue 19, item 6)
    # the metrics rewrite died half way: the old history is whole; a save died before commit
    assert steps == [[1, 2], [1, 2], [1, 2, 3]], steps
    p = _run(["-m", "ofs_scale.train", *over])
    assert p.returncode == 0, p.stdout + p.stderr
    recs = _records(out)
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in recs if "val_loss" in r] == [2, 4]
    # a full disk during the next save: a one-line message, the old checkpoints intact
    longer = [*over, "train.stages=[{name: main, steps: 6}]"]
    p = _run(["-m", "ofs_scale.train", *longer], fsize=16 << 10)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "File too large" in p.stdout and "previous checkpoints are intact" in p.stdout
    assert "Traceback" not in p.stdout + p.stderr
    assert ckpt_main(["verify", str(out)]) == 0
    assert [r["step"] for r in _records(out) if "loss" in r][:4] == [1, 2, 3, 4]


def test_a_second_run_on_one_out_dir_is_refused(tiny_corpus, cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    lock = RunLock(out)
    assert lock.acquire() is None
    try:
        assert train_main(tiny_overrides(tiny_corpus, cache_dir, out)) == 2
        text = capsys.readouterr().out
        assert "in use by another run" in text and f"pid {os.getpid()}" in text
    finally:
        lock.release()
    # a holder killed by SIGKILL leaves no stale lock
    hold = f"from ofs_scale.trainer.rundir import RunLock; RunLock('{out}').acquire(); " + (
        "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    )
    assert _run(["-c", hold]).returncode == -9
    assert RunLock(out).acquire() is None


def test_metrics_history_survives_a_full_disk(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0, "pad": "x" * 200}) for s in range(50)]
    history = "".join(line + "\n" for line in lines)
    path.write_text(history)
    rewrite = (
        "import sys, types; from pathlib import Path; "
        "from ofs_scale.trainer.loggers import JsonlLogger; "
        f"JsonlLogger(Path('{path}')).on_train_start(types.SimpleNamespace(step=40))"
    )
    p = _run(["-c", rewrite], fsize=4 << 10)
    assert p.returncode != 0 and "File too large" in p.stderr
    assert path.read_text() == history
