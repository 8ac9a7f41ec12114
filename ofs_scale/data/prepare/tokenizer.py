"""The tokenizer of a prepared dataset: a sentencepiece BPE model trained on a bounded sample of
the input, or an existing sentencepiece `.model` given by path.

The sample is drawn from every part of the input in proportion to its size on disk: the first
documents of each file up to its share of `sample_bytes`, so it stays bounded however large the
corpus, and sentencepiece shuffles the sampled lines (seeded) before training.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm

from ofs_scale.data.corpus import DataError
from ofs_scale.data.prepare.sources import Source, read_documents

MIN_VOCAB = 320  # 256 byte pieces + special pieces + merges (config/checks.py says the same)
_MAX_LINE = 4096  # long lines are cut so that sentencepiece keeps them


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sample_lines(parts: list[list[Source]], sample_bytes: int, text_key: str) -> Iterator[str]:
    """Non-empty lines of a sample of about `sample_bytes` of text, spread over all parts."""
    sizes = [sum(max(Path(s.path).stat().st_size, 1) for s in part) for part in parts]
    total = sum(sizes) or 1
    for part, size in zip(parts, sizes):
        budget = max(sample_bytes * size // total, 1)
        taken = 0
        for source in part:
            for text, _problem in read_documents(source, text_key):
                if not text:
                    continue
                for line in text.splitlines():
                    if line.strip():
                        taken += len(line)
                        yield line[:_MAX_LINE]
                if taken >= budget:
                    break
            if taken >= budget:
                break


def _vocab_advice(vocab_size: int, message: str) -> str:
    match = re.search(r"<=\s*(\d+)", message)
    if match and int(match.group(1)) >= MIN_VOCAB:
        return f"lower --vocab-size to at most {match.group(1)} or give more text"
    return (
        f"give more text (or a larger --sample-bytes): a {vocab_size}-piece vocabulary needs more "
        f"than this sample, and the vocabulary cannot go below {MIN_VOCAB}"
    )


def train_tokenizer(
    lines: Iterator[str], vocab_size: int, out_path: Path, seed: int = 0
) -> spm.SentencePieceProcessor:
    """Train a BPE model with byte fallback on `lines`; write it atomically to `out_path`."""
    if vocab_size < MIN_VOCAB:
        raise DataError(f"--vocab-size must be at least {MIN_VOCAB}, got {vocab_size}")
    buf = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines,
            model_writer=buf,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=0.995,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1,
            bos_id=-1,
            eos_id=1,
            unk_id=0,
            pad_id=-1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(
            f"sentencepiece could not train a {vocab_size}-piece vocabulary on the sample ({e}); "
            + _vocab_advice(vocab_size, str(e))
        ) from e
    write_atomic(out_path, buf.getvalue())
    return spm.SentencePieceProcessor(model_file=str(out_path))


def load_tokenizer(path: str | Path) -> spm.SentencePieceProcessor:
    """An existing sentencepiece model; one without an end-of-sequence piece is refused."""
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise DataError(
            f"--tokenizer {path} is not a readable sentencepiece .model ({e}); "
            "give the path of a sentencepiece model file"
        ) from e
    if sp.eos_id() < 0:
        raise DataError(
            f"--tokenizer {path} has no end-of-sequence piece (eos_id = -1), which marks the end "
            "of every document; use a model trained with eos_id set"
        )
    return sp


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary name and a rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def tokenizer_entry(sp: spm.SentencePieceProcessor, model_path: Path) -> dict:
    """The manifest's "tokenizer" object for a model stored inside the dataset directory."""
    return {
        "kind": "sentencepiece",
        "model": model_path.name,
        "sha256": sha256_file(model_path),
        "vocab_size": sp.get_piece_size(),
        "eod_id": sp.eos_id(),
    }
