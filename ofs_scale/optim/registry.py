"""Every optimizer, defined once: one `OptimizerSpec` per `optim.name`.

An entry carries everything the rest of the code asks about an optimizer: the class
(`build_optimizer`, `ShardedOptimizer`), the defaults of the fields that depend on the name
(`config.OptimConfig`), the state size per parameter (memory planner), the ownership cost (ZeRO-1
balancing), the settings a checkpoint of its state depends on (fingerprint) and whether DeepSpeed
ZeRO may run it (config checks). Nothing else branches on an optimizer name: a new optimizer is a
class plus one entry here.

The registries (this one, `model.blocks.BLOCKS`, `model.norms.NORMS`) are leaves that
ofs_scale.config reads for its allowed names and defaults. So this module and the optimizer
implementations import nothing from ofs_scale.config: they type against
`optim.settings.OptimSettings`, which `OptimConfig` satisfies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ofs_scale.optim.adamw import NamedAdamW
from ofs_scale.optim.muon import Muon
from ofs_scale.optim.settings import OptimSettings
from ofs_scale.optim.shampoo import Shampoo
from ofs_scale.optim.soap import SOAP


@dataclass(frozen=True)
class OptimizerSpec:
    """What the code needs to know about one optimizer."""

    cls: type
    """Built as `cls(named_params, cfg)`; has `cost(shape, cfg)` and `state_numel(shape, cfg)`."""
    title: str
    """Name in messages and docs."""
    defaults: dict[str, Any]
    """Values of lr, betas, eps and weight_decay when the config leaves them unset."""
    fingerprint: tuple[str, ...] = ()
    """Config keys (`section.field`) that a checkpoint of its state depends on, beyond
    optim.name: a resume with other values stops instead of loading the wrong state."""
    deepspeed: bool = False
    """DeepSpeed ZeRO may run it (elementwise state survives flat partitions)."""
    tp_group: bool = False
    """Built as `cls(named, cfg, tp_group=...)` under TP > 1: its update of a TP-split matrix
    communicates over the TP group (Muon orthogonalises whole matrices)."""

    by_name: bool = False
    """Routes tensors by name (Muon: embeddings and head to AdamW): `cls.state_numel` takes
    the parameter name as a third argument."""

    def state_numel(self, shape: tuple[int, ...], cfg: OptimSettings, name: str = "") -> int:
        """fp32 state elements (step counter included) of one tensor of `shape` (named `name`,
        for optimizers whose state depends on it)."""
        if self.by_name:
            return self.cls.state_numel(shape, cfg, name)
        return self.cls.state_numel(shape, cfg)

    def cost(self, shape: tuple[int, ...], cfg: OptimSettings) -> float:
        """Relative compute cost of one tensor's update, which ZeRO-1 ownership balances."""
        return self.cls.cost(shape, cfg)


# The SOAP paper's settings (Vyas et al., 2024); Shampoo shares them.
SOAP_DEFAULTS: dict[str, Any] = {
    "lr": 3e-3,
    "betas": (0.95, 0.95),
    "eps": 1e-8,
    "weight_decay": 0.01,
}
# SOAP/Shampoo factors belong to one TP shard of a weight: they reshard over DP only.
PER_TP_SHARD = ("parallel.tp",)

OPTIMIZER_SPECS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec(
        NamedAdamW,
        "AdamW",
        {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1},
        deepspeed=True,
    ),
    # by_name: the vocabulary matrices' state depends on optim.vocab_precondition
    "soap": OptimizerSpec(
        SOAP,
        "SOAP",
        SOAP_DEFAULTS,
        fingerprint=(*PER_TP_SHARD, "optim.vocab_precondition"),
        by_name=True,
    ),
    "shampoo": OptimizerSpec(Shampoo, "Shampoo", SOAP_DEFAULTS, fingerprint=PER_TP_SHARD),
    # Moonlight's update-RMS matching makes AdamW's lr and weight decay transfer: AdamW's defaults.
    "muon": OptimizerSpec(
        Muon,
        "Muon",
        {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1},
        fingerprint=("optim.muon_adamw",),
        tp_group=True,
        by_name=True,
    ),
}

OPTIMIZERS: dict[str, type] = {name: spec.cls for name, spec in OPTIMIZER_SPECS.items()}
# Defaults of the fields that depend on optim.name. A value set in YAML or an override always wins
# (also one equal to another optimizer's default); null, or not setting it, takes these.
OPTIM_DEFAULTS: dict[str, dict[str, Any]] = {
    name: spec.defaults for name, spec in OPTIMIZER_SPECS.items()
}
