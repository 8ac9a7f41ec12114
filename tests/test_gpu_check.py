"""benchmarks/gpu_check.py end to end on CPU (`--cpu-tiny`), so the GPU check cannot rot: its
throughput figures are finite and positive, and the fast path (master weights) trains like the
plain path."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_tiny_prints_and_writes_finite_figures(tiny_corpus, cache_dir, tmp_path):
    out = tmp_path / "figures.json"
    argv = [sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--cpu-tiny", "--json", str(out)]
    argv += ["--steps", "2", "--warmup", "1", "--check-steps", "3"]
    argv += [f"data.corpus={tiny_corpus}", f"data.cache_dir={cache_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "ratio=" in p.stdout and "OK" in p.stdout, p.stdout
    figures = json.loads(out.read_text())
    for name in ("ours", "reference"):
        f = figures[name]
        for key in ("tokens_per_s", "tflops", "mfu", "step_s"):
            assert math.isfinite(f[key]) and f[key] > 0, (name, key, f)
    assert math.isfinite(figures["ratio"]) and figures["ratio"] > 0
    check = figures["check"]
    assert check["ok"] and len(check["fast_losses"]) == 3
    assert "train.master_weights=true" in figures["fast_switches"]
    # the fast path really ran a different computation (bf16 masters), close to the plain one
    assert check["fast_losses"] != check["plain_losses"]
    assert check["max_rel_diff"] < check["rtol"]
