"""What every engine shares: the micro-batch type, the autocast context and the chunk view."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


def autocast_context(dtype: str, device: torch.device):
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class ChunkView(nn.Module):
    """Several pipeline chunks of one rank seen as one module (their names do not overlap)."""

    def __init__(self, chunks: list[nn.Module]) -> None:
        super().__init__()
        self._chunks = chunks

    def named_parameters(self, *args, **kwargs):
        for c in self._chunks:
            yield from c.named_parameters(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        out = {}
        for c in self._chunks:
            out.update(c.state_dict(*args, **kwargs))
        return out
