"""Regional `torch.compile` (`train.compile`): each transformer block compiled on its own.

Compiling block by block instead of the whole model keeps compile time to about one block (the
blocks share their code, so the compiled graph is reused), leaves the embedding, head and
pipeline split untouched, and lets activation checkpointing wrap a compiled block like an eager
one.

The blocks stay the registered modules (parameter names and checkpoints do not change); the
compiled callables sit beside them in `GPT.compiled`. Forward hooks are the catch: the OF metric
and collapse hooks run Python with side effects (dict updates, the `recomputing()` check,
data-dependent medians), which a compiled region would either break into pieces or bake in.
Those hooks exist only on metric steps, so a block that has a hook on itself or on any module
inside it runs eagerly for that forward pass: the metrics are those of the eager model, and
every other step runs compiled.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules import module as nn_module

DEFAULT_BACKEND = "inductor"
"""The compiler of `train.compile`; tests pass `aot_eager` (the same graphs, no C++ build)."""


def has_hooks(block: nn.Module) -> bool:
    """Whether a forward (pre-)hook would run inside `block`: on it, on a submodule, or global."""
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in block.modules())


def compiled_forwards(
    layers: nn.ModuleDict, backend: str = DEFAULT_BACKEND
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """A compiled forward per block of `layers`, by the same keys."""
    return {key: torch.compile(block.forward, backend=backend) for key, block in layers.items()}


def block_runner(
    block: nn.Module, compiled: Callable[[torch.Tensor], torch.Tensor] | None, x: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """What runs `block` on `x`: its compiled forward, or the module itself when there is none,
    when a hook is attached (metric steps) or for meta-device shape inference."""
    if compiled is None or x.device.type == "meta" or has_hooks(block):
        return block
    return compiled
