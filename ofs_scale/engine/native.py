"""What the native engines (local and pipelined) share: the step after the backward pass.

A subclass supplies `forward_backward` (gradients of the mean loss over this rank's micro
batches, and that loss on every rank of the pipeline) and `forward_loss` (the same loss, forward
only). The rest of a step is the same for both: gradients averaged over DP in flat buckets, the
global norm over every axis, clipping, the update of our (possibly DP-sharded) optimizer, skipped
when the loss or the norm is not finite. Checkpoints are plain DCP through `CheckpointManager`.

Two switches change how (docs/gpu_step.md): `train.master_weights` (bf16 weights for compute,
fp32 masters in the optimizer) and `parallel.overlap_grad_reduce` (DP reduction in buckets
launched from gradient hooks during the backward). Either one puts the gradients into fp32
buffers (`parallel.grad_buffer.GradBuffer`), reduced to each parameter's owner under ZeRO-1;
with both off the step is the plain one: all-reduce after the backward, fp32 weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ofs_scale.checkpoint import CheckpointManager, training_state
from ofs_scale.config import Config, switch_on
from ofs_scale.engine.base import Batch, MasterView, StepResult, mean_over_dp
from ofs_scale.optim import build_optimizer
from ofs_scale.optim.sharded import ShardedOptimizer, state_bytes
from ofs_scale.parallel.grad_buffer import GradBuffer
from ofs_scale.parallel.grads import (
    average_across_dp,
    clip_grads,
    global_grad_norm,
    sum_sequence_parallel_grads,
)
from ofs_scale.parallel.mesh import Mesh


class NativeEngine(ABC):
    """Base of `LocalEngine` and `PipelineEngine`: owns the optimizer and runs the step."""

    def __init__(
        self, cfg: Config, mesh: Mesh, chunks: list[nn.Module], state_module: nn.Module
    ) -> None:
        self.mesh = mesh
        self.dtype = cfg.train.dtype
        self.grad_clip = cfg.train.grad_clip
        self.chunks = chunks
        self.state_module = state_module
        self.params = [p for _, p in self.named_parameters()]
        cuda = mesh.device.type == "cuda"
        self.master_weights = cfg.train.dtype == "bf16" and switch_on(
            cfg.train.master_weights, cuda
        )
        self.optimizer = build_optimizer(
            self.named_parameters(), cfg.optim, mesh, master=self.master_weights
        )
        self.sharded = isinstance(self.optimizer, ShardedOptimizer)
        self.grads: GradBuffer | None = None
        overlap = switch_on(cfg.parallel.overlap_grad_reduce, cuda, requires=mesh.dp > 1)
        if self.master_weights or overlap:
            self._use_grad_buffer(cfg, overlap)

    def _use_grad_buffer(self, cfg: Config, overlap: bool) -> None:
        """bf16 model weights (the optimizer already holds the fp32 masters) and the fp32
        gradient buffers, reduced to owners under ZeRO-1."""
        if self.master_weights:
            for p in self.params:
                p.data = p.data.to(torch.bfloat16)
        owners = None
        if self.sharded:
            owners = [self.optimizer.owner[n] for n, _ in self.named_parameters()]
        # What each step points at the buffers (`_attach_grads`), fixed at build: this rank's
        # parameters (its owned ones under ZeRO-1), each with what the optimizer updates (its
        # master, under master weights).
        masters = self.optimizer.master.by_name if self.master_weights else {}
        owned = set(self.optimizer.owned_names()) if self.sharded else None
        self._grad_targets = [
            (p, masters.get(name, p))
            for name, p in self.named_parameters()
            if owned is None or name in owned
        ]
        p = cfg.parallel
        self.grads = GradBuffer(
            self.params,
            self.mesh,
            bucket_mb=p.bucket_mb,
            reduce_dtype=p.grad_reduce_dtype,
            overlap=overlap,
            owners=owners,
        )

    @abstractmethod
    def forward_backward(self, batches: list[Batch]) -> torch.Tensor:
        """Accumulate gradients of the mean loss over `batches`; return that loss (detached)
        on every rank of the pipeline, not yet averaged over DP."""

    @abstractmethod
    def forward_loss(self, batches: list[Batch]) -> torch.Tensor:
        """Mean loss over `batches` without gradients, on every rank of the pipeline."""

    def micro_divisor(self, num_micro: int) -> int:
        """What the summed micro-batch gradients are still to be divided by (1: the losses
        were already divided by the number of micro batches)."""
        return 1

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """This rank's parameters by name, chunk after chunk."""
        return [(n, p) for c in self.chunks for n, p in c.named_parameters()]

    def train(self, mode: bool = True) -> None:
        """Training or evaluation mode for every chunk."""
        for c in self.chunks:
            c.train(mode)

    def step(self, batches: list[Batch]) -> StepResult:
        """Forward/backward, DP average, global norm, clip, update (if finite), zero_grad."""
        if self.grads is None:
            loss = self.forward_backward(batches)
            average_across_dp(self.params, self.mesh)
            updated, owned_only = self.params, False
        else:
            self.grads.start(len(batches))
            loss = self.forward_backward(batches)
            self.grads.finish(self.mesh.dp * self.micro_divisor(len(batches)))
            updated, owned_only = self._attach_grads(), self.sharded
        sum_sequence_parallel_grads(self.params, self.mesh)
        mean_over_dp(loss, self.mesh)
        norm = global_grad_norm(updated, self.mesh, dp_sharded=owned_only)
        applied = bool(torch.isfinite(loss)) and bool(torch.isfinite(norm))
        if applied:
            clip_grads(updated, self.grad_clip, norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, norm, applied)

    def _attach_grads(self) -> list[nn.Parameter]:
        """Point the `.grad` of what the optimizer updates at the reduced fp32 buffers: this
        rank's parameters (its owned ones under ZeRO-1), or their masters; returns those."""
        updated = []
        for p, target in self._grad_targets:
            if self.grads.received(p):
                target.grad = p.main_grad
                updated.append(target)
        return updated

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> torch.Tensor:
        """Mean loss over `batches`, averaged over the DP group."""
        return mean_over_dp(self.forward_loss(batches), self.mesh)

    def optimizer_state_bytes(self) -> dict[str, int]:
        """Optimizer state of this rank, and its fp32 master weights (0 without them)."""
        master = self.optimizer.master.nbytes() if self.master_weights else 0
        return {"moments": state_bytes(self.optimizer), "master": master}

    def checkpoint_state(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Model and optimizer state by parameter name (reshardable), and `extra`. Under
        master weights the model entries are the fp32 masters, so the checkpoint is the same
        as without them and a resume restores full precision."""
        module = self.state_module
        if self.master_weights:
            module = MasterView(module, self.optimizer.master.by_name)
        return training_state(module, self.optimizer, extra, self.mesh)

    def save_checkpoint(
        self,
        manager: CheckpointManager,
        name: str,
        state: dict[str, Any],
        step: int,
        shards: dict[str, Any],
    ) -> Path:
        """A plain DCP checkpoint (see `CheckpointManager.save`)."""
        return manager.save(name, state, step, shards)

    def load_latest(
        self,
        manager: CheckpointManager,
        state: dict[str, Any],
        log: Callable[[str], None] = print,
    ) -> Path | None:
        """DCP loads model (the masters, under master weights) and optimizer in place through
        `state`; the bf16 weights then follow the loaded masters."""
        path = manager.load_latest(state, log=log)
        if path is not None and self.master_weights:
            self.optimizer.sync_model()
        return path
