"""Prepared indexed datasets (or data.corpus prepared into the cache) -> blend -> DP sampler.

`open_data(cfg.data, rank, seed)` is the one way a run gets its data: it opens the datasets that
`data.datasets` names, or prepares `data.corpus` on rank 0 into `data.cache_dir` (the other ranks
wait) and opens that, checks tokenizers and vocabularies, and returns the training and validation
window streams. Opening memory-maps; it reads no tokens and builds nothing the size of the data.
The sampler (torch) is imported on first use, so `ofs-scale prepare --help` imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ofs_scale.data.blend import BlendedWindows
from ofs_scale.data.corpus import DataError
from ofs_scale.data.indexed import PreparedDataset, check_tokenizers, open_prepared
from ofs_scale.data.small import prepare_corpus

if TYPE_CHECKING:
    from ofs_scale.config.schema import DataConfig
    from ofs_scale.data.sampler import BatchSampler, collate, eval_micro_batches

__all__ = [
    "BatchSampler",
    "BlendedWindows",
    "DataError",
    "RunData",
    "check_datasets",
    "collate",
    "eval_micro_batches",
    "open_data",
    "prepare_corpus",
]


def __getattr__(name: str) -> Any:
    if name in ("BatchSampler", "collate", "eval_micro_batches"):
        from ofs_scale.data import sampler

        return getattr(sampler, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class RunData:
    """What a run trains and evaluates on."""

    train: BlendedWindows
    val: BlendedWindows
    vocab_size: int
    datasets: list[PreparedDataset]


def check_datasets(d: DataConfig) -> list[PreparedDataset]:
    """Open `data.datasets` and check them against the run's tokenizer and vocabulary (named
    errors for a missing dataset, manifest or part, and for a mismatch). Cheap: the dry run
    calls it."""
    datasets = [open_prepared(spec.path) for spec in d.datasets]
    if datasets:
        check_tokenizers(datasets, d.vocab_size, d.tokenizer or None)
    return datasets


def open_data(d: DataConfig, rank: int, seed: int, progress: bool = True) -> RunData:
    """The run's data (see the module docstring). Collective when `data.datasets` is empty and a
    process group exists: every rank must call it."""
    import torch.distributed as dist

    weights = [spec.weight for spec in d.datasets]
    if not d.datasets:
        path: Path | None = None
        if rank == 0:
            path = prepare_corpus(d.corpus, d.vocab_size, d.cache_dir, d.max_files, progress)
        if dist.is_initialized():
            dist.barrier()
        if path is None:
            path = prepare_corpus(d.corpus, d.vocab_size, d.cache_dir, d.max_files, False)
        datasets = [open_prepared(path)]
        weights = [1.0]
        check_tokenizers(datasets, d.vocab_size, d.tokenizer or None)
    else:
        datasets = check_datasets(d)
    args = (datasets, weights, d.seq_len, d.val_fraction)
    return RunData(
        train=BlendedWindows(*args, split="train", seed=seed),
        val=BlendedWindows(*args, split="val", seed=seed),
        vocab_size=d.vocab_size,
        datasets=datasets,
    )
