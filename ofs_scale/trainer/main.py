"""The training entry point.

ofs-scale train --config configs/smoke.yaml [section.key=value ...] [--dry-run]
torchrun --nproc_per_node=N -m ofs_scale.train --config ... parallel.tp=2 parallel.pp=2

Exit status: 0 finished, 2 bad input, 3 stopped by non-finite steps, 75 stopped by SIGUSR1 or
SIGTERM with a checkpoint written (resumable; 0 under a torchrun with restarts left).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import TYPE_CHECKING

from ofs_scale.cli_args import command_parser

if TYPE_CHECKING:  # the imports that pull in torch wait until the arguments are parsed
    from ofs_scale.config import Config


def dry_run(cfg: Config) -> None:
    """Print the resolved config and parameter counts without allocating the model, after
    every check that needs no model (trainer/preflight.py: datasets opened and checked,
    memory-mapped, nothing read); raises ConfigError listing every problem, one per line."""
    from ofs_scale.config import ConfigError, dump_yaml
    from ofs_scale.console import console, print_summary
    from ofs_scale.data import check_datasets
    from ofs_scale.model.shapes import param_count, per_rank_param_counts
    from ofs_scale.trainer.preflight import launch_world_size, preflight

    console.print(dump_yaml(cfg))
    world = int(os.environ.get("WORLD_SIZE", launch_world_size(cfg)))
    problems = preflight(cfg, world)
    vocab = cfg.data.vocab_size
    total = param_count(cfg, vocab)
    rows = {"parameters (total)": f"{total:,}", "world size": str(world)}
    for ds in [] if problems else check_datasets(cfg.data):
        rows[f"dataset {ds.path}"] = f"{ds.num_tokens:,} tokens"
    counts = per_rank_param_counts(cfg, vocab)
    for pp_rank, n in enumerate(counts):
        rows[f"parameters per rank, pp stage {pp_rank} (tp={cfg.parallel.tp})"] = f"{n:,}"
    print_summary(rows, title="dry run (nothing allocated)")
    if problems:
        raise ConfigError("\n".join(problems))


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("train", __doc__)
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("--dry-run", action="store_true", help="print config and sizes, exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch.distributed as dist
    from rich.markup import escape

    from ofs_scale.checkpoint import CheckpointError
    from ofs_scale.config import ConfigError, check_world, load_config
    from ofs_scale.console import console, print_summary
    from ofs_scale.data import DataError
    from ofs_scale.parallel.mesh import destroy_mesh
    from ofs_scale.trainer.loop import Trainer, TrainingStopped
    from ofs_scale.trainer.preemption import (
        PreemptionGuard,
        finish_preempted,
        stopped_exit_status,
    )
    from ofs_scale.trainer.rundir import RunDirError
    from ofs_scale.trainer.wandb_auth import missing_wandb_login

    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            dry_run(cfg)
            return 0
        # before torch.distributed starts: a bad layout is a message, not a traceback
        check_world(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        if (problem := missing_wandb_login(cfg.logging.wandb)) is not None:
            raise ConfigError(problem)
        guard = PreemptionGuard().install()  # SIGUSR1/SIGTERM: checkpoint, stop, requeue
        trainer = Trainer(cfg)
        trainer.callbacks.append(guard)
        summary = trainer.fit()
        if trainer.mesh.is_logging_rank:
            print_summary(summary)
            console.print(f"metrics: {trainer.out_dir / 'metrics.jsonl'}")
        if (message := finish_preempted(trainer, guard)) is not None:
            console.print(f"[launch] {message}", markup=False, highlight=False)
        if guard.agreed and trainer.stopped_early:
            return stopped_exit_status()  # 75: stopped early, resumable (trainer/preemption.py)
    except (ConfigError, DataError, CheckpointError, RunDirError) as e:
        for line in str(e).splitlines():  # escaped: config values hold brackets
            console.print(f"[red]error:[/red] {escape(line)}", highlight=False)
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
