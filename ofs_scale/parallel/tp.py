"""Tensor-parallel facts about tensors: whether a parameter is split over the TP group, along
which dim, whether its gradient is summed over TP (sequence parallelism), and the vocabulary
padding that lets every TP size split the embedding evenly.

Split parameters carry megatron-core's attributes (`tensor_model_parallel`, `partition_dim`,
`sequence_parallel`), set by the layer factory in `model/layers.py`; everything else reads
them through here.
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


def mark_sequence_parallel(p: torch.Tensor) -> None:
    """Mark a replicated parameter applied to the sequence-split residual stream (megatron-core's
    `sequence_parallel` attribute): each TP rank's gradient covers its part of the sequence only,
    so the gradients are summed over TP once per step."""
    p.sequence_parallel = True


def is_sequence_parallel(p: torch.Tensor) -> bool:
    """Whether a parameter's gradient is to be summed over TP (see `mark_sequence_parallel`)."""
    return bool(getattr(p, "sequence_parallel", False))
