"""The files the launcher writes into run and sweep directories, and reading them back.

Kept free of torch, submitit and the config schema, so `ofs-scale launch status` and `tail` start
at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LAUNCH_FILE = "launch.json"
"""`<run.out_dir>/launch.json`: every submission of a run and its job ids."""
SWEEP_FILE = "sweep.json"
"""`<sweep out_dir>/sweep.json`: the points of a sweep, their parameters and directories."""


class LaunchError(ValueError):
    """A launcher command cannot go on; the message names the problem and the fix."""


def read_index(sweep_dir: str | Path) -> dict[str, Any]:
    """The `sweep.json` of a sweep directory."""
    path = Path(sweep_dir) / SWEEP_FILE
    if not path.is_file():
        raise LaunchError(f"{sweep_dir} has no {SWEEP_FILE}; is it a sweep directory?")
    return json.loads(path.read_text())
