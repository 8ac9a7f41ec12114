"""Post-hoc correlation mode decomposition of a run's recorded weight trajectories.

ofs-scale cmd RUN_DIR [--modes 10] [--max-modes 20]

Reads RUN_DIR/cmd/ (written when training with metrics.cmd.every=N), decomposes the sampled
trajectories into M modes for M = 1..max-modes, and writes

    RUN_DIR/cmd/report.json   error vs M; for --modes: per-layer errors, mode sizes, references
    RUN_DIR/cmd/cmd.png       mode reference profiles, error vs M, and val_loss vs val_loss_cmd
                              when the run logged online CMD evaluations
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ofs_scale.cli_args import command_parser

if TYPE_CHECKING:  # torch-importing modules wait until the arguments are parsed
    from ofs_scale.metrics.cmd import CmdResult


def analyse(run_dir: Path, modes: int, max_modes: int) -> dict:
    """Decompose the trajectories of `run_dir`; returns the report (also written to disk)."""
    from ofs_scale.instruments.cmd_online import load_trajectory
    from ofs_scale.metrics.cmd import decompose

    steps, W_KT, names = load_trajectory(run_dir)
    if W_KT.shape[1] < 3:
        raise ValueError(
            f"{run_dir}/cmd holds {W_KT.shape[1]} records; CMD needs at least 3 "
            "(train longer or lower metrics.cmd.every)"
        )
    max_modes = max(1, min(max_modes, W_KT.shape[0]))
    modes = min(modes, max_modes)
    sweep = {m: decompose(W_KT, m, names) for m in range(1, max_modes + 1)}
    chosen: CmdResult = sweep[modes]
    sizes = np.bincount(chosen.labels, minlength=len(chosen.references))
    report = {
        "run_dir": str(run_dir),
        "records": int(W_KT.shape[1]),
        "first_step": int(steps[0]),
        "last_step": int(steps[-1]),
        "num_weights": int(W_KT.shape[0]),
        "error_vs_modes": {str(m): r.error for m, r in sweep.items()},
        "modes": modes,
        "error": chosen.error,
        "layer_errors": chosen.layer_errors,
        "mode_sizes": sizes.tolist(),
        "references": [
            {"mode": i, "name": names[k], "row": int(k)} for i, k in enumerate(chosen.references)
        ],
    }
    out = Path(run_dir) / "cmd"
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot(out / "cmd.png", steps, W_KT, chosen, report, _eval_records(Path(run_dir)))
    return report


def _eval_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "val_loss_cmd" in r]


def plot(
    path: Path,
    steps: np.ndarray,
    W_KT: np.ndarray,
    result: CmdResult,
    report: dict,
    evals: list[dict],
) -> None:
    """Mode profiles (references scaled to [0, 1]), error vs M, and the online CMD eval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if evals else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    for i, k in enumerate(result.references):
        r = W_KT[k]
        span = r.max() - r.min()
        scaled = (r - r.min()) / span if span > 0 else np.zeros_like(r)
        size = int((result.labels == i).sum())
        axes[0].plot(steps, scaled, label=f"mode {i} ({size} w)")
    axes[0].set(title=f"mode profiles (M={report['modes']})", xlabel="step", ylabel="scaled r(t)")
    axes[0].legend(fontsize=7)
    ms = [int(m) for m in report["error_vs_modes"]]
    axes[1].plot(ms, list(report["error_vs_modes"].values()), marker="o")
    axes[1].set(title="reconstruction error", xlabel="modes M", ylabel="||W - W_hat|| / ||W||")
    axes[1].set_yscale("log")
    if evals:
        x = [r["step"] for r in evals]
        axes[2].plot(x, [r["val_loss"] for r in evals], marker="o", label="raw weights")
        axes[2].plot(x, [r["val_loss_cmd"] for r in evals], marker="s", label="CMD weights")
        axes[2].set(title="online CMD evaluation", xlabel="step", ylabel="val loss")
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("cmd", __doc__)
    parser.add_argument("run_dir", help="a run directory (run.out_dir) trained with metrics.cmd")
    parser.add_argument("--modes", type=int, default=10, help="modes M for the detailed report")
    parser.add_argument("--max-modes", type=int, default=20, help="largest M of the error sweep")
    args = parser.parse_args(argv)
    from ofs_scale.console import console, print_summary

    if args.modes < 1 or args.max_modes < 1:
        console.print("[red]error:[/red] --modes and --max-modes must be at least 1")
        return 2
    try:
        report = analyse(Path(args.run_dir), args.modes, max(args.modes, args.max_modes))
    except (FileNotFoundError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    rows = {
        "records": f"{report['records']} (steps {report['first_step']}..{report['last_step']})",
        "sampled weights": report["num_weights"],
    }
    rows.update({f"error, M={m}": f"{e:.3e}" for m, e in report["error_vs_modes"].items()})
    worst = sorted(report["layer_errors"].items(), key=lambda kv: -kv[1])[:5]
    rows.update({f"M={report['modes']}: {name}": f"{e:.3e}" for name, e in worst})
    print_summary(rows, title="correlation mode decomposition")
    console.print(f"report: {Path(args.run_dir) / 'cmd' / 'report.json'}")
    console.print(f"plot:   {Path(args.run_dir) / 'cmd' / 'cmd.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
