"""AdamW with its state addressed by parameter name (for checkpoints that reshard)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ofs_scale.optim.settings import OptimSettings


def no_decay(name: str, p: torch.Tensor) -> bool:
    """Gains, biases and scalars (beta) get no weight decay."""
    return p.ndim < 2


def numel_cost(shape: tuple[int, ...], cfg: OptimSettings) -> float:
    """Cost of an elementwise optimizer (AdamW): one unit per element."""
    return float(math.prod(shape))


def param_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    decay = [p for n, p in named if not no_decay(n, p)]
    rest = [p for n, p in named if no_decay(n, p)]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]


class NamedAdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose state is read and written by parameter name."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], cfg: OptimSettings) -> None:
        super().__init__(
            param_groups(named, cfg.weight_decay),
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.eps,
            foreach=True,
        )
        self.names = {p: n for n, p in named}

    cost = staticmethod(numel_cost)

    @staticmethod
    def state_numel(shape: tuple[int, ...], cfg: OptimSettings) -> int:
        """fp32 state elements of one parameter: the two moments and the step counter."""
        return 2 * math.prod(shape) + 1

    def named_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """State tensors by parameter name, created (zeros) if not yet there, so that a
        checkpoint can be loaded into them in place."""
        out = {}
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                out[self.names[p]] = st
        return out
