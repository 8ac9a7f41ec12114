"""A private one-node SLURM for tests: `slurmctld` + `slurmd` as root, state under a temp dir.

`SlurmCluster(root).start()` writes a `slurm.conf` (auth/none, proctrack/linuxproc, task/none, no
accounting, select/cons_tres, free ports), starts both daemons, waits until the node is idle and
exports `SLURM_CONF` plus a `sacct` stand-in on PATH (submitit asks `sacct` for job states, and
without accounting storage the real one only answers "accounting storage is disabled").
`stop()` kills the daemons by their pid files and restores the environment. `skip_reason()` says
why a cluster cannot be started here (not root, packages missing), or None.

Waits never fail because the machine is slow: `wait_for` / `wait_job` poll job state and files
until a deadline that is generous (`JOB_BUDGET_S` per test), stop early when a job has ended, and
when they do give up the error carries what the jobs printed and their queue state.

Run `python -m tests.slurm_cluster DIR` to get a cluster for manual experiments (Ctrl-C stops it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "srun")
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
)
# How long a test may wait on its jobs in all: tens of times what they need on an idle machine
# (a few tens of seconds), so that a loaded machine only makes the test slower.
JOB_BUDGET_S = 20 * 60.0
# A client command (squeue, sbatch, ...) that does not answer in this long is a broken cluster.
CLIENT_TIMEOUT_S = 300.0

# Answers `sacct -o JobID,State,NodeList --parsable2 -j ID ...` from squeue (submitit's query).
SACCT_STANDIN = """#!/bin/sh
echo "JobID|State|NodeList"
while [ $# -gt 0 ]; do
  if [ "$1" = "-j" ]; then
    squeue -h -t all -j "$2" -o "%i|%T|%N" 2>/dev/null
    shift
  fi
  shift
done
exit 0
"""


def skip_reason() -> str | None:
    """Why a test cluster cannot run on this machine, or None when it can."""
    if os.geteuid() != 0:
        return "SLURM tests need root (slurmd runs jobs as any user only as root)"
    missing = [c for c in (*DAEMONS, *CLIENTS) if shutil.which(c) is None]
    if missing:
        return (
            f"SLURM is not installed ({', '.join(missing)} missing); "
            "run `apt-get install -y --no-install-recommends slurm-wlm munge` or `make install`"
        )
    return None


def sbatch(argv: list[str], env: dict[str, str], cwd: Path) -> str:
    """Run `sbatch --parsable ARGV` with `env` in `cwd`; returns the job id."""
    res = subprocess.run(
        ["sbatch", "--parsable", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


def module_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    """Body of a module-scoped `slurm` fixture: a started cluster, stopped afterwards; skips
    with the reason where none can start (fails instead with OFS_REQUIRE_SLURM=1, for CI)."""
    import pytest

    reason = skip_reason()
    if reason:
        if os.environ.get("OFS_REQUIRE_SLURM") == "1":
            pytest.fail(f"OFS_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class SlurmCluster:
    """One controller and one compute node named `localhost`, all files under `root`."""

    def __init__(self, root: Path, cpus: int = 4, min_job_age_s: int = 7200) -> None:
        """`min_job_age_s` keeps ended jobs in squeue (the `sacct` stand-in reads them there)
        for longer than any test waits."""
        self.root = Path(root)
        self.cpus = cpus
        self.min_job_age_s = min_job_age_s
        self.conf = self.root / "slurm.conf"
        self.bin = self.root / "bin"
        self._saved_env: dict[str, str | None] = {}

    def pidfile(self, daemon: str) -> Path:
        return self.root / f"{daemon}.pid"

    def write_conf(self) -> None:
        """slurm.conf with fresh free ports; CPUs may exceed the cores (config_overrides)."""
        ctld_port, slurmd_port = _free_ports(2)
        r = self.root
        for d in ("state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=ofstest",
                    "SlurmctldHost=localhost(127.0.0.1)",
                    f"SlurmctldPort={ctld_port}",
                    f"SlurmdPort={slurmd_port}",
                    "AuthType=auth/none",
                    "CredType=cred/none",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    f"StateSaveLocation={r}/state",
                    f"SlurmdSpoolDir={r}/spool",
                    f"SlurmctldPidFile={self.pidfile('slurmctld')}",
                    f"SlurmdPidFile={self.pidfile('slurmd')}",
                    f"SlurmctldLogFile={r}/log/slurmctld.log",
                    f"SlurmdLogFile={r}/log/slurmd.log",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "SchedulerType=sched/builtin",
                    "AccountingStorageType=accounting_storage/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "JobCompType=jobcomp/none",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "SlurmdParameters=config_overrides",
                    f"MinJobAge={self.min_job_age_s}",
                    "KillWait=10",
                    "InactiveLimit=0",
                    f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 "
                    "State=UNKNOWN",
                    "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        self.bin.mkdir(parents=True, exist_ok=True)
        sacct = self.bin / "sacct"
        sacct.write_text(SACCT_STANDIN)
        sacct.chmod(0o755)

    def _export(self) -> None:
        for key in ("SLURM_CONF", "PATH"):
            self._saved_env[key] = os.environ.get(key)
        os.environ["SLURM_CONF"] = str(self.conf)
        os.environ["PATH"] = f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"

    def _restore(self) -> None:
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env.clear()

    def start(self, timeout_s: float = 300.0) -> SlurmCluster:
        """Start both daemons and wait until the node accepts jobs."""
        reason = skip_reason()
        if reason:
            raise RuntimeError(reason)
        self.write_conf()
        self._export()
        env = dict(os.environ)
        try:
            subprocess.run(["slurmctld", "-i", "-f", str(self.conf)], env=env, check=True)
            subprocess.run(["slurmd", "-N", "localhost", "-f", str(self.conf)], env=env, check=True)
            self._wait_idle(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%t"],
                capture_output=True,
                text=True,
                timeout=CLIENT_TIMEOUT_S,
            )
            state = out.stdout.strip()
            if state in ("idle", "mix", "alloc"):
                return
            time.sleep(0.3)
        raise RuntimeError(
            f"SLURM node not ready after {timeout_s}s (state {state!r}); {self.logs()}"
        )

    def logs(self) -> str:
        """The tail of both daemon logs (for failure messages)."""
        parts = []
        for name in DAEMONS:
            f = self.root / "log" / f"{name}.log"
            if f.is_file():
                parts.append(f"--- {name}.log\n" + "\n".join(f.read_text().splitlines()[-25:]))
        return "\n".join(parts)

    def cancel_all(self, timeout_s: float = 60.0) -> None:
        """Cancel every job and wait until none is running or completing."""
        subprocess.run(["scancel", "--user", "root"], capture_output=True, timeout=CLIENT_TIMEOUT_S)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["squeue", "-h", "-t", "RUNNING,COMPLETING,CONFIGURING", "-o", "%i"],
                capture_output=True,
                text=True,
                timeout=CLIENT_TIMEOUT_S,
            )
            if out.returncode != 0 or not out.stdout.strip():
                return
            time.sleep(0.5)

    def _own_processes(self) -> list[int]:
        """Processes (job steps and their tasks) started by this cluster: SLURM_CONF is ours."""
        marker = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in env:
                pids.append(int(entry.name))
        return pids

    def stop(self) -> None:
        """Cancel jobs, kill the daemons started from this directory (by pid file) and any
        leftover step of this cluster, and restore the environment."""
        if self._saved_env:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                self.cancel_all()
        for name in reversed(DAEMONS):
            pidfile = self.pidfile(name)
            if not pidfile.is_file():
                continue
            try:
                pid = int(pidfile.read_text().strip())
                os.kill(pid, signal.SIGTERM)
            except (ValueError, ProcessLookupError):
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._restore()
        for pid in self._own_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def squeue_state(self, job_id: str) -> str:
        """The job's state (e.g. PENDING, RUNNING, COMPLETED), or '' when unknown."""
        out = subprocess.run(
            ["squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT_S,
        )
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""

    def job_report(self, job_ids: Iterable[str], files: Iterable[Path] = ()) -> str:
        """What the jobs printed and where they stand, for failure messages: each job's queue
        line and the tail of its StdOut/StdErr, then the tail of `files` (a folder: its *.out,
        *.err and *.log files), then the daemon logs."""
        parts, seen = [], set()

        def tail(path: Path) -> None:
            if path in seen or not path.is_file():
                return
            seen.add(path)
            lines = path.read_text(errors="replace").splitlines()[-40:]
            parts.append(f"--- {path}\n" + "\n".join(lines))

        for job in job_ids:
            info = subprocess.run(
                ["scontrol", "show", "job", "-o", str(job)],
                capture_output=True,
                text=True,
                timeout=CLIENT_TIMEOUT_S,
            )
            fields = dict(f.split("=", 1) for f in info.stdout.split() if "=" in f)
            keys = ("JobState", "Reason", "Restarts", "RunTime", "StartTime", "EndTime")
            state = " ".join(f"{k}={fields.get(k)}" for k in keys)
            parts.append(f"--- job {job}: {state if fields else info.stderr.strip()}")
            for key in ("StdOut", "StdErr"):
                if key in fields:
                    tail(Path(fields[key]))
        for f in map(Path, files):
            if f.is_dir():
                for path in sorted(f.iterdir()):
                    if path.suffix in (".out", ".err", ".log"):
                        tail(path)
            else:
                tail(f)
        parts.append(self.logs())
        return "\n".join(parts)

    def wait_for(
        self,
        what: str,
        ready: Callable[[], bool],
        deadline: float,
        job_ids: Iterable[str],
        files: Iterable[Path] = (),
    ) -> None:
        """Poll `ready()` until it holds; fail early when one of the jobs has ended without it,
        and at `deadline` (time.monotonic()) with the jobs' report."""
        job_ids, files = list(job_ids), list(files)
        while not ready():
            ended = {j: s for j in job_ids if (s := self.squeue_state(j)) in FINAL_STATES}
            if ended and not ready():
                raise AssertionError(
                    f"{what}: job ended first ({ended})\n{self.job_report(job_ids, files)}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{what}: not reached by the deadline\n{self.job_report(job_ids, files)}"
                )
            time.sleep(0.3)

    def wait_job(self, job_id: str, deadline: float, files: Iterable[Path] = ()) -> str:
        """Wait until the job reaches a final state and return it; at `deadline`
        (time.monotonic()) fail with the job's report."""
        while (state := self.squeue_state(job_id)) not in FINAL_STATES:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} still {state or 'unknown'!r} at the deadline\n"
                    + self.job_report([job_id], files)
                )
            time.sleep(0.5)
        return state


if __name__ == "__main__":
    cluster = SlurmCluster(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/ofs_slurm")).start()
    print(f"export SLURM_CONF={cluster.conf} PATH={cluster.bin}:$PATH  (Ctrl-C stops)")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        cluster.stop()
