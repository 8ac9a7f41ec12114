"""The training entry point.

ofs-scale train --config configs/smoke.yaml [section.key=value ...] [--dry-run]
torchrun --nproc_per_node=N -m ofs_scale.train --config ... parallel.tp=2 parallel.pp=2
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch.distributed as dist

from ofs_scale.checkpoint import CheckpointError
from ofs_scale.config import Config, ConfigError, check_world, dump_yaml, load_config
from ofs_scale.console import console, print_summary
from ofs_scale.data import DataError, check_datasets
from ofs_scale.model.shapes import param_count, per_rank_param_counts
from ofs_scale.parallel.mesh import destroy_mesh
from ofs_scale.trainer.loop import Trainer, TrainingStopped
from ofs_scale.trainer.preemption import PreemptionGuard, finish_preempted
from ofs_scale.trainer.rundir import RunDirError


def dry_run(cfg: Config) -> None:
    """Print the resolved config and parameter counts without allocating the model; the
    prepared datasets are opened and checked (memory-mapped, nothing read)."""
    console.print(dump_yaml(cfg))
    vocab = cfg.data.vocab_size
    total = param_count(cfg, vocab)
    rows = {"parameters (total)": f"{total:,}"}
    for ds in check_datasets(cfg.data):
        rows[f"dataset {ds.path}"] = f"{ds.num_tokens:,} tokens"
    counts = per_rank_param_counts(cfg, vocab)
    for pp_rank, n in enumerate(counts):
        rows[f"parameters per rank, pp stage {pp_rank} (tp={cfg.parallel.tp})"] = f"{n:,}"
    print_summary(rows, title="dry run (nothing allocated)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ofs-scale train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("--dry-run", action="store_true", help="print config and sizes, exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            dry_run(cfg)
            return 0
        # before torch.distributed starts: a bad layout is a message, not a traceback
        check_world(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        guard = PreemptionGuard().install()  # SIGUSR1/SIGTERM: checkpoint, stop, requeue
        trainer = Trainer(cfg)
        trainer.callbacks.append(guard)
        summary = trainer.fit()
        if trainer.mesh.is_logging_rank:
            print_summary(summary)
            console.print(f"metrics: {trainer.out_dir / 'metrics.jsonl'}")
        if (message := finish_preempted(trainer, guard)) is not None:
            console.print(f"[launch] {message}", markup=False, highlight=False)
    except (ConfigError, DataError, CheckpointError, RunDirError) as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        return 2
    except TrainingStopped as e:
        console.print(f"[red]stopped:[/red] {e}")
        return 3
    finally:
        if dist.is_initialized():
            destroy_mesh()
    return 0


if __name__ == "__main__":
    sys.exit(main())
