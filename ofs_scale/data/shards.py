"""Tokenize a corpus once into uint16/uint32 memmap shards with a by-file validation split.

Layout of a data directory (cached by content hash):
    meta.json                 dtype, vocab size, eos id, tokens per shard, split sizes
    train_000.bin ...         flat token streams, documents separated by eos
    val_000.bin ...
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ofs_scale.data.corpus import Corpus, DataError

_FORMAT_VERSION = 1


def split_docs(corpus: Corpus, val_fraction: float) -> tuple[list[int], list[int]]:
    """Deterministic by-file split: a document is held out when the hash of its name says so."""
    threshold = int(val_fraction * 10_000)
    train, val = [], []
    for i, (name, _) in enumerate(corpus.docs):
        h = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
        (val if h % 10_000 < threshold else train).append(i)
    if val_fraction > 0 and len(corpus.docs) >= 2:
        if not val:  # always hold out at least one file
            val.append(train.pop())
        if not train:
            train.append(val.pop())
    return train, val


def _write_split(
    sp, corpus: Corpus, ids: list[int], prefix: Path, dtype, shard_tokens: int, progress, task
) -> list[int]:
    """Encode documents `ids` into shards `prefix_NNN.bin`; return tokens per shard."""
    eos = sp.eos_id()
    sizes: list[int] = []
    buf: list[np.ndarray] = []
    filled = 0

    def flush():
        nonlocal buf, filled
        if filled:
            arr = np.concatenate(buf).astype(dtype)
            arr.tofile(f"{prefix}_{len(sizes):03d}.bin")
            sizes.append(len(arr))
        buf, filled = [], 0

    chunk = 64
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        encoded = sp.encode([corpus.docs[i][1] for i in part], num_threads=os.cpu_count() or 1)
        for toks in encoded:
            toks = np.asarray([*toks, eos], dtype=np.int64)
            while len(toks):
                take = min(len(toks), shard_tokens - filled)
                buf.append(toks[:take])
                filled += take
                toks = toks[take:]
                if filled == shard_tokens:
                    flush()
        progress.advance(task, len(part))
    flush()
    return sizes


def build_shards(
    corpus: Corpus,
    sp,
    tokenizer_path: Path,
    cache_dir: Path,
    val_fraction: float,
    shard_tokens: int,
    content_hash: str,
    show_progress: bool = True,
) -> Path:
    """Return the data directory for this corpus and tokenizer, tokenizing it if not cached."""
    vocab = sp.get_piece_size()
    tok_hash = hashlib.blake2b(Path(tokenizer_path).read_bytes(), digest_size=8).hexdigest()
    key = f"{content_hash}-{tok_hash}-val{val_fraction}-s{shard_tokens}-f{_FORMAT_VERSION}"
    out = Path(cache_dir).expanduser() / "shards" / key
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "meta.json").exists():
            return out
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
        train_ids, val_ids = split_docs(corpus, val_fraction)
        columns = [
            TextColumn("tokenizing {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, disable=not show_progress, transient=True) as progress:
            sizes = {}
            for split, ids in (("train", train_ids), ("val", val_ids)):
                task = progress.add_task(f"{split} files", total=len(ids))
                sizes[split] = _write_split(
                    sp, corpus, ids, tmp / split, dtype, shard_tokens, progress, task
                )
        meta = {
            "format": _FORMAT_VERSION,
            "dtype": np.dtype(dtype).name,
            "vocab_size": vocab,
            "eos_id": sp.eos_id(),
            "shards": sizes,
            "docs": {"train": len(train_ids), "val": len(val_ids)},
            "skipped": corpus.skipped,
            "source": corpus.source,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        os.replace(tmp, out)
    return out


@dataclass
class TokenSplit:
    """Memory-mapped token shards of one split, served as fixed-length windows."""

    shards: list[np.memmap]
    seq_len: int

    def __post_init__(self) -> None:
        # Non-overlapping windows of seq_len+1 tokens (inputs and shifted targets) per shard.
        per = [max(0, (len(s) - 1) // self.seq_len) for s in self.shards]
        self.offsets = np.cumsum([0, *per])

    @property
    def num_samples(self) -> int:
        return int(self.offsets[-1])

    def window(self, idx: int) -> np.ndarray:
        shard = int(np.searchsorted(self.offsets, idx, side="right") - 1)
        start = (idx - int(self.offsets[shard])) * self.seq_len
        return np.asarray(self.shards[shard][start : start + self.seq_len + 1], dtype=np.int64)


def open_split(data_dir: Path, split: str, seq_len: int) -> TokenSplit:
    """Open the shards of `split` ('train' or 'val') as windows of `seq_len`."""
    meta_path = Path(data_dir) / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{meta_path}: unreadable ({e}); delete {data_dir} to rebuild it") from e
    shards = []
    for i, n in enumerate(meta["shards"][split]):
        path = Path(data_dir) / f"{split}_{i:03d}.bin"
        if not path.exists() or path.stat().st_size != n * np.dtype(meta["dtype"]).itemsize:
            raise DataError(f"{path}: missing or truncated; delete {data_dir} to rebuild it")
        shards.append(np.memmap(path, dtype=meta["dtype"], mode="r", shape=(n,)))
    out = TokenSplit(shards, seq_len)
    if out.num_samples == 0:
        raise DataError(
            f"the {split} split has fewer than {seq_len + 1} tokens; lower data.seq_len, "
            "raise data.val_fraction, or give a larger corpus"
        )
    return out
