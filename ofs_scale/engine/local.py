"""The whole model on every rank (pp=1): forward/backward over the micro batches of one step.

The step around it (DP average, clipping, update) is `NativeEngine`'s; `mean_loss` is also the
forward-only evaluation of the DeepSpeed engine, which trains the same model.
"""

from __future__ import annotations

import torch

from ofs_scale.config import Config
from ofs_scale.engine.base import Batch, autocast_context
from ofs_scale.engine.native import NativeEngine
from ofs_scale.model.build import build_model
from ofs_scale.model.gpt import GPT
from ofs_scale.parallel.mesh import Mesh


@torch.no_grad()
def mean_loss(model: GPT, batches: list[Batch], dtype: str, device: torch.device) -> torch.Tensor:
    """Mean loss of `model` over `batches`, forward only (0 for no batches)."""
    total = torch.zeros((), device=device)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast_context(dtype, device):
            logits = model(x)
        total += model.loss(logits, y)
    return total / max(1, len(batches))


class LocalEngine(NativeEngine):
    """The whole model on this rank."""

    def __init__(self, cfg: Config, mesh: Mesh, vocab_size: int) -> None:
        self.model: GPT = build_model(cfg, mesh, vocab_size)
        super().__init__(cfg, mesh, [self.model], self.model)

    def forward_backward(self, batches: list[Batch]) -> torch.Tensor:
        """Accumulate gradients of the mean loss over `batches`; return that loss (detached)."""
        total = torch.zeros((), device=self.mesh.device)
        for x, y in batches:
            x, y = x.to(self.mesh.device), y.to(self.mesh.device)
            with autocast_context(self.dtype, self.mesh.device):
                logits = self.model(x)
            loss = self.model.loss(logits, y) / len(batches)
            loss.backward()
            total += loss.detach()
        return total

    def forward_loss(self, batches: list[Batch]) -> torch.Tensor:
        """Mean loss over `batches`, forward only."""
        return mean_loss(self.model, batches, self.dtype, self.mesh.device)
