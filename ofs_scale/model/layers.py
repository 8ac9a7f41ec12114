"""The one place that chooses linear and embedding layers: megatron-core tensor-parallel layers.

Model code receives a `ParallelLayers` factory and never reads global parallel state. At TP=1 the
layers are ordinary dense layers; at TP>1 column layers split their outputs and row layers their
inputs over the tensor-parallel group, and the vocabulary is split over it too.

Initialisation always happens on the CPU from torch's default generator on the *full* master
weight (megatron-core's `use_cpu_initialization`), so the same seed gives the same full weights
under any TP size; megatron-core's CUDA RNG tracker is never needed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        copy_to_tensor_model_parallel_region,
        set_tensor_model_parallel_attributes,
        vocab_parallel_cross_entropy,
    )


def normal_init(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def init(w: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(w, mean=0.0, std=std)

    return init


def _mark_split(p: torch.Tensor | None, dim: int) -> None:
    """Megatron-core marks split weights only when it initialises them; mark them always (the
    meta-device build skips initialisation) so checkpoints and counts can rely on it."""
    if p is not None and not hasattr(p, "tensor_model_parallel"):
        set_tensor_model_parallel_attributes(p, True, dim, 1)


def _cpu_autocast(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and torch.is_autocast_enabled("cpu")


def _call_in_autocast_dtype(module: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """Megatron-core's linear autograd functions restore autocast only for CUDA in backward, so
    under CPU autocast they would meet bf16 gradients and fp32 weights. Run the layer with its
    input and parameters cast to the autocast dtype instead (the casts are differentiable, so
    fp32 master weights still receive fp32 gradients)."""
    dtype = torch.get_autocast_dtype("cpu")
    with torch.autocast("cpu", enabled=False):
        params = {n: p.to(dtype) for n, p in module.named_parameters(recurse=False)}
        kwargs = {k: v.to(dtype) for k, v in kwargs.items() if v is not None}
        return torch.func.functional_call(module, params, (x.to(dtype),), kwargs)


class ColumnLinear(ColumnParallelLinear):
    """Output features split over TP; returns the tensor alone."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _mark_split(self.weight, 0)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if _cpu_autocast(x):
            return _call_in_autocast_dtype(self, x, weight=weight)
        return super().forward(x, weight=weight)[0]


class RowLinear(RowParallelLinear):
    """Input features split over TP, output all-reduced; returns the tensor alone."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _mark_split(self.weight, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _cpu_autocast(x):
            return _call_in_autocast_dtype(self, x)
        return super().forward(x)[0]


class ParallelLayers:
    """Factory for tensor-parallel linear/embedding layers and the vocab-parallel loss."""

    def __init__(
        self,
        tp_group: dist.ProcessGroup,
        params_dtype: torch.dtype = torch.float32,
        perform_initialization: bool = True,
        dp_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.tp_group = tp_group
        # Data-parallel group, for norms whose statistics span the global batch (psBN).
        self.dp_group = dp_group
        self.tp = dist.get_world_size(tp_group)
        self.tp_rank = dist.get_rank(tp_group)
        self.config = ModelParallelConfig(
            tensor_model_parallel_size=self.tp,
            use_cpu_initialization=True,
            perform_initialization=perform_initialization,
            params_dtype=params_dtype,
        )

    def column(
        self, d_in: int, d_out: int, bias: bool, std: float, tied: bool = False
    ) -> ColumnLinear:
        """y = x W^T with W's rows (outputs) split over TP; input replicated. With `tied` the
        layer owns no weight and is called with another layer's."""
        return ColumnLinear(
            d_in,
            d_out,
            config=self.config,
            init_method=normal_init(std),
            bias=bias,
            gather_output=False,
            skip_weight_param_allocation=tied,
            tp_group=self.tp_group,
        )

    def row(self, d_in: int, d_out: int, bias: bool, std: float) -> RowLinear:
        """y = x W^T with W's columns (inputs) split over TP; output all-reduced."""
        return RowLinear(
            d_in,
            d_out,
            config=self.config,
            init_method=normal_init(std),
            bias=bias,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=self.tp_group,
        )

    def embedding(self, num: int, dim: int, std: float) -> VocabParallelEmbedding:
        """Token embedding with the vocabulary split over TP."""
        emb = VocabParallelEmbedding(
            num, dim, init_method=normal_init(std), config=self.config, tp_group=self.tp_group
        )
        _mark_split(emb.weight, 0)
        return emb

    def head(self, d_in: int, vocab: int, std: float, tied: bool) -> ColumnLinear:
        """Unembedding producing vocab-parallel logits (tied: called with the embedding's
        weight)."""
        return self.column(d_in, vocab, False, std, tied)

    def replicated(self, t: torch.Tensor) -> torch.Tensor:
        """Identity forward; gradient summed over TP in backward. For a replicated parameter used
        only on this rank's shard of the work (e.g. a QK-norm gain applied to local heads)."""
        if self.tp == 1:
            return t
        return copy_to_tensor_model_parallel_region(t, group=self.tp_group)

    @staticmethod
    def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token loss from vocab-parallel logits (..., V/tp) and targets (...)."""
        return vocab_parallel_cross_entropy(logits.float(), targets)
