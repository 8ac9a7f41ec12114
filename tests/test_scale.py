"""7B-shaped dry runs allocate nothing, and per-rank parameter counts match real models."""

from __future__ import annotations

import subprocess
import sys

from ofs_scale.config import load_config
from ofs_scale.model.shapes import count_params, param_count, per_rank_param_counts
from ofs_scale.parallel.stages import layer_chunks
from ofs_scale.testing.distributed import run_distributed

SEVEN_B = ["model.d_model=4096", "model.n_layers=32", "model.n_heads=32", "data.vocab_size=32000"]
# A fresh interpreter runs the dry run: ru_maxrss is the peak of the whole process so far, so in
# the pytest process an earlier test could already have raised it past anything the dry run adds.
# The last stderr line is the peak's growth (KiB) over the peak after the imports.
DRY_RUN_RSS = """
import resource, sys
from ofs_scale.trainer.main import main
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rc = main(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, file=sys.stderr)
sys.exit(rc)
"""


def test_layer_chunks_balanced():
    assert layer_chunks(10, 4) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert sum(len(c) for c in layer_chunks(32, 8)) == 32


def test_dry_run_7b_allocates_nothing():
    layout = ["parallel.tp=4", "parallel.pp=4", "launch.nodes=2", "launch.gpus_per_node=8"]
    layout += ["train.global_batch=16", "train.micro_batch=4"]  # 4 micro batches for 1f1b
    args = ["--dry-run", *SEVEN_B, "model.block=op", *layout]
    proc = subprocess.run(
        [sys.executable, "-c", DRY_RUN_RSS, *args], capture_output=True, text=True, check=False
    )
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr
    grown_mb = int(proc.stderr.split()[-1]) / 1024
    assert grown_mb < 1000, proc.stderr
    cfg = load_config(None, [*SEVEN_B, "model.block=op"])
    total = param_count(cfg, 32000)
    assert 6.5e9 < total < 7.0e9
    assert f"{total:,}" in out
    assert "pp stage 3" in out


def _real_counts(rank, over, vocab):
    from ofs_scale.engine import build_engine
    from ofs_scale.parallel.mesh import init_mesh

    cfg = load_config(None, over)
    mesh = init_mesh(cfg.parallel.tp, cfg.parallel.pp)
    engine = build_engine(cfg, mesh, vocab)
    local = sum(count_params(c, mesh.tp)[0] for c in engine.chunks)
    return mesh.pp_rank, local


def test_per_rank_counts_match_built_models():
    over = [
        "model.d_model=64",
        "model.n_layers=3",
        "model.n_heads=4",
        "model.activation=swiglu",
        "model.qk_norm=true",
        "parallel.tp=2",
        "parallel.pp=2",
    ]
    vocab = 1000
    predicted = per_rank_param_counts(load_config(None, over), vocab)
    for pp_rank, local in run_distributed(_real_counts, 4, over, vocab):
        assert local == predicted[pp_rank]
    single = load_config(None, over[:-2])
    ((_, whole),) = run_distributed(_real_counts, 1, over[:-2], vocab)
    assert whole == param_count(single, vocab) == sum(per_rank_param_counts(single, vocab))
