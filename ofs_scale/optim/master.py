"""fp32 master weights for bf16 model weights (`train.master_weights`).

The model computes with bf16 weights; the optimizer owns fp32 copies ("masters") and updates
those, with fp32 gradients, then writes them back into the bf16 weights. The optimizers
themselves (AdamW, SOAP, Shampoo, Muon) are unchanged: they are built over the masters and see
fp32 parameters and fp32 gradients, exactly what they see without master weights. Under ZeRO-1
(`ShardedOptimizer`) a rank keeps masters of the parameters it owns only.
"""

from __future__ import annotations

import torch
from torch import nn

from ofs_scale.optim.settings import OptimSettings

# Attributes the layer factory sets on TP-split weights (read by parallel.tp, checkpoints, Muon).
TP_ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride")


def fp32_copy(p: nn.Parameter) -> nn.Parameter:
    """An fp32 parameter with the value and tensor-parallel attributes of `p`."""
    m = nn.Parameter(p.detach().float().clone(), requires_grad=p.requires_grad)
    for attr in TP_ATTRS:
        if hasattr(p, attr):
            setattr(m, attr, getattr(p, attr))
    return m


class MasterWeights:
    """fp32 masters of named model parameters; build it before the model is cast to bf16 so
    the masters start from the exact fp32 initialisation."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]) -> None:
        self.model = [p for _, p in named]
        self.named = [(n, fp32_copy(p)) for n, p in named]
        self.by_name = dict(self.named)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Round the masters into the model weights (bf16)."""
        if self.model:
            torch._foreach_copy_(self.model, [m for _, m in self.named])

    def nbytes(self) -> int:
        """Bytes the masters hold."""
        return sum(m.numel() * m.element_size() for _, m in self.named)


class WrappingOptimizer:
    """Base of the optimizers that run a registered one, `self.inner`, and then bring the model
    weights up to date (`sync_model`): its groups, its state, and `step`."""

    inner: torch.optim.Optimizer

    @property
    def param_groups(self) -> list[dict]:
        """The inner optimizer's groups (the trainer sets `lr` here); same layout on all ranks."""
        return self.inner.param_groups

    @torch.no_grad()
    def step(self) -> None:
        """The inner update, then the model weights from its result."""
        self.inner.step()
        self.sync_model()

    def sync_model(self) -> None:
        """Bring the model weights up to date with what the inner optimizer updated."""
        raise NotImplementedError

    def named_state(self) -> dict[str, dict]:
        """The inner optimizer's state by parameter name."""
        return self.inner.named_state()


class MasterOptimizer(WrappingOptimizer):
    """An optimizer (`inner_cls(named, cfg, **inner_kwargs)`) over fp32 masters of `named`,
    copying the result into the model weights after every step (no DP sharding)."""

    def __init__(
        self,
        named: list[tuple[str, nn.Parameter]],
        cfg: OptimSettings,
        inner_cls: type,
        inner_kwargs: dict | None = None,
    ) -> None:
        self.master = MasterWeights(named)
        self.inner = inner_cls(self.master.named, cfg, **(inner_kwargs or {}))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the masters' gradients."""
        self.inner.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def sync_model(self) -> None:
        """Model weights from the masters (after a step, or a checkpoint loaded the masters)."""
        self.master.copy_to_model()
