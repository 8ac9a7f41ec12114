"""The run directory: checked usable before anything is written, and held by one run at a time.

Rank 0 takes an exclusive `fcntl.flock` on `<run.out_dir>/run.lock` for the life of `fit` and
writes its host and pid into it. The operating system drops the lock when the process dies, so a
killed or requeued SLURM job never leaves a stale lock behind; a second run on the same out_dir
stops with a message naming the holder. Where the filesystem has no flock (some network mounts),
the run goes on with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

import torch.distributed as dist

from ofs_scale.checkpoint import CheckpointManager
from ofs_scale.console import console
from ofs_scale.parallel.mesh import Mesh

LOCK = "run.lock"
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunDirError(RuntimeError):
    """The run directory cannot be used; the message names the path and the fix."""


def out_dir_problem(out_dir: Path) -> str | None:
    """Why `run.out_dir` cannot hold a run (a file on its path, not creatable), or None;
    creates it when it is missing."""
    for parent in [out_dir, *out_dir.parents]:
        if parent.exists() and not parent.is_dir():
            return (
                f"run.out_dir={out_dir}: {parent} is a file, not a directory; move it away or "
                "choose another run.out_dir"
            )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return (
            f"run.out_dir={out_dir} cannot be created ({e.strerror}); fix the permissions of "
            "its parent or choose another run.out_dir"
        )
    return None


class RunLock:
    """An exclusive lock on a run directory, held until `release` or the process ends."""

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / LOCK
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; returns why it cannot be taken (held, not writable), or None."""
        where = f"run.out_dir={self.path.parent}"
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            return (
                f"{where} is not writable ({e.strerror}: {self.path}); fix its permissions or "
                "choose another run.out_dir"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 512).decode(errors="replace").strip() or "holder unknown"
            os.close(fd)
            return (
                f"{where} is in use by another run ({holder}); wait for it to end or stop it, "
                f"or choose another run.out_dir (the lock, {self.path}, is released when that "
                "process exits)"
            )
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                raise
            console.print(
                f"[warning] {self.path}: this filesystem has no file locks ({e.strerror}); "
                "nothing stops a second run on the same run.out_dir",
                markup=False,
                highlight=False,
            )
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            since = time.strftime("%Y-%m-%d %H:%M:%S")
            os.pwrite(
                fd, f"host {socket.gethostname()} pid {os.getpid()} since {since}".encode(), 0
            )
        except OSError:
            pass  # who holds it is a courtesy to the next run; the lock itself is held
        return None

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would race with a run taking it)."""
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def claim_run_dir(out_dir: Path, checkpoints: CheckpointManager, mesh: Mesh) -> RunLock:
    """Check the run and checkpoint directories and lock the run directory on rank 0; every
    rank raises RunDirError with the same message when either is unusable (collective)."""
    lock = RunLock(out_dir)
    box: list[str | None] = [None]
    if mesh.rank == 0:
        box[0] = out_dir_problem(out_dir) or checkpoints.root_problem() or lock.acquire()
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        lock.release()
        raise RunDirError(box[0])
    return lock
