"""Plot a run's outlier-feature metrics and loss, or compare several runs in one figure.

    ofs-scale plot RUN_DIR [--out DIR]
    ofs-scale plot RUN_DIR RUN_DIR ... [--out FIG.png]

One run: reads RUN_DIR/metrics.jsonl and writes kurtosis.png, mmr.png, sigprop.png, loss.png and,
when the run logs collapse, batchless or CMD metrics that are not all zero, instruments.png into
RUN_DIR/plots (or --out).

Several runs (or one with --compare): one figure with training loss, validation loss, residual
kurtosis (max and mean) and max MMR against step, one colour per run, labelled by the shortest
distinct tails of the run paths; written to --out (default compare.png).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ofs_scale.cli_args import command_parser


def main(argv: list[str] | None = None) -> int:
    """Write the plots; print their paths. Returns the exit status (2: nothing to plot)."""
    parser = command_parser("plot", __doc__)
    parser.add_argument(
        "run_dirs", nargs="+", type=Path, help="run.out_dir folders (each holds metrics.jsonl)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="one run: output folder (RUN_DIR/plots); several: the figure (compare.png)",
    )
    parser.add_argument(
        "--compare", action="store_true", help="draw the comparison figure even for one run"
    )
    args = parser.parse_args(argv)
    # matplotlib: only once there is work
    from ofs_scale.metrics.compare import write_comparison
    from ofs_scale.metrics.plots import write_plots

    notes: list[str] = []
    try:
        if len(args.run_dirs) > 1 or args.compare:
            out = args.out if args.out is not None else Path("compare.png")
            if out.suffix.lower() != ".png":
                print(
                    f"error: --out {out} must name a .png file when comparing runs", file=sys.stderr
                )
                return 2
            fig = write_comparison(args.run_dirs, out)
            paths = [fig] if fig is not None else []
        else:
            paths = write_plots(args.run_dirs[0], args.out, notes)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(note)
    if not paths:
        names = " ".join(str(d) for d in args.run_dirs)
        print(f"error: no plottable records in the metrics.jsonl of {names}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0
