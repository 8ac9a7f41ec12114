"""Collapse metrics: dead MLP units and vanishing norm gains.

On metric steps (`metrics.every`) `CollapseCallback` adds to the step record:

* `collapse/dead_frac/mlp_XX`: fraction of the hidden units of layer XX's MLP that are never
  positive over the measured sequences of the step (`metrics.sequences` of the global batch at
  fixed positions, as for the OF metrics: the same under any layout). The hidden width is split
  over TP ranks, so the counts are summed over TP; a unit counts as alive if it fires on any DP
  rank; layers of other pipeline stages are summed in.
* `collapse/gamma_small_frac/<norm>`: fraction of a norm's gains with |gamma| < 1e-2, the
  collapse attractor of BN + ReLU (psBN's post-shift keeps ReLU alive there). `<norm>` is the
  module path, e.g. `layers.0.norm2`, `final_norm`. Gains are replicated over TP and DP.

Shapes: F MLP hidden units on this TP rank.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ofs_scale.instruments.of_metrics import step_rows
from ofs_scale.model.recompute import recomputing
from ofs_scale.trainer.callbacks import Callback, TrainerView

GAMMA_SMALL = 1e-2


def alive_units(h: torch.Tensor) -> torch.Tensor:
    """Bool per hidden unit (last dim): positive for at least one token."""
    return (h.detach() > 0).reshape(-1, h.shape[-1]).any(0)


def dead_fraction(h: torch.Tensor) -> float:
    """Fraction of hidden units (last dim) never positive over every token of `h`."""
    alive = alive_units(h)
    return int((~alive).sum()) / alive.numel()


def gamma_small_fractions(model: nn.Module, threshold: float = GAMMA_SMALL) -> dict[str, float]:
    """Fraction of |gain| < threshold for every norm module with a 1-D `weight` gain."""
    out = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if "Norm" in type(m).__name__ and isinstance(w, nn.Parameter) and w.ndim == 1:
            out[name] = int((w.detach().abs() < threshold).sum()) / w.numel()
    return out


class CollapseCallback(Callback):
    """Dead-unit and small-gain fractions on metric steps (see the module docstring)."""

    def __init__(self) -> None:
        self.alive: dict[int, torch.Tensor] = {}
        self.calls: dict[int, int] = {}
        self.rows: list[torch.Tensor] = []
        self.handles: list[Any] = []

    def _hook(self, layer: int):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if not torch.is_grad_enabled() or recomputing() or output.device.type == "meta":
                return
            call = self.calls[layer] = self.calls.get(layer, 0) + 1
            if call > len(self.rows) or self.rows[call - 1].numel() == 0:
                return
            # detached first: indexing a tensor that needs grad would save the index for autograd
            alive = alive_units(output.detach()[self.rows[call - 1].to(output.device)])
            self.alive[layer] = alive | self.alive[layer] if layer in self.alive else alive

        return hook

    def pre_step(self, trainer: TrainerView, step: int) -> None:
        every = trainer.cfg.metrics.every
        if not every or step % every:
            return
        self.alive, self.calls, self.rows = {}, {}, step_rows(trainer)
        for chunk in trainer.engine.chunks:
            for key, block in chunk.layers.items():
                self.handles.append(block.mlp.hidden.register_forward_hook(self._hook(int(key))))

    def post_step(self, trainer: TrainerView, step: int, record: dict[str, Any]) -> None:
        if not self.handles:
            return
        for h in self.handles:
            h.remove()
        self.handles = []
        record.update(self.reduce(trainer))

    def reduce(self, trainer: TrainerView) -> dict[str, float]:
        """Combine this rank's captured activations and gains with every other rank's."""
        m = trainer.mesh
        num_layers = trainer.cfg.model.n_layers
        owned = sorted(int(k) for chunk in trainer.engine.chunks for k in chunk.layers)
        widths = [self._width(trainer, i) for i in owned]
        alive = torch.cat(
            [
                self.alive[i].to(torch.int32)
                if i in self.alive
                else torch.zeros(w, dtype=torch.int32, device=m.device)
                for i, w in zip(owned, widths)
            ]
        )
        if m.dp > 1:
            # A unit is alive if it fires on any DP rank's part of the measured sequences.
            dist.all_reduce(alive, op=dist.ReduceOp.MAX, group=m.dp_group)
        counts = torch.zeros(2 * num_layers, dtype=torch.float64, device=m.device)
        for i, part in zip(owned, alive.split(widths)):  # DP-reduced: every DP rank counts
            counts[2 * i] = float(part.numel() - int(part.sum()))
            counts[2 * i + 1] = float(part.numel())
        if m.tp > 1:
            dist.all_reduce(counts, group=m.tp_group)
        if m.pp > 1:
            dist.all_reduce(counts, group=m.pp_group)
        out: dict[str, float] = {}
        for i in range(num_layers):
            if counts[2 * i + 1] > 0:
                out[f"collapse/dead_frac/mlp_{i:02d}"] = float(counts[2 * i] / counts[2 * i + 1])
        gammas: dict[str, float] = {}
        for chunk in trainer.engine.chunks:
            gammas.update(gamma_small_fractions(chunk))
        if m.pp > 1:
            parts: list[Any] = [None] * m.pp
            dist.all_gather_object(parts, gammas, group=m.pp_group)
            gammas = {k: v for part in parts for k, v in part.items()}
        out.update({f"collapse/gamma_small_frac/{k}": v for k, v in sorted(gammas.items())})
        self.alive = {}
        return out

    @staticmethod
    def _width(trainer: TrainerView, layer: int) -> int:
        for chunk in trainer.engine.chunks:
            if str(layer) in chunk.layers:
                up = chunk.layers[str(layer)].mlp.up
                return int(up.weight.shape[0])
        raise KeyError(layer)
