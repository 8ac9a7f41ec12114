"""Plot a run's outlier-feature metrics and loss: python tools/plot_metrics.py RUN_DIR [--out DIR]

Reads RUN_DIR/metrics.jsonl and writes kurtosis.png, mmr.png, sigprop.png and loss.png into
RUN_DIR/plots (or --out).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Write the plots; print their paths. Returns the exit status."""
    parser = argparse.ArgumentParser(prog="python tools/plot_metrics.py", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a run's run.out_dir (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (RUN_DIR/plots)")
    args = parser.parse_args(argv)
    from ofs_scale.metrics.plots import write_plots

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


if __name__ == "__main__":
    sys.exit(main())
