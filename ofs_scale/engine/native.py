"""What the native engines (local and pipelined) share: the step after the backward pass.

A subclass supplies `forward_backward` (gradients of the mean loss over this rank's micro
batches, and that loss on every rank of the pipeline) and `forward_loss` (the same loss, forward
only). The rest of a step is the same for both: gradients averaged over DP in flat buckets, the
global norm over every axis, clipping, the update of our (possibly DP-sharded) optimizer, skipped
when the loss or the norm is not finite. Checkpoints are plain DCP through `CheckpointManager`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ofs_scale.checkpoint import CheckpointManager, training_state
from ofs_scale.config import Config
from ofs_scale.engine.base import Batch, StepResult, mean_over_dp
from ofs_scale.optim import build_optimizer
from ofs_scale.optim.sharded import state_bytes
from ofs_scale.parallel.grads import average_across_dp, clip_grads, global_grad_norm
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
        self.optimizer = build_optimizer(self.named_parameters(), cfg.optim, mesh)

    @abstractmethod
    def forward_backward(self, batches: list[Batch]) -> torch.Tensor:
        """Accumulate gradients of the mean loss over `batches`; return that loss (detached)
        on every rank of the pipeline, not yet averaged over DP."""

    @abstractmethod
    def forward_loss(self, batches: list[Batch]) -> torch.Tensor:
        """Mean loss over `batches` without gradients, on every rank of the pipeline."""

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """This rank's parameters by name, chunk after chunk."""
        return [(n, p) for c in self.chunks for n, p in c.named_parameters()]

    def train(self, mode: bool = True) -> None:
        """Training or evaluation mode for every chunk."""
        for c in self.chunks:
            c.train(mode)

    def step(self, batches: list[Batch]) -> StepResult:
        """Forward/backward, DP average, global norm, clip, update (if finite), zero_grad."""
        loss = self.forward_backward(batches)
        average_across_dp(self.params, self.mesh)
        mean_over_dp(loss, self.mesh)
        norm = global_grad_norm(self.params, self.mesh)
        applied = bool(torch.isfinite(loss)) and bool(torch.isfinite(norm))
        if applied:
            clip_grads(self.params, self.grad_clip, norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, norm, applied)

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> torch.Tensor:
        """Mean loss over `batches`, averaged over the DP group."""
        return mean_over_dp(self.forward_loss(batches), self.mesh)

    def optimizer_state_bytes(self) -> dict[str, int]:
        """Optimizer state of this rank; the update is in place, so no master copy."""
        return {"moments": state_bytes(self.optimizer), "master": 0}

    def checkpoint_state(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Model and optimizer state by parameter name (reshardable), and `extra`."""
        return training_state(self.state_module, self.optimizer, extra, self.mesh)

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
        """DCP loads model and optimizer in place through `state`."""
        return manager.load_latest(state, log=log)
