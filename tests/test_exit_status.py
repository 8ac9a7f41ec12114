"""A run stopped by SIGUSR1 writes its checkpoint and exits 75 (resumable), not 0; under a
torchrun with restarts left the ranks exit 0, so torchrun does not restart a stopped run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ofs_scale.launch.torchrun import torchrun_argv
from ofs_scale.testing.distributed import free_port
from ofs_scale.trainer.preemption import EXIT_STOPPED, stopped_exit_status
from tests.helpers import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]

# `ofs-scale train` whose process sends itself SIGUSR1 after step 2 (as SLURM's --signal would)
_SIGNALLED = """
import os, signal, sys
from ofs_scale.trainer import loop, main
from ofs_scale.trainer.callbacks import Callback

class Signal(Callback):
    def post_step(self, trainer, step, record):
        if step == 2 and not trainer.stop_requested:
            os.kill(os.getpid(), signal.SIGUSR1)

class Trainer(loop.Trainer):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.callbacks.insert(0, Signal())

loop.Trainer = Trainer  # what main() imports when it runs
sys.exit(main.main(sys.argv[1:]))
"""


def _steps(out: Path) -> list[int]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["step"] for x in lines if '"loss"' in x]


def test_exit_status_rule():
    assert EXIT_STOPPED == 75
    assert stopped_exit_status({}) == 75
    assert stopped_exit_status({"TORCHELASTIC_MAX_RESTARTS": "0"}) == 75
    restarts = {"TORCHELASTIC_MAX_RESTARTS": "2", "TORCHELASTIC_RESTART_COUNT": "1"}
    assert stopped_exit_status(restarts) == 0
    assert stopped_exit_status({**restarts, "TORCHELASTIC_RESTART_COUNT": "2"}) == 75


def test_signal_stop_exits_75_and_torchrun_does_not_restart(tiny_corpus, cache_dir, tmp_path):
    script = tmp_path / "signalled.py"
    script.write_text(_SIGNALLED)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    five = "train.stages=[{name: main, steps: 5, lr_schedule: constant}]"

    def overrides(out):
        return [*tiny_overrides(tiny_corpus, cache_dir, out), five]

    direct = tmp_path / "direct"
    cmd = [sys.executable, str(script), *overrides(direct)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert p.returncode == EXIT_STOPPED, (p.stdout + p.stderr)[-3000:]
    assert (direct / "checkpoints" / "step_000002" / "ofs_meta.json").is_file()
    assert _steps(direct) == [1, 2]

    # torchrun with a restart left: exit 0 and no restart (a restart would train on to step 5)
    elastic = tmp_path / "elastic"
    argv = torchrun_argv(
        1, 1, 1, f"127.0.0.1:{free_port()}", "x1", overrides(elastic), (str(script),)
    )
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert _steps(elastic) == [1, 2]
    assert "resumed from" not in p.stdout + p.stderr
