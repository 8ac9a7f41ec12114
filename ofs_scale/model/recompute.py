"""Activation checkpointing of whole blocks (`train.activation_checkpointing`).

A checkpointed block keeps only its input during the forward pass and runs its forward again
inside the backward pass to rebuild what the gradients need (torch.utils.checkpoint, the
non-reentrant variant: autocast state and the CPU/CUDA RNG state are replayed). The second
forward must not repeat side effects, so code with any checks `recomputing()`:

* metric and collapse hooks (they would count the micro batch twice),
* psBN running statistics (they would move twice per micro batch),
* the batchless auxiliary-loss sum and data-dependent init.

Collectives inside a block (TP all-reduces, psBN's DP statistics) run again in the same order on
every rank, so recomputation is exact under every layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_depth = 0


def recomputing() -> bool:
    """True while a checkpointed block's forward is being run again for the backward pass."""
    return _depth > 0


@contextmanager
def _recompute_scope() -> Iterator[None]:
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def _contexts():
    return nullcontext(), _recompute_scope()


def checkpointed(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`block(x)`, keeping only `x` for the backward pass."""
    return checkpoint(block, x, use_reentrant=False, context_fn=_contexts)


def saved_activation_bytes(model: nn.Module, forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the non-parameter tensors autograd keeps from `forward()` (a forward pass of
    `model`) for the backward pass, each storage counted once: what activation checkpointing
    reduces. Runs the backward pass too."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    out.float().sum().backward()  # runs the recomputation, whose saves are freed right away
    return sum(kept.values())
