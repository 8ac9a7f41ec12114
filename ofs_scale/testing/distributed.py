"""The one multi-process harness for tests and benchmarks: `run_distributed(fn, world_size, *args)`.

Starts `world_size` spawned processes with torch.distributed initialised (gloo on CPU, nccl when
`backend="nccl"`), a free port each time, runs `fn(rank, *args)` in each, and returns the list of
return values ordered by rank. An exception in any rank fails the call with that rank's traceback,
and a rank that dies without a result (killed, crashed) fails it at once. There is no wall-clock
limit unless `timeout` is given: a busy machine only makes the call slower, and pytest-timeout
stops a test that hangs. `fn` must be a module-level function (it is pickled by reference).
"""

from __future__ import annotations

import os
import pickle
import queue as queue_mod
import socket
import time
import traceback
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, backend, fn, args, queue) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        # Plain pickle bytes, not torch's shared-memory tensor handles: those are served by this
        # process and vanish when it exits, possibly before the parent has read them.
        result = pickle.dumps(fn(rank, *args))
        queue.put((rank, True, result))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from megatron.core import parallel_state

            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
        except Exception:
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn, world_size: int, *args: Any, backend: str = "gloo", timeout: float | None = None
) -> list[Any]:
    """Run `fn(rank, *args)` on `world_size` processes; return results by rank (waiting as long
    as the ranks are alive, or at most `timeout` seconds when given)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, backend, fn, args, queue))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = None if timeout is None else time.monotonic() + timeout
    dead_before: set[int] = set()
    try:
        while len(results) < world_size and not errors:
            try:
                rank, ok, value = queue.get(timeout=1.0)
            except queue_mod.Empty:
                waiting = [r for r in range(world_size) if r not in results]
                dead = {r for r in waiting if procs[r].exitcode is not None}
                # A rank's result is in the pipe before it exits: dead with an empty queue on
                # two polls in a row means it died without one.
                for r in sorted(dead & dead_before):
                    errors.append(f"rank {r} exited (code {procs[r].exitcode}) without a result")
                dead_before = dead
                if not errors and deadline is not None and time.monotonic() > deadline:
                    errors.append(f"ranks {waiting} gave no result within {timeout} s")
                continue
            if ok:
                results[rank] = pickle.loads(value)
            else:
                errors.append(f"rank {rank} failed:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
