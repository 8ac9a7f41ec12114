"""The base of our hand-written optimizers: parameters known by name, state checkpointed by name.

Both SOAP/Shampoo (`soap.MatrixOptimizer`) and Muon build on it: one param group per weight
decay class (`adamw.param_groups`), the config kept as `cfg`, and `named_state`, which
materialises every parameter's state (zeros where the optimizer has not stepped yet) so that a
checkpoint loads into it in place.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ofs_scale.optim.adamw import param_groups
from ofs_scale.optim.settings import OptimSettings

StateDict = dict[str, torch.Tensor]


class NamedStateOptimizer(torch.optim.Optimizer):
    """A torch optimizer over named parameters; subclasses define `_init_state` and `step`."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], cfg: OptimSettings) -> None:
        defaults = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps, "weight_decay": 0.0}
        super().__init__(param_groups(named, cfg.weight_decay), defaults)
        self.cfg = cfg
        self.names = {p: n for n, p in named}

    def _init_state(self, p: torch.Tensor, st: StateDict) -> None:
        """Create the state of parameter `p` in the empty dict `st`."""
        raise NotImplementedError

    def _with_grads(
        self, closure: Any, who: str
    ) -> Iterator[tuple[torch.Tensor, StateDict, dict[str, Any]]]:
        """(parameter, its state, its group) for every parameter with a gradient, in group
        order, creating state on first use; `step` implementations loop over this."""
        if closure is not None:
            raise ValueError(f"closures are not supported by {who}; call step() after backward")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    self._init_state(p, st)
                yield p, st, group

    def named_state(self) -> dict[str, StateDict]:
        """State by parameter name, materialised (zeros) where not yet created."""
        out = {}
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    self._init_state(p, st)
                out[self.names[p]] = st
        return out
