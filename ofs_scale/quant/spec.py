"""What to quantise and how: one small value object shared by the evaluation and the tables."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class QuantSpec:
    """What to quantise and how."""

    weights: Literal["none", "tensor", "channel"] = "tensor"
    """Symmetric int8 weights per tensor or per output channel, or fp (`none`)."""
    acts: Literal["none", "static", "dynamic"] = "static"
    """Asymmetric int8 activations: calibrated per-tensor range, per-token range, or fp."""
    scope: Literal["linear", "all"] = "linear"
    """`linear`: linear-layer inputs; `all`: also residual sums and attention probabilities."""
    head: bool = True
    """Quantise the unembedding (the output projection to the vocabulary) too."""

    def with_sides(self, weights: bool, acts: bool) -> QuantSpec:
        """This spec with weight and/or activation quantisation switched off."""
        return dataclasses.replace(
            self,
            weights=self.weights if weights else "none",
            acts=self.acts if acts else "none",
        )
