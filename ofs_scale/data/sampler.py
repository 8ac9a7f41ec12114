"""Deterministic, resumable, data-parallel batch sampling over fixed-length token windows.

Global batch g of the run is a slice of a permutation of all windows, drawn per epoch from
(seed, epoch); data-parallel rank r takes the r-th contiguous part of it and splits that into
micro batches. The only state is the number of global batches consumed, so a run resumes exactly
and the same global batches are seen under any data-parallel size.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ofs_scale.data.corpus import DataError
from ofs_scale.data.shards import TokenSplit


class BatchSampler:
    """Hands this data-parallel rank its micro batches of each global batch."""

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
    ) -> None:
        if num_samples < global_batch:
            raise DataError(
                f"the training split has {num_samples} sequences, fewer than one global batch "
                f"({global_batch}); lower train.global_batch or data.seq_len, or add text"
            )
        if global_batch % (micro_batch * dp_size):
            raise DataError(f"global_batch {global_batch} not divisible by {micro_batch}*{dp_size}")
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.step = 0
        self.batches_per_epoch = num_samples // global_batch

    @lru_cache(maxsize=2)  # noqa: B019 - a sampler lives for the whole run
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def global_batch_ids(self, step: int) -> np.ndarray:
        """Sample ids of global batch `step` (all ranks)."""
        epoch, pos = divmod(step, self.batches_per_epoch)
        perm = self._permutation(epoch)
        return perm[pos * self.global_batch : (pos + 1) * self.global_batch]

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
        return {"step": self.step, "num_samples": self.num_samples, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_samples"]) != self.num_samples or int(state["seed"]) != self.seed:
            raise DataError(
                f"checkpoint sampler was for {state['num_samples']} sequences and seed "
                f"{state['seed']}, this run has {self.num_samples} and {self.seed}: the data or "
                "data.seq_len changed; resume with the same data settings or use a new run.out_dir"
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


def collate(split: TokenSplit, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, both (batch, seq_len) int64."""
    rows = np.stack([split.window(int(i)) for i in ids])
    t = torch.from_numpy(rows)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()
