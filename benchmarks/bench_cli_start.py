"""Command start-up: wall time of `ofs-scale train --help` and `ofs-scale launch status RUN`
against importing torch and megatron-core (what both paid before they parsed arguments first),
in fresh interpreters, alternating over `--rounds`; medians and ratios (target: ratios <= 0.2):

    help_s=...  status_s=...  torch_import_s=...
    help_ratio=<help / torch import>  status_ratio=<status / torch import>

    python benchmarks/bench_cli_start.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-m", "ofs_scale"]


def timed(cmd: list[str]) -> float:
    """Seconds from start to exit of `cmd` (output discarded; a failure stops the benchmark)."""
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        record = {"step": 1, "stage": "main", "loss": 5.0, "lr": 1e-3, "grad_norm": 1.0}
        (run / "metrics.jsonl").write_text(json.dumps(record) + "\n")
        commands = {
            "help": [*CLI, "train", "--help"],
            "status": [*CLI, "launch", "status", str(run)],
            "torch_import": [sys.executable, "-c", "import torch, megatron.core"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.rounds):
            for name, cmd in commands.items():
                times[name].append(timed(cmd))
    med = {name: statistics.median(t) for name, t in times.items()}
    print("  ".join(f"{name}_s={s:.3f}" for name, s in med.items()))
    base = med["torch_import"]
    print(f"help_ratio={med['help'] / base:.3f}  status_ratio={med['status'] / base:.3f}")


if __name__ == "__main__":
    main()
