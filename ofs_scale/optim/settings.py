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
    precond_precision: str
    shampoo_beta: float | None
    start_preconditioning_step: int
    soap_mode: str
    vocab_precondition: str
    shampoo_mode: str
    shampoo_epsilon: float
    muon_momentum: float
    muon_nesterov: bool
    ns_steps: int
    ns_coeffs: tuple[float, float, float]
    muon_update_rms: float
    muon_adamw: list[str]
    shard: bool | None
