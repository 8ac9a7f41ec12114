"""What the subcommands' parsers share: an `ofs-scale <name>` parser whose description is the
command module's docstring (kept as written), and the options that name a run to read."""

from __future__ import annotations

import argparse

RUN_PATH_HELP = "run directory (newest checkpoint) or one checkpoint directory"


def command_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of `ofs-scale <name>`, its `--help` opening with `doc` as written."""
    return argparse.ArgumentParser(
        prog=f"ofs-scale {name}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_run_config_args(p: argparse.ArgumentParser) -> None:
    """`--config` for runs saved without config.yaml, and `section.key=value` overrides."""
    p.add_argument("--config", help="training YAML, for runs without a saved config.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value applied to the run's config")
