"""Corpus -> sentencepiece tokenizer -> memmap token shards -> deterministic DP sampler."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ofs_scale.data.corpus import Corpus, DataError, read_corpus
from ofs_scale.data.sampler import BatchSampler, collate, eval_micro_batches
from ofs_scale.data.shards import TokenSplit, build_shards, open_split
from ofs_scale.data.tokenizer import corpus_hash, load_or_train_tokenizer

__all__ = [
    "BatchSampler",
    "Corpus",
    "DataError",
    "PreparedData",
    "TokenSplit",
    "collate",
    "eval_micro_batches",
    "open_data",
    "prepare_data",
    "read_corpus",
]


@dataclass
class PreparedData:
    """Where the tokenizer and shards of a corpus live."""

    tokenizer_path: Path
    data_dir: Path
    vocab_size: int


def prepare_data(
    corpus_spec: str,
    vocab_size: int,
    cache_dir: str | Path,
    val_fraction: float = 0.02,
    shard_tokens: int = 1 << 26,
    max_files: int = 0,
    show_progress: bool = True,
) -> PreparedData:
    """Read the corpus, train or reuse the tokenizer, tokenize into shards (all cached)."""
    corpus = read_corpus(corpus_spec, max_files)
    digest = corpus_hash(corpus)
    sp, tok_path = load_or_train_tokenizer(corpus, vocab_size, Path(cache_dir), digest)
    data_dir = build_shards(
        corpus, sp, tok_path, Path(cache_dir), val_fraction, shard_tokens, digest, show_progress
    )
    return PreparedData(tok_path, data_dir, sp.get_piece_size())


def open_data(prepared: PreparedData, seq_len: int) -> tuple[TokenSplit, TokenSplit]:
    """Train and validation windows of `seq_len` tokens."""
    return open_split(prepared.data_dir, "train", seq_len), open_split(
        prepared.data_dir, "val", seq_len
    )
