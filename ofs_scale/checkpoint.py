"""Atomic, reshardable checkpoints with torch.distributed.checkpoint (DCP).

Layout under the checkpoint directory:
    step_000040/      periodic (the newest `checkpoint.keep` are kept)
    stage_warmup/     end of a stage (kept forever)
    latest            name of the newest complete checkpoint
    <name>/shards/    per-(pp, tp) shard state of callbacks (online CMD), written by DP rank 0
    .tmp-*/           a save in progress (ignored and removed on the next save)

A save writes into `.tmp-<name>`, adds `ofs_meta.json` once every rank has written, renames the
directory into place and only then updates `latest`: a crash at any point leaves the previous
checkpoint intact. State is keyed by parameter name; tensors split over tensor parallelism are
saved as DTensors, so a checkpoint written under one (tp, pp, dp) layout loads under another.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DeviceMesh, DTensor, Shard

from ofs_scale.config import Config
from ofs_scale.model.gpt import resolved
from ofs_scale.optim.registry import OPTIMIZER_SPECS
from ofs_scale.parallel.mesh import Mesh
from ofs_scale.parallel.tp import is_tp_sharded, tp_partition_dim

META = "ofs_meta.json"
LATEST = "latest"
SHARDS = "shards"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names it and what to do."""


def _tp_device_mesh(mesh: Mesh) -> DeviceMesh | None:
    if mesh.tp == 1:
        return None
    return DeviceMesh.from_group(mesh.tp_group, device_type=mesh.device.type)


def _wrap(t: torch.Tensor, param: torch.Tensor | None, mesh: Mesh, tp_mesh) -> torch.Tensor:
    """A TP-split tensor of the parameter's shape becomes a DTensor of the full shape."""
    if tp_mesh is None or param is None or not is_tp_sharded(param) or t.shape != param.shape:
        return t
    dim = tp_partition_dim(param)
    full = list(t.shape)
    full[dim] *= mesh.tp
    stride = torch.empty(full, device="meta").stride()
    return DTensor.from_local(
        t, tp_mesh, [Shard(dim)], run_check=False, shape=torch.Size(full), stride=stride
    )


def training_state(
    model: torch.nn.Module, optimizer: Any, extra: dict[str, Any], mesh: Mesh
) -> dict[str, Any]:
    """The flat state dict DCP saves and loads in place: model, optimizer (by parameter name),
    and `extra` (trainer counters, sampler, RNG)."""
    tp_mesh = _tp_device_mesh(mesh)
    params = dict(model.named_parameters())
    sd: dict[str, Any] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        p = params.get(name)
        sd[f"model/{name}"] = _wrap(t.data if p is not None else t, p, mesh, tp_mesh)
    for name, state in optimizer.named_state().items():
        p = params[name]
        for k, v in state.items():
            if not isinstance(v, torch.Tensor):
                sd[f"optim/{name}/{k}"] = v
                continue
            key = f"optim/{name}/{k}"
            if mesh.tp > 1 and is_tp_sharded(p) and v.ndim and v.shape != p.shape:
                # Per-shard state of a different shape (e.g. SOAP factors): one key per TP rank.
                key += f"@tp{mesh.tp_rank}of{mesh.tp}"
            sd[key] = _wrap(v, p, mesh, tp_mesh)
    sd["extra"] = extra
    return sd


# Model settings that only shape the initialisation: a resumed run may change them freely.
_INIT_ONLY = {"init_std", "scale_out_init", "bln_data_init"}


def checkpoint_fingerprint(cfg: Config) -> dict[str, Any]:
    """The settings a run's saved tensors and their meaning depend on: the model (with defaults
    resolved), the vocabulary, the learned position table's length, the optimizer, and the keys
    its registry entry names (`OptimizerSpec.fingerprint`: the TP size for SOAP/Shampoo)."""
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in _INIT_ONLY}
    model.update(resolved(cfg.model))
    fp = {f"model.{k}": v for k, v in model.items()}
    fp["data.vocab_size"] = cfg.data.vocab_size
    if cfg.model.position == "learned":
        fp["data.seq_len"] = cfg.data.seq_len
    fp["optim.name"] = cfg.optim.name
    for key in OPTIMIZER_SPECS[cfg.optim.name].fingerprint:
        section, name = key.split(".")
        fp[key] = getattr(getattr(cfg, section), name)
    return json.loads(json.dumps(fp))  # as it reads back from ofs_meta.json


def _is_complete(path: Path) -> bool:
    return (path / META).is_file() and (path / ".metadata").is_file()


def truncation_problem(path: Path) -> str | None:
    """A reason why the checkpoint at `path` is unusable, or None (checks sizes, not contents)."""
    try:
        meta = read_meta(path)
        md = FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        return f"unreadable metadata ({type(e).__name__}: {e})"
    needed: dict[str, int] = {}
    for info in md.storage_data.values():
        needed[info.relative_path] = max(
            needed.get(info.relative_path, 0), info.offset + info.length
        )
    for rel, end in needed.items():
        f = path / rel
        if not f.is_file() or f.stat().st_size < end:
            return f"{rel} is missing or truncated"
    if "step" not in meta:
        return f"{META} has no step"
    return None


