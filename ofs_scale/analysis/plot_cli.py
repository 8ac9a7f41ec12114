"""Plot a run's outlier-feature metrics and loss.

    ofs-scale plot RUN_DIR [--out DIR]

Reads RUN_DIR/metrics.jsonl and writes kurtosis.png, mmr.png, sigprop.png, loss.png and, when
the run logs collapse, batchless or CMD metrics, instruments.png into RUN_DIR/plots (or --out).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Write the plots; print their paths. Returns the exit status (2: nothing to plot)."""
    parser = argparse.ArgumentParser(
        prog="ofs-scale plot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", type=Path, help="a run's run.out_dir (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (RUN_DIR/plots)")
    args = parser.parse_args(argv)
    from ofs_scale.metrics.plots import write_plots  # matplotlib: only once there is work

    try:
        paths = write_plots(args.run_dir, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not paths:
        print(f"error: {args.run_dir}/metrics.jsonl has no plottable records", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0
