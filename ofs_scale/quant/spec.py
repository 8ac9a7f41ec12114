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
    wfmt: Literal["int8", "int4", "e4m3", "e5m2"] = "int8"
    """Weight format: int8, int4 (symmetric, per group), FP8 E4M3 or E5M2 (per-tensor scale,
    or per output channel with `weights=channel`)."""
    afmt: Literal["int8", "e4m3", "e5m2"] = "int8"
    """Activation format: asymmetric uint8, or FP8 scaled by the absolute maximum of the
    calibrated range (`acts=static`, per tensor) or of each token (`acts=dynamic`)."""
    group_size: int = 128
    """INT4 weights: input features per scale (0: one scale per tensor or output channel)."""

    def with_formats(self, wfmt: str, afmt: str) -> QuantSpec:
        """This spec with the given weight and activation formats."""
        return dataclasses.replace(self, wfmt=wfmt, afmt=afmt)

    def with_sides(self, weights: bool, acts: bool) -> QuantSpec:
        """This spec with weight and/or activation quantisation switched off."""
        return dataclasses.replace(
            self,
            weights=self.weights if weights else "none",
            acts=self.acts if acts else "none",
        )
