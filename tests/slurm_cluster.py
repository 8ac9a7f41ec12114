"""A private one-node SLURM for tests: `slurmctld` + `slurmd` as root, state under a temp dir.

`SlurmCluster(root).start()` writes a `slurm.conf` (auth/none, proctrack/linuxproc, task/none, no
accounting, select/cons_tres, free ports), starts both daemons, waits until the node is idle and
exports `SLURM_CONF` plus a `sacct` stand-in on PATH (submitit asks `sacct` for job states, and
without accounting storage the real one only answers "accounting storage is disabled").
`stop()` kills the daemons by their pid files and restores the environment. `skip_reason()` says
why a cluster cannot be started here (not root, packages missing), or None.

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
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "srun")

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

    def __init__(self, root: Path, cpus: int = 4, min_job_age_s: int = 600) -> None:
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

    def start(self, timeout_s: float = 60.0) -> SlurmCluster:
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
                ["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=30
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
        subprocess.run(["scancel", "--user", "root"], capture_output=True, timeout=30)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["squeue", "-h", "-t", "RUNNING,COMPLETING,CONFIGURING", "-o", "%i"],
                capture_output=True,
                text=True,
                timeout=30,
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
            timeout=30,
        )
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""

    def wait_job(self, job_id: str, timeout_s: float = 180.0) -> str:
        """Wait until the job reaches a final state; return it (raises on timeout)."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            state = self.squeue_state(job_id)
            if state in final:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {state!r} after {timeout_s}s; {self.logs()}")


if __name__ == "__main__":
    cluster = SlurmCluster(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/ofs_slurm")).start()
    print(f"export SLURM_CONF={cluster.conf} PATH={cluster.bin}:$PATH  (Ctrl-C stops)")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        cluster.stop()
