"""Callback state saved per (pp, tp) shard inside a checkpoint (`<ckpt>/shards/`): the same on
every DP replica, written by DP rank 0, resumed only on the same tp and pp sizes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ofs_scale.checkpoint.integrity import SHARDS, CheckpointError, read_meta
from ofs_scale.parallel.mesh import Mesh


def _shard_file(path: Path, mesh: Mesh) -> Path:
    return path / SHARDS / f"pp{mesh.pp_rank}_tp{mesh.tp_rank}.pt"


def save_shard_state(tmp: Path, mesh: Mesh, state: dict[str, Any]) -> None:
    """Write state that is the same on every DP replica but differs between (pp, tp) shards
    (plain tensors, numbers, lists) into a checkpoint being written; DP rank 0 writes it.
    Collective: a failed write on any rank raises CheckpointError on every rank."""
    error = ""
    if state and mesh.dp_rank == 0:
        f = _shard_file(tmp, mesh)
        try:
            f.parent.mkdir(parents=True, exist_ok=True)
            with open(f, "wb") as fh:
                torch.save(state, fh)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as e:
            error = f"{f}: {e}"
    failed = torch.tensor([float(bool(error))], device=mesh.device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item():
        raise CheckpointError(
            f"writing callback state failed ({error or 'on another rank'}); the previous "
            "checkpoint is intact; free disk space or fix permissions, then resume"
        )


def load_shard_state(path: str | Path, mesh: Mesh) -> tuple[dict[str, Any], str | None]:
    """(this rank's shard state of checkpoint `path`, None), or ({}, why it is not usable):
    shard state only resumes on the same tp and pp sizes."""
    path = Path(path)
    if not (path / SHARDS).is_dir():
        return {}, None
    layout = read_meta(path).get("layout", {})
    if (layout.get("tp"), layout.get("pp")) != (mesh.tp, mesh.pp):
        return {}, (
            f"written at tp={layout.get('tp')} pp={layout.get('pp')}, this run has "
            f"tp={mesh.tp} pp={mesh.pp}"
        )
    f = _shard_file(path, mesh)
    if not f.is_file():
        return {}, f"{f} is missing"
    try:
        return torch.load(f, map_location="cpu", weights_only=True), None
    except Exception as e:
        return {}, f"{f} unreadable ({type(e).__name__}: {str(e)[:200]})"
