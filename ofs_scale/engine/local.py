"""Forward/backward over the micro batches of one step, for one rank's model chunk(s).

`LocalEngine` runs the whole model on this rank (pp=1); the pipeline engine in
`parallel/pipeline.py` has the same interface. Both return the step's loss (mean over this
rank's micro batches) on every rank of the pipeline.
"""

from __future__ import annotations

import torch
from torch import nn

from ofs_scale.config import Config
from ofs_scale.engine.base import Batch, autocast_context
from ofs_scale.model import GPT, build_model
from ofs_scale.parallel.mesh import Mesh


class LocalEngine:
    """The whole model on this rank."""

    def __init__(self, cfg: Config, mesh: Mesh, vocab_size: int) -> None:
        self.mesh = mesh
        self.model: GPT = build_model(cfg, mesh, vocab_size)
        self.chunks: list[GPT] = [self.model]
        self.state_module: nn.Module = self.model
        self.dtype = cfg.train.dtype

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for c in self.chunks for n, p in c.named_parameters()]

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

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> torch.Tensor:
        total = torch.zeros((), device=self.mesh.device)
        for x, y in batches:
            x, y = x.to(self.mesh.device), y.to(self.mesh.device)
            with autocast_context(self.dtype, self.mesh.device):
                logits = self.model(x)
            total += self.model.loss(logits, y)
        return total / max(1, len(batches))

    def train(self, mode: bool = True) -> None:
        for c in self.chunks:
            c.train(mode)
