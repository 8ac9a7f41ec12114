"""Deterministic, resumable, data-parallel batch sampling over a stream of training windows.

Global batch g of the run is global samples [g * global_batch, (g + 1) * global_batch) of the
blended window stream (`data.blend.BlendedWindows`, which shuffles and blends index by index);
data-parallel rank r takes the r-th contiguous part of it and splits that into micro batches. The
only state is the number of global batches consumed, so a run resumes exactly and the same global
batches are seen under any data-parallel size and micro-batch split.
"""

from __future__ import annotations

import numpy as np
import torch

from ofs_scale.data.blend import BlendedWindows
from ofs_scale.data.corpus import DataError


class BatchSampler:
    """Hands this data-parallel rank its micro batches (global sample ids) of each global batch.

    `data_key` identifies the stream (`BlendedWindows.key`): a checkpoint taken on another
    stream is refused instead of silently resuming on different data."""

    def __init__(
        self, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int, data_key: int = 0
    ) -> None:
        if global_batch % (micro_batch * dp_size):
            raise DataError(f"global_batch {global_batch} not divisible by {micro_batch}*{dp_size}")
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.data_key = int(data_key)
        self.step = 0

    def global_batch_ids(self, step: int) -> np.ndarray:
        """Sample ids of global batch `step` (all ranks)."""
        return np.arange(step * self.global_batch, (step + 1) * self.global_batch, dtype=np.int64)

    def rank_micro_batches(self, step: int) -> list[np.ndarray]:
        """This rank's micro batches (sample ids) of global batch `step`."""
        ids = self.global_batch_ids(step)
        per_rank = self.global_batch // self.dp_size
        mine = ids[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        return [mine[i : i + self.micro_batch] for i in range(0, per_rank, self.micro_batch)]

    def next(self) -> list[np.ndarray]:
        """Micro batches of the next global batch; advances the state."""
        out = self.rank_micro_batches(self.step)
        self.step += 1
        return out

    def state_dict(self) -> dict:
        """The step and the key of the data stream it counts in."""
        return {"step": self.step, "data_key": self.data_key}

    def load_state_dict(self, state: dict) -> None:
        """Resume at the checkpoint's step; refuse a checkpoint taken on other data."""
        if int(state["data_key"]) != self.data_key:
            raise DataError(
                "the checkpoint's sampler was for other data (datasets, weights, data.seq_len, "
                "data.val_fraction or run.seed changed); resume with the same data settings or "
                "use a new run.out_dir"
            )
        self.step = int(state["step"])


def eval_micro_batches(
    num_samples: int,
    num_global: int,
    global_batch: int,
    micro_batch: int,
    dp_rank: int,
    dp_size: int,
) -> list[np.ndarray]:
    """This rank's micro batches of the fixed evaluation set: num_global*global_batch validation
    windows spread evenly over the split (wrapping if it is smaller), the same under any layout."""
    total = num_global * global_batch
    ids = (np.arange(total) * max(1, num_samples // total)) % num_samples
    mine = ids.reshape(num_global, dp_size, global_batch // dp_size)[:, dp_rank].reshape(-1)
    return [mine[i : i + micro_batch] for i in range(0, len(mine), micro_batch)]


def collate(split: BlendedWindows, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets of samples `ids`, both (batch, seq_len) int64."""
    t = torch.from_numpy(split.windows(ids))
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()
