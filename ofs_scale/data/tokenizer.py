"""Train (or reuse from the cache) a sentencepiece BPE tokenizer with byte fallback."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import sentencepiece as spm
from filelock import FileLock

from ofs_scale.data.corpus import Corpus, DataError

# Documents are split into lines for training; long lines are cut so sentencepiece keeps them.
_MAX_LINE = 4096


def corpus_hash(corpus: Corpus) -> str:
    """Content hash of the documents (names and texts)."""
    h = hashlib.blake2b(digest_size=16)
    for name, text in corpus.docs:
        h.update(name.encode())
        h.update(b"\0")
        h.update(text.encode())
        h.update(b"\1")
    return h.hexdigest()


def _sentences(corpus: Corpus):
    for _, text in corpus.docs:
        for line in text.splitlines():
            if line.strip():
                yield line[:_MAX_LINE]


def load_or_train_tokenizer(
    corpus: Corpus, vocab_size: int, cache_dir: Path, content_hash: str | None = None
) -> tuple[spm.SentencePieceProcessor, Path]:
    """Return the tokenizer for `corpus`, training it once per (content, vocab size)."""
    key = f"{content_hash or corpus_hash(corpus)}-v{vocab_size}"
    out = Path(cache_dir).expanduser() / "tokenizers" / key
    model_path = out / "tokenizer.model"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not model_path.exists():
            buf = io.BytesIO()
            try:
                spm.SentencePieceTrainer.train(
                    sentence_iterator=_sentences(corpus),
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
                    f"sentencepiece could not train a {vocab_size}-piece vocabulary on this corpus "
                    f"({e}); lower data.vocab_size or give more text"
                ) from e
            out.mkdir(parents=True, exist_ok=True)
            tmp = model_path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(buf.getvalue())
            os.replace(tmp, model_path)
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    return sp, model_path
