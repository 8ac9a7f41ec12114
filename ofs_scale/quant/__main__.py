"""int8 / FP8 / INT4 post-training quantisation evaluation of a checkpoint.

ofs-scale quant RUN_DIR_OR_CKPT [--weights tensor|channel] [--acts static|dynamic]
    [--scope linear|all] [--fp-head] [--group-size 128] [--calib-batches 16] [--eval-batches N]
torchrun --nproc_per_node=N -m ofs_scale.quant RUN_DIR --tp T     (any layout; DCP reshards)

Prints fp / W8 / A8 / W8A8 / FP8-E4M3 / FP8-E5M2 / W4 validation perplexity, and the losses
and OF metrics metrics.jsonl logged at the evaluated checkpoint's step. Writes
quant_<checkpoint>.json and .md into the run directory (quant-<options>_<checkpoint>.* for
non-default options), so results of different checkpoints never overwrite each other.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from ofs_scale.cli_args import RUN_PATH_HELP, add_run_config_args, command_parser
from ofs_scale.console import console
from ofs_scale.quant.spec import QuantSpec

# torch, megatron-core and the model are imported by `run` and `main` after the arguments are
# parsed, so `ofs-scale quant --help` answers at once.


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    p = command_parser("quant", __doc__)
    p.add_argument("path", help=RUN_PATH_HELP)
    p.add_argument(
        "--weights",
        choices=["tensor", "channel"],
        default="tensor",
        help="symmetric int8 weight scale per tensor (default, the study's protocol) or per "
        "output channel",
    )
    p.add_argument(
        "--acts",
        choices=["static", "dynamic"],
        default="static",
        help="activation range: calibrated per tensor (default) or per token at run time",
    )
    p.add_argument(
        "--scope",
        choices=["linear", "all"],
        default="linear",
        help="`all` also quantises residual sums and attention probabilities",
    )
    p.add_argument("--fp-head", action="store_true", help="keep the unembedding in float")
    p.add_argument(
        "--torchao",
        action="store_true",
        help="add a row of real int8 kernels (torchao, dynamic per-token activations, "
        "per-channel weights; one process; the `eval` extra)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=128,
        help="W4 row: input features per int4 scale (0: one scale per tensor or channel)",
    )
    p.add_argument("--calib-batches", type=int, default=16, help="training batches to calibrate")
    p.add_argument(
        "--eval-batches",
        type=int,
        default=None,
        help="global validation batches (default: the run's train.eval_batches)",
    )
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of this evaluation")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--out", help="where to write quant_<checkpoint>.json/.md (default: the run directory)"
    )
    add_run_config_args(p)
    return p


def run(args: argparse.Namespace) -> dict:
    """Evaluate as `args` say; print and write the results on the logging rank."""
    from ofs_scale.config import ConfigError
    from ofs_scale.metrics.records import load_records
    from ofs_scale.quant.evaluate import load_run, quant_eval, resolve
    from ofs_scale.quant.table import kurtosis_summary, losses_at, print_table, write_outputs

    if args.calib_batches < 1:
        raise ConfigError("--calib-batches must be at least 1")
    if args.eval_batches is not None and args.eval_batches < 1:
        raise ConfigError("--eval-batches must be at least 1")
    if args.group_size < 0:
        raise ConfigError("--group-size must be >= 0 (0: one scale per tensor or channel)")
    spec = QuantSpec(
        args.weights, args.acts, args.scope, head=not args.fp_head, group_size=args.group_size
    )
    paths = resolve(args.path, args.config)
    loaded = load_run(paths, args.overrides, tp=args.tp, device=args.device)
    result = quant_eval(loaded, spec, args.calib_batches, args.eval_batches)
    if args.torchao:
        from ofs_scale.eval.torchao_int8 import add_torchao_row

        add_torchao_row(result, loaded, args.eval_batches)
    run_dir = paths.run_dir or loaded.checkpoint.parent
    # this checkpoint's metrics, not the run's last ones
    records = load_records(run_dir / "metrics.jsonl")
    result["losses"] = losses_at(records, loaded.step)
    result["kurtosis"] = kurtosis_summary(records, upto=loaded.step)
    if loaded.mesh.is_logging_rank:
        print_table(result, console)
        json_path, md_path = write_outputs(result, Path(args.out or run_dir), spec)
        console.print(f"wrote {json_path} and {md_path}")
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input)."""
    args = build_parser().parse_intermixed_args(argv)
    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    from ofs_scale.checkpoint import CheckpointError
    from ofs_scale.config import ConfigError
    from ofs_scale.data import DataError
    from ofs_scale.parallel.mesh import destroy_mesh

    try:
        run(args)
    except (ConfigError, DataError, CheckpointError) as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    finally:
        if dist.is_initialized():
            destroy_mesh()
    return 0


if __name__ == "__main__":
    sys.exit(main())
