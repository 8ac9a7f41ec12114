"""Learning rate over the stages of a run: each stage has warmup plus its own schedule."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ofs_scale.config import StageConfig


def stage_at(step: int, stages: list[StageConfig]) -> tuple[int, int]:
    """(stage index, step within that stage) of global step `step` (0-based)."""
    for i, s in enumerate(stages):
        if step < s.steps:
            return i, step
        step -= s.steps
    raise IndexError("step beyond the last stage")


def lr_at(step: int, stages: list[StageConfig], base_lr: float) -> float:
    """Learning rate for global step `step` (0-based)."""
    i, t = stage_at(step, stages)
    s = stages[i]
    if t < s.warmup_steps:
        return base_lr * (t + 1) / s.warmup_steps
    frac = (t - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    low = base_lr * s.min_lr_ratio
    if s.lr_schedule == "constant":
        return base_lr
    if s.lr_schedule == "warmup":
        return base_lr * (t + 1) / s.steps
    if s.lr_schedule == "cosine":
        return low + (base_lr - low) * 0.5 * (1 + math.cos(math.pi * frac))
    return base_lr - (base_lr - low) * frac
