"""Atomic, verified checkpoints with torch.distributed.checkpoint (DCP).

Layout under the checkpoint directory:
    step_000040/      periodic (the newest `checkpoint.keep` are kept, and the newest healthy one)
    stage_warmup/     end of a stage (kept forever)
    latest            name of the newest complete checkpoint
    <name>/shards/    per-(pp, tp) shard state of callbacks (online CMD), written by DP rank 0
    .tmp-*/           a save in progress (ignored and removed on the next save)
    .abandoned/       checkpoints past the one a run resumed from (a diverged trajectory)

A save writes into `.tmp-<name>`, adds `ofs_meta.json` (step, layout, fingerprint, whether the
weights were healthy, a crc32 per file) once every rank has written, renames the directory into
place and only then updates `latest`: a crash at any point leaves the previous checkpoint intact.

With `async_save` (`checkpoint.async_save`), DCP stages the state to CPU memory (a copy, so
training may change the weights right away) and a background thread writes it; the commit above
(checksums, rename, `latest`, pruning) waits for that write on every rank and runs at the next
save, before any reading of the directory, and when training ends (`wait`). Until then the
previous checkpoint stays `latest`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.tensor import DTensor

from ofs_scale.checkpoint.integrity import (
    LATEST,
    META,
    CheckpointError,
    checksums,
    is_complete,
    mismatches,
    read_meta,
    root_cause,
    saved_files,
    truncation_problem,
    write_atomic,
    write_errors,
)
from ofs_scale.checkpoint.shards import save_shard_state
from ofs_scale.parallel.mesh import Mesh

ABANDONED = ".abandoned"
RESUMED_FROM = "resumed_from"
POLICIES = ("last_healthy", "latest")


@dataclass
class PendingSave:
    """A checkpoint whose background write may still run: committed by `wait`."""

    name: str
    step: int
    future: Future
    """Done when the write is: this rank's share of the checksums (see `_sums_after`)."""
    health: dict[str, Any]
    """The weights' health when the save began (they change while the write runs)."""


