"""Which sequences of a metric step are measured: a fixed set of positions of the global batch.

The set depends on neither the data-parallel size, nor tensor or pipeline parallelism, nor the
micro-batch size, so the metrics computed from it do not either (docs/metrics.md, "Measured
sequences").
"""

from __future__ import annotations

import torch


def measured_positions(global_batch: int, sequences: int) -> torch.Tensor:
    """Positions in the global batch of the measured sequences: `sequences` of them evenly spaced,
    `i * global_batch // sequences` for i < sequences (every sequence when `sequences` is 0 or at
    least the global batch). They depend on neither the layout nor the micro-batch size."""
    n = global_batch if sequences <= 0 else min(sequences, global_batch)
    return torch.arange(n, dtype=torch.int64) * global_batch // n


def measured_rows(
    global_batch: int, micro_batch: int, dp_size: int, dp_rank: int, sequences: int
) -> list[torch.Tensor]:
    """Per micro batch of this DP rank, the rows (sequence indices) to measure.

    Relies on the sampler's contract: DP rank r holds the r-th contiguous part of the global
    batch, split in order into micro batches of `micro_batch` sequences.
    """
    per_rank = global_batch // dp_size
    local = measured_positions(global_batch, sequences) - dp_rank * per_rank
    local = local[(local >= 0) & (local < per_rank)]
    return [
        local[(local >= m) & (local < m + micro_batch)] - m for m in range(0, per_rank, micro_batch)
    ]
