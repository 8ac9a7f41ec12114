"""A launcher post-run hook: int8 evaluation of a run's final checkpoint after training.

Add it to a run or sweep with `launch.post_run=[ofs_scale.quant.hook:post_run]`. The launcher
calls hooks on rank 0 only, while the training process group is still up, so the evaluation runs
in a fresh single-process interpreter (DCP reshards any training layout into it). Options for
that evaluation come from the environment variable OFS_QUANT_ARGS (e.g. "--weights channel").
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ofs_scale.config import Config


def quant_command(run_dir: Path, extra: str = "") -> list[str]:
    """The command line that evaluates `run_dir` (study protocol unless `extra` says more)."""
    return [sys.executable, "-m", "ofs_scale.quant", str(run_dir), *shlex.split(extra)]


def post_run(cfg: Config, run_dir: Path) -> None:
    """Evaluate the newest checkpoint of `run_dir` (results: `quant_<checkpoint>.json`, which
    `ofs-scale report` reads for the run's last step); a failure is reported, not raised, so a
    finished training run is never marked failed by its evaluation."""
    cmd = quant_command(Path(run_dir), os.environ.get("OFS_QUANT_ARGS", ""))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    print(f"[quant] {shlex.join(cmd)}", flush=True)
    done = subprocess.run(cmd, env=env, check=False)
    if done.returncode != 0:
        print(
            f"[quant] evaluation of {run_dir} failed (exit {done.returncode}); rerun it with: "
            f"{shlex.join(cmd)}",
            file=sys.stderr,
            flush=True,
        )