def commit_dir(tmp: Path, final: Path) -> None:
    """Move a fully written checkpoint into place (replacing one of the same name)."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


class CheckpointManager:
    """Saves, finds and loads checkpoints of one run (collective calls on every rank).

    `resume_from`: `last_healthy` (the newest checkpoint whose weights were finite and not in
    a non-finite streak), `latest` (the newest usable one) or a checkpoint path (used once: the
    run's later checkpoints then take over). `verify`: check the recorded crc32 before loading.
    `move_later`: after a resume, move checkpoints past the resumed one to `.abandoned/` (off
    for readers such as quantisation eval, which must not change a run directory).
    `async_save`: write in the background and commit later (see the module docstring).
    """

    def __init__(
        self,
        root: str | Path,
        mesh: Mesh,
        keep: int = 2,
        fingerprint: dict | None = None,
        resume_from: str = "last_healthy",
        verify: bool = True,
        move_later: bool = True,
        async_save: bool = False,
    ) -> None:
        self.root = Path(root)
        self.mesh = mesh
        self.keep = keep
        # settings the saved tensors depend on (`fingerprint`); a checkpoint written with other
        # values stops the resume instead of loading into the wrong model
        self.fingerprint = fingerprint
        self.resume_from = resume_from
        self.verify = verify
        self.move_later = move_later
        self.async_save = async_save
        self.pending: PendingSave | None = None
        self._group: dist.ProcessGroup | None = None  # gloo group of the background writes
        self._stager: DefaultStager | None = None  # CPU copies of the state, reused

    # -- writing ---------------------------------------------------------------------------

    def meta(self, name: str, step: int) -> dict[str, Any]:
        """The `ofs_meta.json` of a checkpoint written now (without health and checksums)."""
        meta = {"step": step, "name": name, "time": time.time(), "layout": self.layout()}
        if self.fingerprint is not None:
            meta["fingerprint"] = self.fingerprint
        return meta

    def layout(self) -> dict[str, int]:
        """The parallel layout of this run, as recorded in ofs_meta.json."""
        m = self.mesh
        return {"tp": m.tp, "pp": m.pp, "dp": m.dp, "world": m.world_size}

    def save(
        self, name: str, state: dict[str, Any], step: int, shards: dict[str, Any] | None = None
    ) -> Path:
        """Write `state` (and `shards`, see save_shard_state) as checkpoint `name` atomically;
        returns its final path (where it will be once committed, with `async_save`)."""
        tmp = self.begin(name)
        with write_errors(name, tmp):
            # first, so that every file but DCP's exists before a background write begins
            save_shard_state(tmp, self.mesh, shards or {})
            if self.async_save:
                write = dcp.async_save(
                    state,
                    checkpoint_id=str(tmp),
                    process_group=self.group(),
                    async_stager=self.stager(),
                )
            else:
                dcp.save(state, checkpoint_id=str(tmp))
        if not self.async_save:
            return self.commit(name, state, step)
        self.pending = PendingSave(name, step, self._sums_after(write, tmp), self.health(state))
        return self.root / name

    def _sums_after(self, write: Future, tmp: Path) -> Future:
        """A future of this rank's share of the checksums of `tmp`, computed in the background
        once `write` is done (DCP's write ends with a collective step after every rank's files
        and the metadata are written, so every rank lists the same files then)."""
        sums: Future = Future()

        def after(done: Future) -> None:
            try:
                done.result()
                files = saved_files(tmp)
                sums.set_result(checksums(tmp, files[self.mesh.rank :: self.mesh.world_size]))
            except BaseException as e:  # DCP's CheckpointException included
                sums.set_exception(e)

        write.add_done_callback(after)
        return sums

    def stager(self) -> DefaultStager:
        """The stager of async saves, kept for the run: it copies the state into the CPU
        buffers of the previous save (pinned on CUDA) instead of allocating them anew each time
        (a copy of the state stays in host memory). Reuse is safe because a save always waits
        for the previous one's write first."""
        if self._stager is None:
            pinned = self.mesh.device.type == "cuda"
            self._stager = DefaultStager(StagingOptions(pinned, False, False, False))
        return self._stager

    def group(self) -> dist.ProcessGroup:
        """The process group of background writes (collective on first use): a gloo group of
        its own, so their collectives never interleave with training's on the default group."""
        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        return self._group

    def wait(self) -> None:
        """Finish the pending background save, if any: wait for its write on every rank, then
        commit it; when any rank's write failed, raise CheckpointError on every rank and leave
        the previous checkpoint as `latest` (collective)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        tmp = self.root / f".tmp-{pending.name}"
        error, sums = "", {}
        try:
            sums = pending.future.result()
        except (Exception, CheckpointException) as e:  # DCP's is a BaseException
            error = root_cause(e)
        failed = torch.tensor([float(bool(error))], device=self.mesh.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item():
            raise CheckpointError(
                f"writing checkpoint {pending.name} into {tmp} failed in the background "
                f"({error or 'on another rank'}); the previous checkpoints are intact; free disk "
                f"space or fix permissions of {tmp.parent}, then resume"
            )
        self.commit(pending.name, {}, pending.step, health=pending.health, sums=sums)

    def begin(self, name: str) -> Path:
        """Finish any pending save, then clear and return the temporary directory of checkpoint
        `name` (collective)."""
        self.wait()
        tmp = self.root / f".tmp-{name}"
        if self.mesh.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        return tmp

    def commit(
        self,
        name: str,
        state: dict[str, Any],
        step: int,
        health: dict[str, Any] | None = None,
        sums: dict[str, Any] | None = None,
        **meta: Any,
    ) -> Path:
        """After every rank wrote `.tmp-<name>`: record health (of `state`, unless given) and
        checksums (this rank's share `sums`, unless computed here) in ofs_meta.json, rename it
        into place, move `latest`, prune (collective)."""
        tmp, final = self.root / f".tmp-{name}", self.root / name
        health = health or self.health(state)
        dist.barrier()
        files = self._checksums(tmp, sums)
        error = [""]
        if self.mesh.rank == 0:
            record = {**self.meta(name, step), **meta, **health, "files": files}
            try:
                with write_errors(name, tmp):
                    write_atomic(tmp / META, json.dumps(record))
                    commit_dir(tmp, final)
                    write_atomic(self.root / LATEST, name + "\n")
            except CheckpointError as e:
                error = [str(e)]  # raised on every rank below, not on rank 0 alone
            else:
                # checkpoints from the first non-finite step's predecessor on are suspect
                self.prune(before=step - health["bad_streak"])
        dist.broadcast_object_list(error, src=0)
        if error[0]:
            raise CheckpointError(error[0])
        return final

    def health(self, state: dict[str, Any]) -> dict[str, Any]:
        """Whether the model weights in `state` are finite on every rank, and the trainer's
        non-finite streak; healthy = both fine (collective). A finite sum means every entry is
        finite (NaN and inf propagate), so only a tensor whose sum is not finite (a non-finite
        entry, or an overflow) is checked entry by entry: one reduction per tensor, no mask as
        large as the weights, in the common case."""
        weights = [
            v.to_local() if isinstance(v, DTensor) else v
            for key, v in state.items()
            if key.startswith("model/") and isinstance(v, torch.Tensor) and v.is_floating_point()
        ]
        finite = True
        if weights:
            sum_ok = torch.isfinite(torch.stack([w.sum().float() for w in weights])).tolist()
            finite = all(ok or bool(torch.isfinite(w).all()) for w, ok in zip(weights, sum_ok))
        flag = torch.tensor([float(finite)], device=self.mesh.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        streak = int(state.get("extra", {}).get("bad_streak", 0))
        ok = bool(flag.item())
        return {"finite": ok, "bad_streak": streak, "healthy": ok and streak == 0}

    def _checksums(self, tmp: Path, mine: dict[str, Any] | None = None) -> dict[str, Any]:
        """crc32 of every file under `tmp`, the files split over the ranks (collective);
        `mine`: this rank's share, when already computed."""
        if mine is None:
            files = saved_files(tmp)
            mine = checksums(tmp, files[self.mesh.rank :: self.mesh.world_size])
        parts: list[Any] = [None] * self.mesh.world_size
        dist.all_gather_object(parts, mine)
        return {k: v for part in parts for k, v in part.items()}

    def prune(self, before: int | None = None) -> None:
        """Drop periodic checkpoints past the newest `keep`, except the newest healthy one
        written before step `before`. The weights saved at step s feed step s+1, so only a
        later finite step vouches for them: a run that diverges keeps one checkpoint from
        before the divergence whatever `keep` is."""
        periodic = sorted(p for p in self.root.glob("step_*") if p.is_dir() and is_complete(p))
        healthy = [
            p
            for p in periodic
            if (meta := _meta_or_empty(p)).get("healthy", True)
            and (before is None or meta.get("step", before) < before)
        ]
        protect = healthy[-1] if healthy else None
        for p in periodic[: max(0, len(periodic) - self.keep)]:
            if p != protect:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)

    # -- finding and loading ---------------------------------------------------------------

    def root_problem(self) -> str | None:
        """Why checkpoints cannot be written under the root at all, or None (not collective)."""
        for parent in [self.root, *self.root.parents]:
            if parent.exists() and not parent.is_dir():
                return f"{parent} is a file, checkpoint.dir needs a directory there"
        if (self.root / LATEST).is_dir():
            return (
                f"{self.root / LATEST} is a directory; it must be the file naming the newest "
                "checkpoint: move it away"
            )
        return None

    def candidates(self) -> list[Path]:
        """Checkpoint directories, newest first (the `latest` marker first when valid), the
        incomplete ones (no step to order by) last."""
        if not self.root.is_dir():
            return []
        found = [
            p
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and p.name != LATEST
        ]
        ordered = sorted(
            found,
            key=lambda p: (_meta_or_empty(p).get("step", -1), p.stat().st_mtime),
            reverse=True,
        )
        try:
            named = self.root / (self.root / LATEST).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):  # missing or garbled: order by step alone
            named = None
        if named in ordered and is_complete(named):
            ordered.remove(named)
            ordered.insert(0, named)
        return ordered

    def mark_unhealthy(self, from_step: int, reason: str) -> None:
        """Record in ofs_meta.json that the checkpoints at `from_step` and later hold diverged
        weights (`reason`), so that `last_healthy` skips them (collective)."""
        self.wait()
        if self.mesh.rank == 0:
            for p in self.candidates():
                meta = _meta_or_empty(p)
                if meta.get("step", -1) >= from_step and meta.get("healthy", True):
                    meta.update(healthy=False, unhealthy=reason)
                    write_atomic(p / META, json.dumps(meta))
        dist.barrier()

    def newest_healthy(self) -> Path | None:
        """The newest complete checkpoint whose weights were healthy when saved, or None."""
        for p in self.candidates():
            if is_complete(p) and _meta_or_empty(p).get("healthy", True):
                return p
        return None

    def _plan(self) -> tuple[list[Path], bool]:
        """(checkpoints to try in order, whether they were named by `resume_from`)."""
        if self.resume_from in POLICIES:
            return self.candidates(), False
        path = Path(self.resume_from)
        if not path.is_absolute() and not path.exists():
            path = self.root / path
        try:
            used = (self.root / RESUMED_FROM).read_text().strip() == str(path.resolve())
        except OSError:
            used = False
        return (self.candidates(), False) if used else ([path], True)

    def health_problem(self, path: Path) -> str | None:
        """Why `path` is skipped under `resume_from=last_healthy`, or None."""
        meta = _meta_or_empty(path)
        if self.resume_from == "latest" or meta.get("healthy", True):
            return None
        why = meta.get("unhealthy") or (
            "its weights were not finite"
            if not meta.get("finite", True)
            else f"{meta.get('bad_streak')} non-finite steps in a row led up to it"
        )
        return f"unhealthy: {why}; resume it anyway with checkpoint.resume_from=latest"

    def load_latest(self, state: dict[str, Any], log=print) -> Path | None:
        """Load the newest usable checkpoint into `state` in place; skip broken ones with a
        report. Returns its path, or None when there is none."""
        return self.load_first_usable(
            truncation_problem, lambda path: dcp.load(state, checkpoint_id=str(path)), log
        )

    def load_first_usable(
        self, problem_of: Callable[[Path], str | None], load: Callable[[Path], None], log=print
    ) -> Path | None:
        """Try the checkpoints newest first (or the one `resume_from` names): skip, with a
        report, those `problem_of` (run on rank 0), the health policy, the checksums or `load`
        (on every rank) find unusable; return the first that loads, or None when the run has
        none. Collective. Raises CheckpointError, leaving every checkpoint as it is, when one
        was written for another model (fingerprint) or none of several is usable: a fresh start
        would overwrite them."""
        self.wait()
        rank0 = self.mesh.rank == 0
        box = [self._plan() if rank0 else None]
        dist.broadcast_object_list(box, src=0)
        paths, named = box[0]
        for path in paths:
            verdict = [None]
            if rank0:
                problem = problem_of(path) or self.health_problem(path)
                verdict = [(self.incompatibility(path), problem)]
            dist.broadcast_object_list(verdict, src=0)
            wrong_model, problem = verdict[0]
            if wrong_model:
                raise CheckpointError(
                    f"{path} was written with {wrong_model}; resume with the settings it was "
                    "written with (the run's config.yaml), or start a new run.out_dir"
                )
            problem = problem or self.checksum_problem(path)
            if problem is None:
                try:
                    load(path)
                except (Exception, CheckpointException) as e:  # DCP's is a BaseException
                    problem = f"load failed ({root_cause(e)})"
                else:
                    if rank0 and self.move_later:
                        self._after_resume(path, named, log)
                    return path
            if named:
                raise CheckpointError(
                    f"checkpoint.resume_from={self.resume_from}: {path} cannot be used "
                    f"({problem}); name another checkpoint or use last_healthy"
                )
            if rank0:
                log(f"[checkpoint] skipping {path}: {problem}")
        if paths:
            raise CheckpointError(
                f"none of the {len(paths)} checkpoints in {self.root} can resume this run "
                "(reasons above); fix or move them away, or start a new run.out_dir"
            )
        return None

    def checksum_problem(self, path: Path) -> str | None:
        """Files of `path` whose bytes differ from the recorded crc32, the files split over
        the ranks (collective); None when they match, none were recorded or `verify` is off."""
        if not self.verify:
            return None
        recorded = _meta_or_empty(path).get("files") or {}
        names = sorted(recorded)
        bad = mismatches(path, recorded, names[self.mesh.rank :: self.mesh.world_size])
        parts: list[Any] = [None] * self.mesh.world_size
        dist.all_gather_object(parts, bad)
        found = [b for part in parts for b in part]
        if not found:
            return None
        return "corrupted: " + "; ".join(found[:3]) + " (checkpoint.verify=false skips this)"

    def _after_resume(self, path: Path, named: bool, log) -> None:
        """Move checkpoints newer than the resumed one out of the way (their trajectory is
        abandoned; pruning and `latest` would otherwise mix the two); remember a named one."""
        if named:
            self.root.mkdir(parents=True, exist_ok=True)
            write_atomic(self.root / RESUMED_FROM, str(path.resolve()))
        step = _meta_or_empty(path).get("step", -1)
        for p in self.candidates():
            later = _meta_or_empty(p).get("step", -1)
            if p.resolve() == path.resolve() or later <= step:
                continue
            dest = self.root / ABANDONED / f"{p.name}-{int(time.time())}"
            dest.parent.mkdir(exist_ok=True)
            os.replace(p, dest)
            log(
                f"[checkpoint] moved {p.name} (step {later}, after the resumed step {step}) "
                f"to {dest}"
            )

    def incompatibility(self, path: Path) -> str | None:
        """Which fingerprinted settings checkpoint `path` was written with differently, or None.
        Only the config sections this manager's fingerprint names are compared."""
        if self.fingerprint is None:
            return None
        saved = _meta_or_empty(path).get("fingerprint")
        if saved is None:
            return None
        sections = {k.split(".")[0] for k in self.fingerprint}
        keys = sorted(set(self.fingerprint) | {k for k in saved if k.split(".")[0] in sections})
        diffs = [
            f"{k}={saved.get(k)!r} (this run: {self.fingerprint.get(k)!r})"
            for k in keys
            if saved.get(k) != self.fingerprint.get(k)
        ]
        return ", ".join(diffs) or None

    def load(self, path: str | Path, state: dict[str, Any]) -> None:
        """Load checkpoint `path` into `state` in place, or raise CheckpointError (collective)."""
        path = Path(path)
        problem = truncation_problem(path) or self.checksum_problem(path)
        if wrong := self.incompatibility(path):
            problem = f"written with {wrong}; use the config it was written with"
        if problem:
            raise CheckpointError(f"{path}: {problem}; pick another checkpoint directory")
        dcp.load(state, checkpoint_id=str(path))


def _meta_or_empty(path: Path) -> dict[str, Any]:
    try:
        return read_meta(path)
    except (OSError, ValueError):
        return {}
