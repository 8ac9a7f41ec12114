"""The one place that chooses linear and embedding layers: megatron-core tensor-parallel layers.

Model code receives a `ParallelLayers` factory and never reads global parallel state. At TP=1 the
layers are ordinary dense layers; at TP>1 column layers split their outputs and row layers their
inputs over the tensor-parallel group, and the vocabulary is split over it too.

With sequence parallelism (`parallel.sequence_parallel`, TP>1) the activations between the
layers (the residual stream, norms, element-wise work) are split along the sequence over the TP
ranks, [B, T/tp, D] on each: the embedding returns this rank's part, column layers gather the
whole sequence before their matmul and row layers reduce-scatter after it. Megatron-core orders
these tensors [sequence, batch, hidden], so the layers transpose around it (views; the residual
stream is kept in that memory order). With CUDA this is megatron-core's own sequence_parallel
path; on CPU its collectives allocate on CUDA, so plain TP layers with the gather / split of
`parallel/sequence.py` stand in (see there). Replicated parameters applied to the split stream
are marked (`on_sequence_shard`) so that their gradients are summed over TP once per step.

Initialisation always happens on the CPU from torch's default generator on the *full* master
weight (megatron-core's `use_cpu_initialization`), so the same seed gives the same full weights
under any TP size; megatron-core's CUDA RNG tracker is never needed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from ofs_scale.parallel.sequence import gather_sequence, sequence_shard, split_sequence
from ofs_scale.parallel.tp import mark_sequence_parallel

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
    """Output features split over TP; returns the tensor alone. With `seq_split` the input is
    this rank's part of the sequence, [B, t, D], and the output covers the whole sequence."""

    def __init__(self, *args, seq_split: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seq_split = seq_split
        _mark_split(self.weight, 0)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if _cpu_autocast(x):
            return _call_in_autocast_dtype(self, x, weight=weight)
        if not self.seq_split:
            return super().forward(x, weight=weight)[0]
        x_tBD = x.transpose(0, 1)
        if not self.sequence_parallel:  # megatron-core's own gather is CUDA-only
            x_tBD = gather_sequence(x_tBD, self.tp_group)
        elif torch.is_autocast_enabled(x.device.type):
            # Megatron-core's backward reduce-scatters the (autocast, bf16) input gradient into
            # a buffer of the input's dtype: NCCL refuses mixed dtypes, so enter in the autocast
            # dtype (the matmul would cast to it anyway; the gather then moves half the bytes).
            dtype = torch.get_autocast_dtype(x.device.type)
            x_tBD = x_tBD.to(dtype, memory_format=torch.contiguous_format)
        return super().forward(x_tBD.contiguous(), weight=weight)[0].transpose(0, 1)


class RowLinear(RowParallelLinear):
    """Input features split over TP, output all-reduced; returns the tensor alone. With
    `seq_split` the output is reduce-scattered instead: this rank's part of the sequence."""

    def __init__(self, *args, seq_split: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seq_split = seq_split
        _mark_split(self.weight, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _cpu_autocast(x):
            return _call_in_autocast_dtype(self, x)
        if not self.seq_split:
            return super().forward(x)[0]
        y_TBD = super().forward(x.transpose(0, 1))[0]
        if not self.sequence_parallel:  # megatron-core's own reduce-scatter is CUDA-only
            y_TBD = split_sequence(y_TBD, self.tp_group)
        return y_TBD.transpose(0, 1)


class TokenEmbedding(VocabParallelEmbedding):
    """Vocabulary split over TP. With `seq_split` it returns this rank's part of the sequence,
    [B, t, D] (megatron-core reduce-scatters the embeddings; on CPU: all-reduce, then split)."""

    def __init__(self, *args, seq_split: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seq_split = seq_split
        _mark_split(self.weight, 0)

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        x = super().forward(tokens_BT)
        if not self.seq_split:
            return x
        if self.reduce_scatter_embeddings:  # megatron-core returns [t, B, D]
            return x.transpose(0, 1)
        return split_sequence(x.transpose(0, 1), self.tp_group).transpose(0, 1)


class ParallelLayers:
    """Factory for tensor-parallel linear/embedding layers and the vocab-parallel loss."""

    def __init__(
        self,
        tp_group: dist.ProcessGroup,
        params_dtype: torch.dtype = torch.float32,
        perform_initialization: bool = True,
        dp_group: dist.ProcessGroup | None = None,
        sequence_parallel: bool = False,
        cuda: bool = False,
    ) -> None:
        self.tp_group = tp_group
        # Data-parallel group, for norms whose statistics span the global batch (psBN).
        self.dp_group = dp_group
        self.tp = dist.get_world_size(tp_group)
        self.tp_rank = dist.get_rank(tp_group)
        # The residual stream is split along the sequence over TP (see the module docstring).
        self.sequence_parallel = sequence_parallel and self.tp > 1
        self.config = ModelParallelConfig(
            tensor_model_parallel_size=self.tp,
            use_cpu_initialization=True,
            perform_initialization=perform_initialization,
            params_dtype=params_dtype,
            sequence_parallel=self.sequence_parallel and cuda,
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
            seq_split=self.sequence_parallel,
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
            seq_split=self.sequence_parallel,
        )

    def embedding(self, num: int, dim: int, std: float) -> TokenEmbedding:
        """Token embedding with the vocabulary split over TP (output: this rank's part of the
        sequence under sequence parallelism)."""
        return TokenEmbedding(
            num,
            dim,
            init_method=normal_init(std),
            reduce_scatter_embeddings=self.config.sequence_parallel,
            config=self.config,
            tp_group=self.tp_group,
            seq_split=self.sequence_parallel,
        )

    def local_positions(self, length: int) -> slice:
        """Positions of a `length`-token sequence whose activations this rank holds: all of
        them, or its part under sequence parallelism."""
        if not self.sequence_parallel:
            return slice(0, length)
        return sequence_shard(length, self.tp, self.tp_rank)

    def on_sequence_shard(self, params: Iterable[torch.Tensor]) -> None:
        """Declare replicated parameters applied to the residual stream (norm gains, learned
        positions, OP betas). Under sequence parallelism each TP rank sees only its part of the
        sequence, so their gradients are summed over TP (`parallel.grads`)."""
        if self.sequence_parallel:
            for p in params:
                mark_sequence_parallel(p)

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
        """Per-token loss from vocab-parallel logits (..., V/tp) and targets (...). Logits of a
        sequence-parallel head lie in [T, B] order in memory (a transposed view): the loss is
        taken in that order, without copying them."""
        if (
            logits.dim() == 3
            and not logits.is_contiguous()
            and logits.transpose(0, 1).is_contiguous()
        ):
            loss_TB = vocab_parallel_cross_entropy(
                logits.transpose(0, 1).float(), targets.mT.contiguous()
            )
            return loss_TB.mT
        return vocab_parallel_cross_entropy(logits.float(), targets)
