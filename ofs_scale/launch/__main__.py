"""Command line of the launcher; see `ofs-scale launch --help`."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from collections.abc import Iterator


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
    t.add_argument("--json", action="store_true", help="the records as written, not formatted")
    return parser


@contextlib.contextmanager
def _detached_stdio() -> Iterator[None]:
    """Point fds 1 and 2 at /dev/null while submitit starts a local job controller, so the
    controller (which outlives this command) does not hold a caller's pipe open: `submit
    --local | tee`, or a script capturing the output, returns when the command does."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


@contextlib.contextmanager
def _slurm_errors() -> Iterator[None]:
    """sbatch failing (no reachable controller, a refused request) as one LaunchError line
    instead of submitit's traceback; submitit's own echo of sbatch's stderr is held back."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    from ofs_scale.launch.files import LaunchError

    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except (FailedJobError, FailedSubmissionError) as e:
        said = [line for line in str(e).splitlines() if line.strip()] or ["no output"]
        raise LaunchError(
            f"SLURM is not reachable or refused the job (sbatch: {said[-1].strip()}); check "
            "`sinfo` on a login node of the cluster, or run on this machine with --local"
        ) from None


def _submit(args: argparse.Namespace) -> None:
    """`submit`: a bad config or path becomes a LaunchError (one line, exit status 2)."""
    from ofs_scale.config import ConfigError

    try:
        _submit_checked(args)
    except ConfigError as e:
        from ofs_scale.launch.files import LaunchError

        raise LaunchError(str(e)) from None


def _submit_checked(args: argparse.Namespace) -> None:
    from ofs_scale.config import ConfigError, load_config
    from ofs_scale.launch.status import console

    if args.sweep:
        from ofs_scale.launch.sweep import load_sweep, submit_sweep

        if args.stage_jobs:
            raise ConfigError("--stage-jobs applies to a single run, not to --sweep")
        sweep = load_sweep(args.sweep, args.config, args.overrides)
        for p in sweep.points:
            console.print(f"point {p.name}: {p.cfg.run.out_dir}")
        watch = sweep.out_dir
    else:
        from ofs_scale.launch.submit import submit_run

        if args.config is None:
            raise ConfigError("submit needs --config FILE (or --sweep FILE)")
        cfg = load_config(args.config, args.overrides)
        console.print(f"run {cfg.run.name}: {cfg.run.out_dir}")
        watch = cfg.run.out_dir
    # what the trainer's dry run checks, before anything is queued (a missing corpus, unknown
    # metric sites, no wandb key: the job would otherwise die after waiting in the queue)
    from ofs_scale.trainer.preflight import launch_world_size, preflight

    points = [p.cfg for p in sweep.points] if args.sweep else [cfg]
    problems = dict.fromkeys(x for c in points for x in preflight(c, launch_world_size(c)))
    if problems:
        raise ConfigError("\n".join(problems))
    if args.dry_run:
        return
    if args.local and args.stage_jobs:
        console.print("--local --stage-jobs: the stages run one after another, in the foreground")
    with _detached_stdio() if args.local else _slurm_errors():
        if args.sweep:
            jobs = submit_sweep(sweep, local=args.local)
        else:
            jobs = submit_run(cfg, local=args.local, stage_jobs=args.stage_jobs)
    if args.sweep:
        console.print(f"submitted {len(jobs)} points; index: {sweep.out_dir / 'sweep.json'}")
    for job in jobs:
        console.print(f"job {job.job_id}")
    if not args.wait:
        where = "in the background on this machine" if args.local else "on SLURM"
        console.print(
            f"started {where}; watch it with `ofs-scale launch status {watch}` and "
            f"`ofs-scale launch tail {watch} -f`",
            markup=False,
            highlight=False,
        )
        return
    from ofs_scale.launch.submit import job_result

    for job in jobs:
        console.print(job_result(job))


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for a bad config or path)."""
    args = _parser().parse_args(argv)
    from rich.markup import escape

    from ofs_scale.launch.files import LaunchError
    from ofs_scale.launch.status import console, print_status, tail

    try:
        if args.command == "submit":
            _submit(args)
        elif args.command == "status":
            print_status(args.path)
        else:
            tail(args.path, args.lines, args.follow, raw=args.json)
    except LaunchError as e:
        for line in str(e).splitlines():
            console.print(f"[red]error:[/red] {escape(line)}", highlight=False)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