def commit_dir(tmp: Path, final: Path) -> None:
    """Move a fully written checkpoint into place (replacing one of the same name)."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    """Saves, finds and loads checkpoints of one run (collective calls on every rank)."""

    def __init__(
        self, root: str | Path, mesh: Mesh, keep: int = 2, fingerprint: dict | None = None
    ) -> None:
        self.root = Path(root)
        self.mesh = mesh
        self.keep = keep
        # settings the saved tensors depend on (`fingerprint`); a checkpoint written with other
        # values stops the resume instead of loading into the wrong model
        self.fingerprint = fingerprint

    def meta(self, name: str, step: int) -> dict[str, Any]:
        """The `ofs_meta.json` of a checkpoint written now."""
        meta = {"step": step, "name": name, "time": time.time(), "layout": self.layout()}
        if self.fingerprint is not None:
            meta["fingerprint"] = self.fingerprint
        return meta

    def incompatibility(self, path: Path) -> str | None:
        """Which fingerprinted settings checkpoint `path` was written with differently, or None."""
        if self.fingerprint is None:
            return None
        try:
            saved = read_meta(path).get("fingerprint")
        except (OSError, ValueError):
            return None  # unreadable metadata is reported by the truncation check
        if saved is None:
            return None
        keys = sorted(set(saved) | set(self.fingerprint))
        diffs = [
            f"{k}={saved.get(k)!r} (this run: {self.fingerprint.get(k)!r})"
            for k in keys
            if saved.get(k) != self.fingerprint.get(k)
        ]
        return ", ".join(diffs) or None

    def _rank0(self) -> bool:
        return self.mesh.rank == 0

    def save(
        self, name: str, state: dict[str, Any], step: int, shards: dict[str, Any] | None = None
    ) -> Path:
        """Write `state` (and `shards`, see save_shard_state) as checkpoint `name` atomically;
        returns its final path."""
        final = self.root / name
        tmp = self.root / f".tmp-{name}"
        if self._rank0():
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        dcp.save(state, checkpoint_id=str(tmp))
        save_shard_state(tmp, self.mesh, shards or {})
        dist.barrier()
        if self._rank0():
            write_atomic(tmp / META, json.dumps(self.meta(name, step)))
            commit_dir(tmp, final)
            write_atomic(self.root / LATEST, name + "\n")
            self.prune()
        dist.barrier()
        return final

    def layout(self) -> dict[str, int]:
        m = self.mesh
        return {"tp": m.tp, "pp": m.pp, "dp": m.dp, "world": m.world_size}

    def prune(self) -> None:
        periodic = sorted(p for p in self.root.glob("step_*") if p.is_dir() and _is_complete(p))
        for p in periodic[: max(0, len(periodic) - self.keep)]:
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)

    def candidates(self) -> list[Path]:
        """Complete checkpoints, newest first (the `latest` marker first when valid)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        complete = []
        for p in found:
            if not _is_complete(p):
                continue
            try:
                step = read_meta(p)["step"]
            except Exception:
                step = -1
            complete.append((step, p.stat().st_mtime, p))
        complete.sort(key=lambda x: (x[0], x[1]), reverse=True)
        ordered = [p for _, _, p in complete]
        marker = self.root / LATEST
        if marker.is_file():
            named = self.root / marker.read_text().strip()
            if named in ordered:
                ordered.remove(named)
                ordered.insert(0, named)
        return ordered

    def load_latest(self, state: dict[str, Any], log=print) -> Path | None:
        """Load the newest usable checkpoint into `state` in place; skip broken ones with a
        report. Returns its path, or None when there is none."""
        return self.load_first_usable(
            truncation_problem, lambda path: dcp.load(state, checkpoint_id=str(path)), log
        )

    def load_first_usable(
        self, problem_of: Callable[[Path], str | None], load: Callable[[Path], None], log=print
    ) -> Path | None:
        """Try the checkpoints newest first: skip (with a report) those `problem_of` (run on rank
        0) or `load` (on every rank) finds unusable; return the first that loads, or None when
        the run has none. Collective. Raises CheckpointError, leaving every checkpoint as it is,
        when one was written for another model (fingerprint) or none of several is usable: a
        fresh start would overwrite them."""
        rank0 = self._rank0()
        box = [self.candidates() if rank0 else []]
        dist.broadcast_object_list(box, src=0)
        for path in box[0]:
            verdict = [(self.incompatibility(path), problem_of(path)) if rank0 else None]
            dist.broadcast_object_list(verdict, src=0)
            wrong_model, problem = verdict[0]
            if wrong_model:
                raise CheckpointError(
                    f"{path} was written with {wrong_model}; resume with the settings it was "
                    "written with (the run's config.yaml), or start a new run.out_dir"
                )
            if problem is None:
                try:
                    load(path)
                    return path
                except (Exception, CheckpointException) as e:  # DCP's is a BaseException
                    problem = f"load failed ({type(e).__name__}: {str(e)[:300]})"
            if rank0:
                log(f"[checkpoint] skipping {path}: {problem}")
        if box[0]:
            raise CheckpointError(
                f"none of the {len(box[0])} checkpoints in {self.root} can resume this run "
                "(reasons above); fix or move them away, or start a new run.out_dir"
            )
        return None

    def load(self, path: str | Path, state: dict[str, Any]) -> None:
        """Load checkpoint `path` into `state` in place, or raise CheckpointError."""
        path = Path(path)
        problem = None if _is_complete(path) else "not a complete checkpoint"
        problem = problem or truncation_problem(path)
        if problem:
            raise CheckpointError(f"{path}: {problem}; pick another checkpoint directory")
        dcp.load(state, checkpoint_id=str(path))


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


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ofs_meta.json of a checkpoint."""
    return json.loads((Path(path) / META).read_text())
