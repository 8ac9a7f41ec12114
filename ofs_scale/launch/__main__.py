"""Command line of the launcher; see `ofs-scale launch --help`."""

from __future__ import annotations

import argparse
import sys

from ofs_scale.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ofs-scale launch", description="Submit and watch ofs_scale runs."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="submit a run or a sweep (submitit: SLURM or --local)")
    s.add_argument("--config", help="YAML config (for a sweep: overrides the sweep's `config`)")
    s.add_argument("--sweep", help="sweep file with a `grid` of dotted overrides")
    s.add_argument("--local", action="store_true", help="run with submitit's LocalExecutor")
    s.add_argument(
        "--stage-jobs", action="store_true", help="one job per stage, chained with afterok"
    )
    s.add_argument("--wait", action="store_true", help="wait for the results and print them")
    s.add_argument("--dry-run", action="store_true", help="validate and list, submit nothing")
    s.add_argument("overrides", nargs="*", help="section.key=value")
    st = sub.add_parser("status", help="job states, checkpoints, latest metrics")
    st.add_argument("path", help="a run.out_dir or a sweep directory")
    t = sub.add_parser("tail", help="the latest metrics records and job log lines")
    t.add_argument("path", help="a run.out_dir")
    t.add_argument("-n", "--lines", type=int, default=10)
    t.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    return parser


def _submit(args: argparse.Namespace) -> None:
    from ofs_scale.launch.status import console

    if args.sweep:
        from ofs_scale.launch.sweep import load_sweep, submit_sweep

        if args.stage_jobs:
            raise ConfigError("--stage-jobs applies to a single run, not to --sweep")
        sweep = load_sweep(args.sweep, args.config, args.overrides)
        for p in sweep.points:
            console.print(f"point {p.name}: {p.cfg.run.out_dir}")
        if args.dry_run:
            return
        jobs = submit_sweep(sweep, local=args.local)
        console.print(f"submitted {len(jobs)} points; index: {sweep.out_dir / 'sweep.json'}")
    else:
        from ofs_scale.launch.submit import submit_run

        if args.config is None:
            raise ConfigError("submit needs --config FILE (or --sweep FILE)")
        cfg = load_config(args.config, args.overrides)
        console.print(f"run {cfg.run.name}: {cfg.run.out_dir}")
        if args.dry_run:
            return
        jobs = submit_run(cfg, local=args.local, stage_jobs=args.stage_jobs)
    for job in jobs:
        console.print(f"job {job.job_id}")
    if args.wait:
        from ofs_scale.launch.submit import job_result

        for job in jobs:
            console.print(job_result(job))


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for a bad config or path)."""
    args = _parser().parse_args(argv)
    from ofs_scale.launch.status import console, print_status, tail

    try:
        if args.command == "submit":
            _submit(args)
        elif args.command == "status":
            print_status(args.path)
        else:
            tail(args.path, args.lines, args.follow)
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
