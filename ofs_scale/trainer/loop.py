"""The Trainer: stages, steps, evaluation, checkpoints and callbacks of one run.

The Trainer owns the data order, the lr schedule, the counters and the callbacks; everything that
touches the model goes through the `Engine` interface (`ofs_scale/engine/base.py`), whichever
engine `build_engine` chose.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from ofs_scale.checkpoint import (
    CheckpointManager,
    checkpoint_fingerprint,
    load_init,
    load_shard_state,
)
from ofs_scale.config import Config, check_world, dump_yaml, switch_on
from ofs_scale.console import console
from ofs_scale.data import BatchSampler, RunData, collate, eval_micro_batches, open_data
from ofs_scale.engine import Engine, build_engine
from ofs_scale.instruments import build_instruments
from ofs_scale.optim import lr_at, stage_at
from ofs_scale.parallel.mesh import Mesh, init_mesh
from ofs_scale.trainer.callbacks import Callback
from ofs_scale.trainer.checkpointing import CheckpointCallback
from ofs_scale.trainer.loggers import JsonlLogger, ProgressLogger, WandbLogger
from ofs_scale.trainer.rundir import claim_run_dir
from ofs_scale.trainer.startup import RunFacts


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (too many non-finite steps); a checkpoint was written."""


class Trainer:
    """Owns the mesh, data, engine and callbacks of one run.

    `optimizer`, `named_params` and `params` are the engine's, kept here for the callbacks.
    """

    def __init__(
        self, cfg: Config, callbacks: list[Callback] | None = None, mesh: Mesh | None = None
    ) -> None:
        self.cfg = cfg
        self.mesh = mesh or init_mesh(
            cfg.parallel.tp,
            cfg.parallel.pp,
            cfg.parallel.backend,
            cfg.train.device,
            cfg.parallel.timeout_min,
        )
        m = self.mesh
        check_world(cfg, m.world_size)
        self.out_dir = Path(cfg.run.out_dir)
        torch.manual_seed(cfg.run.seed)

        self.data = self._prepare_data()
        self.train_split, self.val_split = self.data.train, self.data.val
        t = cfg.train
        self.sampler = BatchSampler(
            t.global_batch, t.micro_batch, m.dp_rank, m.dp, self.train_split.key
        )
        self.engine: Engine = build_engine(cfg, m, self.data.vocab_size)
        self.named_params = self.engine.named_parameters()
        self.params = [p for _, p in self.named_params]
        self.optimizer = self.engine.optimizer
        self.facts = RunFacts.build(cfg, m, self.engine, self.data.vocab_size)
        self.ckpt = CheckpointManager(
            cfg.checkpoint.dir or self.out_dir / "checkpoints",
            m,
            cfg.checkpoint.keep,
            fingerprint=checkpoint_fingerprint(cfg),
            resume_from=cfg.checkpoint.resume_from,
            verify=cfg.checkpoint.verify,
            # DeepSpeed writes its own files synchronously (begin/commit, not save)
            async_save=switch_on(cfg.checkpoint.async_save, m.device.type == "cuda")
            and cfg.train.engine == "native",
        )
        self.step = 0
        self.tokens = 0
        self.bad_streak = 0
        self.saved_step = -1  # the step of the last checkpoint this process wrote
        # Set (e.g. by a signal handler) to checkpoint after the current step and return.
        self.stop_requested = False
        self.stopped_early = False
        self.last_record: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.callbacks = callbacks if callbacks is not None else self.default_callbacks()

    # -- setup -----------------------------------------------------------------------------

    def _prepare_data(self) -> RunData:
        # Memory-maps prepared datasets (or prepares data.corpus once, on rank 0): O(1) per start.
        cfg = self.cfg
        return open_data(cfg.data, self.mesh.rank, cfg.run.seed, cfg.logging.progress)

    def default_callbacks(self) -> list[Callback]:
        cbs: list[Callback] = build_instruments(self.cfg)
        if self.mesh.is_logging_rank:
            cbs.append(JsonlLogger(self.out_dir / "metrics.jsonl"))
            if self.cfg.logging.wandb != "disabled":
                cbs.append(WandbLogger(self.cfg.logging.wandb, self.cfg.logging.project))
            if self.cfg.logging.progress:
                cbs.append(ProgressLogger())
        cbs.append(CheckpointCallback())
        return cbs

    # -- state -----------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        extra = {
            "step": self.step,
            "tokens": self.tokens,
            "bad_streak": self.bad_streak,
            "sampler": self.sampler.state_dict(),
            "rng": torch.get_rng_state(),
        }
        return self.engine.checkpoint_state(extra)

    def save_checkpoint(self, name: str) -> Path:
        shards = {}
        for cb in self.callbacks:
            if (st := cb.shard_state(self)) is not None:
                shards[type(cb).__name__] = st
        path = self.engine.save_checkpoint(self.ckpt, name, self.state(), self.step, shards)
        self.saved_step = self.step
        return path

    def resume(self) -> Path | None:
        """Load the newest usable checkpoint of this run, if any; a run without one starts
        from `checkpoint.init_from` when that is set."""
        state = self.state()
        path = self.engine.load_latest(self.ckpt, state, log=self.log)
        if path is None:
            if self.cfg.checkpoint.init_from:
                self.init_from_checkpoint(state)
            return None
        extra = state["extra"]
        self.step = int(extra["step"])
        self.tokens = int(extra["tokens"])
        self.bad_streak = int(extra["bad_streak"])
        self.sampler.load_state_dict(extra["sampler"])
        torch.set_rng_state(extra["rng"])
        shards, problem = load_shard_state(path, self.mesh)
        if problem:
            self.log(f"[checkpoint] {path}: callback state not restored ({problem})")
        for cb in self.callbacks:
            cb.load_shard_state(self, shards.get(type(cb).__name__))
        self.log(f"resumed from {path} at step {self.step}")
        return path

    def init_from_checkpoint(self, state: dict[str, Any]) -> None:
        """Load `checkpoint.init_from`'s weights (and optimizer state with `init_optimizer`)
        into `state`, this run's own; the counters stay at step 0 (see checkpoint/init.py)."""
        c = self.cfg.checkpoint
        meta = load_init(
            c.init_from, state, self.mesh, self.ckpt.fingerprint, c.init_optimizer, c.verify
        )
        what = "weights and optimizer state" if c.init_optimizer else "weights"
        self.log(
            f"initialised {what} from {c.init_from} (step {meta.get('step', '?')} of that run); "
            "this run starts at step 0"
        )

    def log(self, msg: str) -> None:
        """A plain message from the logging rank (`[tag]` prefixes and paths stay as written)."""
        if self.mesh.is_logging_rank:
            console.print(msg, markup=False, highlight=False)

    # -- loop ------------------------------------------------------------------------------

    def is_stage_end(self, step: int) -> bool:
        ends = 0
        for s in self.cfg.train.stages:
            ends += s.steps
            if step == ends:
                return True
        return False

    def _batches(self, split, ids_list) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [collate(split, ids) for ids in ids_list]

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over the next global batch; returns its record."""
        cfg = self.cfg
        t0 = time.perf_counter()
        lr = lr_at(self.step, cfg.train.stages, cfg.optim.lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.train(True)
        batches = self._batches(self.train_split, self.sampler.next())
        result = self.engine.step(batches)
        self.bad_streak = 0 if result.applied else self.bad_streak + 1
        self.step += 1
        step_tokens = cfg.train.global_batch * cfg.data.seq_len
        self.tokens += step_tokens
        dt = time.perf_counter() - t0
        stage_idx, _ = stage_at(self.step - 1, cfg.train.stages)
        record = {
            "step": self.step,
            "stage": cfg.train.stages[stage_idx].name,
            "loss": float(result.loss),
            "lr": lr,
            "grad_norm": float(result.grad_norm),
            "tokens": self.tokens,
            "tokens_per_s": step_tokens / dt,
            "step_time_s": dt,
            **self.facts.step_throughput(step_tokens, dt, self.mesh.world_size),
        }
        if not result.applied:
            record["skipped"] = True
        return record

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Validation loss and perplexity on the evaluation windows (collective)."""
        cfg, m = self.cfg, self.mesh
        ids = eval_micro_batches(
            self.val_split.num_samples,
            cfg.train.eval_batches,
            cfg.train.global_batch,
            cfg.train.micro_batch,
            m.dp_rank,
            m.dp,
        )
        self.engine.train(False)
        val = float(self.engine.evaluate(self._batches(self.val_split, ids)))
        return {"step": self.step, "val_loss": val, "val_ppl": math.exp(min(val, 50.0))}

    def is_eval_step(self, step: int) -> bool:
        """Whether an evaluation runs after optimizer step `step` (1-based)."""
        every = self.cfg.train.eval_every
        return self.is_stage_end(step) or bool(every and step % every == 0)

    def fit(self) -> dict[str, Any]:
        """Train every remaining step of every stage (resuming if a checkpoint exists), holding
        the lock on run.out_dir throughout."""
        lock = claim_run_dir(self.out_dir, self.ckpt, self.mesh)
        try:
            return self._fit()
        finally:
            lock.release()

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self.resume()
        if self.mesh.is_logging_rank:
            # The resolved config next to the checkpoints: quant eval rebuilds the model from it.
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(dump_yaml(cfg))
        self.facts.print(cfg, self.mesh)
        total = cfg.total_steps
        for cb in self.callbacks:
            cb.on_train_start(self)
        try:
            while self.step < total:
                for cb in self.callbacks:
                    cb.pre_step(self, self.step + 1)
                record = self.train_step()
                self.last_record = record
                for cb in self.callbacks:
                    cb.post_step(self, self.step, record)
                if self.bad_streak >= cfg.train.max_bad_steps:
                    raise self._stop_non_finite()
                stage_end = self.is_stage_end(self.step)
                # Evaluate before any checkpoint of this step is written (the periodic one
                # follows the evaluation): a process that dies in between redoes both.
                if self.is_eval_step(self.step):
                    self.last_eval = self.evaluate()
                    for cb in self.callbacks:
                        cb.on_eval(self, self.step, self.last_eval)
                if self.stop_requested and not stage_end:
                    if self.saved_step != self.step:
                        self.save_checkpoint(f"step_{self.step:06d}")
                    self.stopped_early = True
                    self.log(f"stop requested: checkpoint written at step {self.step}")
                    break
                if stage_end:
                    idx, _ = stage_at(self.step - 1, cfg.train.stages)
                    for cb in self.callbacks:
                        cb.on_stage_end(self, idx)
                    if self.stop_requested:
                        self.stopped_early = self.step < total
                        break
        finally:
            for cb in self.callbacks:
                cb.on_train_end(self)
        self.ckpt.wait()  # the last background save is committed before fit returns
        return self.summary()

    def _stop_non_finite(self) -> TrainingStopped:
        """Checkpoint the diverged state (marked unhealthy, never resumed by default) and say
        how to go on from the last healthy checkpoint."""
        name = f"step_{self.step:06d}"
        self.save_checkpoint(name)
        first_bad = self.step - self.bad_streak + 1
        # the weights saved after step first_bad - 1 are what produced the first bad step
        self.ckpt.mark_unhealthy(
            first_bad - 1, f"its weights led to non-finite steps from step {first_bad} on"
        )
        healthy = self.ckpt.newest_healthy()
        where = (
            f"resumes from {healthy.name}, the last checkpoint with healthy weights"
            if healthy
            else "has no checkpoint with healthy weights: start a new run.out_dir"
        )
        return TrainingStopped(
            f"{self.bad_streak} non-finite steps in a row at step {self.step}; checkpoint {name} "
            "written and marked unhealthy. Lower optim.lr, enable train.grad_clip, or use "
            f"train.dtype=fp32, then rerun: the run {where} (checkpoint.resume_from=last_healthy)"
        )

    def summary(self) -> dict[str, Any]:
        rows: dict[str, Any] = {"steps": self.step, "tokens": self.tokens}
        if self.last_record:
            rows["final loss"] = self.last_record["loss"]
            rows["tokens/s"] = self.last_record["tokens_per_s"]
        if self.last_eval:
            rows["val loss"] = self.last_eval["val_loss"]
            rows["val ppl"] = self.last_eval["val_ppl"]
        for cb in self.callbacks:
            rows.update(cb.summary(self))
        return rows
