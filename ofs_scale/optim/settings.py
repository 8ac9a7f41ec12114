"""The optimizer settings the optimizers read, as a protocol that `config.OptimConfig` satisfies.

The optimizers type against this instead of importing the config: ofs_scale.config reads the
optimizer registry (names and defaults), so nothing under optim/ that the registry reaches may
import the config back.
"""

from __future__ import annotations

from typing import Protocol


class OptimSettings(Protocol):
    """The `optim` section of a config (after its per-optimizer defaults are filled in)."""

    name: str
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    precondition_frequency: int
    max_precond_dim: int
    shampoo_beta: float | None
    start_preconditioning_step: int
    shard: bool | None
