"""The `Engine` interface every engine implements, and what the engines share: the micro-batch
type, the step result, the DP loss average, the autocast context, the chunk view and the
master-weights view of checkpoints."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from ofs_scale.checkpoint import CheckpointManager
from ofs_scale.parallel.mesh import Mesh

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class StepResult:
    """The outcome of one optimizer step."""

    loss: torch.Tensor
    """Loss averaged over the step's micro batches and the data-parallel group (detached)."""
    grad_norm: torch.Tensor
    """Global gradient norm before clipping (NaN when the engine could not measure it)."""
    applied: bool
    """False when the update was skipped because the loss or the norm was not finite."""


class Optimizer(Protocol):
    """What the Trainer touches of an engine's optimizer: its groups, to write the lr."""

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups; the Trainer sets `group["lr"]` before every step."""


class Engine(Protocol):
    """One rank's share of the model and everything that changes it.

    The Trainer keeps the data order, the lr schedule and the counters; the engine does the
    rest of a step (forward/backward, DP reduction, clipping, update) and owns the optimizer.
    Every method is collective over the ranks of the run unless it says otherwise.
    """

    chunks: list[nn.Module]
    """This rank's model chunks (one without pipeline parallelism), read by the instruments."""
    state_module: nn.Module
    """The chunks as one module: their parameters and buffers by checkpoint name."""
    optimizer: Optimizer

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """This rank's parameters by name (the objects the optimizer updates in place)."""

    def train(self, mode: bool = True) -> None:
        """Training (True) or evaluation mode for every chunk (not collective)."""

    def step(self, batches: list[Batch]) -> StepResult:
        """One optimizer step over this rank's micro batches: forward/backward, gradient
        average over DP, global grad norm, clipping, the update (skipped when the loss or the
        norm is not finite) and clearing the gradients."""

    def evaluate(self, batches: list[Batch]) -> torch.Tensor:
        """Mean loss over `batches`, averaged over the DP group too (no gradients)."""

    def optimizer_state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for the optimizer: `moments` (optimizer state) and `master`
        (fp32 master weights kept apart from the model, 0 when there are none)."""

    def checkpoint_state(self, extra: dict[str, Any]) -> dict[str, Any]:
        """The state dict DCP saves and loads in place, with the Trainer's `extra` counters
        under the key "extra" (not collective)."""

    def save_checkpoint(
        self,
        manager: CheckpointManager,
        name: str,
        state: dict[str, Any],
        step: int,
        shards: dict[str, Any],
    ) -> Path:
        """Write `state` (from `checkpoint_state`) and the callbacks' `shards` as checkpoint
        `name` of `manager`, atomically; returns its path."""

    def load_latest(
        self,
        manager: CheckpointManager,
        state: dict[str, Any],
        log: Callable[[str], None] = print,
    ) -> Path | None:
        """Load the newest usable checkpoint of `manager` into the engine and into `state`
        (whose "extra" the Trainer reads back); its path, or None when there is none."""


def mean_over_dp(value: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """`value` averaged over the data-parallel group, in place; returns it."""
    if mesh.dp > 1:
        dist.all_reduce(value, group=mesh.dp_group)
        value /= mesh.dp
    return value


def autocast_context(dtype: str, device: torch.device):
    """bf16 autocast for `train.dtype=bf16`, nothing otherwise."""
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class ChunkView(nn.Module):
    """Several pipeline chunks of one rank seen as one module (their names do not overlap)."""

    def __init__(self, chunks: list[nn.Module]) -> None:
        super().__init__()
        self._chunks = chunks

    def named_parameters(self, *args, **kwargs):
        for c in self._chunks:
            yield from c.named_parameters(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        out = {}
        for c in self._chunks:
            out.update(c.state_dict(*args, **kwargs))
        return out


class MasterView(nn.Module):
    """A module's state with fp32 master weights in place of its (bf16) parameters, for
    checkpoints. A parameter without a master on this rank (owned by another DP rank under
    ZeRO-1) is left out: its owner saves and loads it, so each key is written once."""

    def __init__(self, module: nn.Module, masters: dict[str, nn.Parameter]) -> None:
        super().__init__()
        self._inner = [module]  # a list: not registered as a submodule
        self._masters = masters

    def named_parameters(self, *args, **kwargs):
        for n, _ in self._inner[0].named_parameters(*args, **kwargs):
            if n in self._masters:
                yield n, self._masters[n]

    def state_dict(self, *args, **kwargs):
        module = self._inner[0]
        param_names = {id(p): n for n, p in module.named_parameters()}
        out = {}
        for key, t in module.state_dict(keep_vars=True).items():
            name = param_names.get(id(t))
            if name is None:
                out[key] = t
            elif name in self._masters:
                out[key] = self._masters[name]
        return out
