"""Tensor-parallel facts about tensors: whether a parameter is split over the TP group, along
which dim, and the vocabulary padding that lets every TP size split the embedding evenly.

Split parameters carry megatron-core's attributes (`tensor_model_parallel`, `partition_dim`),
set by the layer factory in `model/layers.py`; everything else reads them through here.
"""

from __future__ import annotations

import math

import torch

VOCAB_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Vocabulary padded to a multiple of 128 (and of tp), the same for every tp dividing 128."""
    multiple = math.lcm(VOCAB_MULTIPLE, tp)
    return math.ceil(vocab_size / multiple) * multiple


def is_tp_sharded(p: torch.Tensor) -> bool:
    """Whether a parameter is split over the tensor-parallel group."""
    return bool(getattr(p, "tensor_model_parallel", False))


def tp_partition_dim(p: torch.Tensor) -> int:
    """The dim a TP-split parameter is split along (-1 when it is not split)."""
    return int(getattr(p, "partition_dim", -1))
