"""The `ofs-scale` command: one subcommand per entry point, each imported only when it runs.

The table below names modules as strings, so building the parser imports neither torch nor
megatron-core and `ofs-scale --help` answers at once. Everything after the subcommand reaches that
subcommand's own parser unchanged: `ofs-scale train --help` is the trainer's help.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import NamedTuple

from ofs_scale import __version__


class Command(NamedTuple):
    """A subcommand: the module whose `main(argv) -> int` runs it, and its one-line help."""

    module: str
    help: str


COMMANDS: dict[str, Command] = {
    "train": Command("ofs_scale.trainer.main", "train a model from a YAML config (or --dry-run)"),
    "launch": Command("ofs_scale.launch.__main__", "submit runs and sweeps (submitit), watch them"),
    "quant": Command("ofs_scale.quant.__main__", "int8 quantisation evaluation of a checkpoint"),
    "report": Command("ofs_scale.analysis.report", "the table and kurtosis figure of a sweep"),
    "cmd": Command("ofs_scale.analysis.cmd", "correlation mode decomposition of a run"),
    "plan": Command("ofs_scale.analysis.plan_cli", "per-GPU memory and step time of a layout"),
    "plot": Command("ofs_scale.analysis.plot_cli", "redraw a run's metric and loss plots"),
    "ckpt": Command("ofs_scale.checkpoint.cli", "list checkpoints, verify their checksums"),
    "export": Command("ofs_scale.export.__main__", "a run as a Hugging Face transformers model"),
    "eval": Command("ofs_scale.eval.__main__", "lm-evaluation-harness tasks on a run or HF model"),
    "inspect": Command("ofs_scale.eval.inspect_cli", "OF metrics of any local HF causal LM"),
    "sample": Command("ofs_scale.eval.sample_cli", "continue a prompt with a run's checkpoint"),
    "prepare": Command("ofs_scale.data.prepare.cli", "tokenize raw text into an indexed dataset"),
}

DESCRIPTION = """Train decoder-only transformers and measure their outlier features.

    ofs-scale train --config configs/smoke.yaml [section.key=value ...] [--dry-run]
    ofs-scale SUBCOMMAND --help        the options of one subcommand"""
EPILOG = """`python -m ofs_scale SUBCOMMAND ...` is the same command. Under torchrun, which starts a
module: torchrun --nproc_per_node=N -m ofs_scale.train --config FILE [section.key=value ...]"""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: lists the subcommands; their options belong to their own parsers."""
    parser = argparse.ArgumentParser(
        prog="ofs-scale",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for name, command in COMMANDS.items():
        sub.add_parser(name, help=command.help, add_help=False)
    return parser


def load(name: str) -> Callable[[list[str] | None], int]:
    """The `main` of subcommand `name`, imported now (and with it torch, where it needs it)."""
    return importlib.import_module(COMMANDS[name].module).main


def main(argv: list[str] | None = None) -> int:
    """Run `ofs-scale SUBCOMMAND [args ...]`; returns the subcommand's exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # Only the first word is ours: --help, --version, a missing or misspelt subcommand are
    # answered here; the rest reaches the subcommand exactly as typed.
    args = build_parser().parse_args(argv[:1])
    return load(args.command)(argv[1:])
