"""Evaluate a run, checkpoint or Hugging Face model with lm-evaluation-harness.

ofs-scale eval RUN_DIR_OR_CKPT_OR_HF_DIR --tasks hellaswag,arc_easy [--num-fewshot N]
    [--limit N] [--include-path DIR] [--batch-size 8] [--device cpu] [--out DIR]

A run or checkpoint is exported to a Hugging Face directory (a temporary one) and evaluated
through lm-eval's HFLM; results go to <run>/lm_eval/<checkpoint>-<tasks>.json. Tasks are lm-eval
task names, or YAML task files found under --include-path (local data, no download).
"""

from __future__ import annotations

import argparse
import sys

from ofs_scale.cli_args import add_run_config_args, command_parser


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    p = command_parser("eval", __doc__)
    p.add_argument("path", help="run directory, checkpoint directory or Hugging Face model dir")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per task")
    p.add_argument("--limit", type=float, default=None, help="at most this many documents/task")
    p.add_argument("--include-path", help="directory of extra task YAML files")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, ...")
    p.add_argument("--out", help="directory for lm_eval/*.json (default: beside the run)")
    add_run_config_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `ofs-scale eval`; prints one line per task metric."""
    args = build_parser().parse_args(argv)
    # torch-importing modules wait until the arguments are parsed
    from ofs_scale.checkpoint import CheckpointError
    from ofs_scale.config import ConfigError
    from ofs_scale.data import DataError
    from ofs_scale.eval.harness import evaluate, summary_rows

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    try:
        result, path = evaluate(
            args.path,
            tasks,
            args.out,
            args.config,
            args.overrides,
            include_path=args.include_path,
            num_fewshot=args.num_fewshot,
            limit=limit,
            batch_size=args.batch_size,
            device=args.device,
        )
    except (ConfigError, CheckpointError, DataError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'task':24} {'metric':16} {'value':>10} {'stderr':>10}")
    for task, metric, value, err in summary_rows(result):
        err_s = f"{err:10.4f}" if err is not None else f"{'':>10}"
        print(f"{task:24} {metric:16} {value:10.4f} {err_s}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
