"""Sample text from a run or checkpoint: a prompt and its continuation.

ofs-scale sample RUN_DIR_OR_CKPT --prompt "def main(" [--max-new-tokens 64] [--temperature 0.8]
    [--top-k 50] [--seed 0] [--num-samples 1] [--ignore-eos] [--device auto] [key=value ...]

A checkpoint of any TP / PP / DP layout is loaded into one process, the prompt is encoded with
the run's own sentencepiece model, and each sample continues it for --max-new-tokens tokens or
up to the end-of-document token. Temperature 0 is greedy (argmax); otherwise tokens are drawn
from softmax(logits / temperature) over the --top-k likeliest (0: all), sample i with seed
--seed + i. The sampling (eval/sample.py: torch) is imported after the arguments are parsed,
so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from ofs_scale.cli_args import RUN_PATH_HELP, add_run_config_args, command_parser


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    p = command_parser("sample", __doc__)
    p.add_argument("path", help=RUN_PATH_HELP)
    p.add_argument("--prompt", default="", help="text to continue (empty: a document start)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy (argmax)")
    p.add_argument("--top-k", type=int, default=50, help="draw among the k likeliest (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (sample i: seed + i)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--ignore-eos", action="store_true", help="go on past end-of-document")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add_run_config_args(p)
    return p


def args_problem(args: argparse.Namespace) -> str | None:
    """Why the options would sample nothing or nonsense, or None."""
    if args.max_new_tokens < 1:
        return f"--max-new-tokens={args.max_new_tokens} must be at least 1"
    if args.temperature < 0:
        return f"--temperature={args.temperature} must be >= 0 (0: greedy)"
    if args.top_k < 0:
        return f"--top-k={args.top_k} must be >= 0 (0: no cut)"
    if args.num_samples < 1:
        return f"--num-samples={args.num_samples} must be at least 1"
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of `ofs-scale sample`: prints the prompt and each continuation."""
    args = build_parser().parse_intermixed_args(argv)
    if problem := args_problem(args):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    from ofs_scale.checkpoint import CheckpointError
    from ofs_scale.config import ConfigError
    from ofs_scale.data import DataError
    from ofs_scale.eval.sample import sample_run
    from ofs_scale.parallel.mesh import destroy_mesh

    try:
        texts = sample_run(args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_mesh()
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i} (seed {args.seed + i})")
        print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
