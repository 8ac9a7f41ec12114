"""Blends of prepared datasets as one stream of training windows, computed index by index.

Global sample g of a run (g = step * global_batch + position in the batch) is mapped, with no
state and no table over the data, to a dataset and a window:

1. **Blend.** A binary tree over the datasets: at each node sample t goes left iff
   floor((t+1)*w) > floor(t*w), w being the left side's share of the node's weight; it becomes
   sample floor(t*w) of the left side, or t - floor(t*w) of the right. Of the first T samples
   exactly floor(T*w) go left, so every dataset gets its weight's share of every stretch of the
   stream to within one sample per tree level, and the k-th draw of a dataset is known in O(1).
2. **Shuffle.** Draw k of dataset i falls in its epoch k // n (n: its training windows) at
   position k % n, which a keyed Feistel permutation of [0, n) (key: seed, dataset, epoch; cycle
   walking keeps it inside the range) maps to a window. Nothing of size n is ever built, so
   start-up costs the same for 10 million tokens as for 100 billion.

Validation windows are the last `val_fraction` of each dataset's windows (tail of its token
stream), so the split reads nothing; the fixed evaluation windows run through the same blend.
"""

from __future__ import annotations

import zlib
from functools import lru_cache

import numpy as np

from ofs_scale.data.corpus import DataError
from ofs_scale.data.indexed import PreparedDataset

_ROUNDS = 4
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


@lru_cache(maxsize=64)
def _round_keys(seed: int, dataset: int, epoch: int) -> np.ndarray:
    return np.random.SeedSequence([seed, dataset, epoch]).generate_state(_ROUNDS, np.uint64)


def feistel_permute(pos: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """Positions `pos` (each in [0, n)) under a pseudo-random bijection of [0, n) set by `keys`."""
    x = np.asarray(pos, dtype=np.uint64)
    if n <= 1:
        return x.astype(np.int64)
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    todo = np.ones(len(x), dtype=bool)
    while todo.any():  # cycle walking: at most 4 rounds on average (domain < 4n)
        y = x[todo]
        left, right = y >> shift, y & mask
        for key in keys:
            left, right = right, left ^ (_mix(right ^ key) & mask)
        x[todo] = (left << shift) | right
        todo = x >= np.uint64(n)
    return x.astype(np.int64)


def blend(ids: np.ndarray, weights: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(dataset, draw number within that dataset) of global samples `ids` (see module doc)."""
    dataset = np.zeros(len(ids), dtype=np.int64)
    draw = np.asarray(ids, dtype=np.int64).copy()

    def split(lo: int, hi: int, at: np.ndarray) -> None:
        if hi - lo == 1 or not len(at):
            dataset[at] = lo
            return
        mid = (lo + hi) // 2
        w = sum(weights[lo:mid]) / sum(weights[lo:hi])
        t = draw[at].astype(np.float64)
        before = np.floor(t * w)
        left = np.floor((t + 1) * w) > before
        draw[at] = np.where(left, before, t - before).astype(np.int64)
        split(lo, mid, at[left])
        split(mid, hi, at[~left])

    split(0, len(weights), np.arange(len(draw)))
    return dataset, draw


class _Windows:
    """Windows [first, first + count) of one dataset's parts (a contiguous range)."""

    def __init__(self, ds: PreparedDataset, seq_len: int, first: int, count: int) -> None:
        self.streams = ds.streams
        self.seq_len = seq_len
        self.offsets = np.cumsum([0, *ds.num_windows(seq_len)])
        self.first = first
        self.count = count

    def read(self, window: int) -> np.ndarray:
        w = self.first + window
        part = int(np.searchsorted(self.offsets, w, side="right") - 1)
        start = (w - int(self.offsets[part])) * self.seq_len
        return self.streams[part].read(start, self.seq_len + 1)


class BlendedWindows:
    """Training (shuffled, endless) or validation (fixed order) windows of a weighted blend."""

    def __init__(
        self,
        datasets: list[PreparedDataset],
        weights: list[float],
        seq_len: int,
        val_fraction: float,
        split: str,
        seed: int,
    ) -> None:
        self.weights = [float(w) for w in weights]
        self.split = split
        self.seed = seed
        self.parts: list[_Windows] = []
        for ds in datasets:
            total = int(ds.num_windows(seq_len).sum())
            n_val = max(1, int(total * val_fraction)) if val_fraction > 0 else 0
            first, count = (0, total - n_val) if split == "train" else (total - n_val, n_val)
            if count < 1:
                raise DataError(_too_small(ds, seq_len, val_fraction, split, total))
            self.parts.append(_Windows(ds, seq_len, first, count))

    @property
    def num_samples(self) -> int:
        """Windows in this split over all datasets (one pass; the training stream is endless)."""
        return sum(p.count for p in self.parts)

    @property
    def key(self) -> int:
        """A checksum of what defines the stream (window counts, weights, seed, seq_len): a
        checkpoint's sampler refuses to resume on another."""
        desc = repr([(p.count, p.seq_len) for p in self.parts] + self.weights + [self.seed])
        return zlib.crc32(desc.encode())

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dataset, window within its split) of global samples `ids`."""
        which, draw = blend(np.asarray(ids), self.weights)
        window = np.empty(len(draw), dtype=np.int64)
        for i, part in enumerate(self.parts):
            sel = which == i
            if not sel.any():
                continue
            if self.split != "train":
                window[sel] = draw[sel] % part.count
                continue
            epoch, pos = np.divmod(draw[sel], part.count)
            out = np.empty(len(pos), dtype=np.int64)
            for e in np.unique(epoch):
                at = epoch == e
                out[at] = feistel_permute(pos[at], part.count, _round_keys(self.seed, i, int(e)))
            window[sel] = out
        return which, window

    def windows(self, ids: np.ndarray) -> np.ndarray:
        """Token windows (len(ids), seq_len+1) int64 of global samples `ids`."""
        which, window = self.locate(ids)
        return np.stack([self.parts[d].read(int(w)) for d, w in zip(which, window)])


def _too_small(
    ds: PreparedDataset, seq_len: int, val_fraction: float, split: str, total: int
) -> str:
    """The message for a dataset (one small .txt file, say) too short to split in two."""
    tokens = ds.num_tokens
    fits = (tokens - len(ds.streams)) // 2  # the longest seq_len giving two windows
    if split == "val" and val_fraction == 0:
        return (
            f"{ds.path}: data.val_fraction=0 leaves no validation windows, and every stage ends "
            "with an evaluation; set data.val_fraction above 0 (e.g. 0.02)"
        )
    return (
        f"{ds.path}: {tokens:,} tokens make {total} window(s) of data.seq_len+1={seq_len + 1} "
        f"tokens, and the {split} split gets none (the last data.val_fraction={val_fraction} of "
        "the windows, at least one, is validation, the rest training; a single file is split "
        f"the same way); set data.seq_len <= {max(fits, 1)}, or give more text"
    )
