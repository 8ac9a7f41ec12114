"""Prepared datasets: a directory of megatron-core indexed parts (.bin/.idx) plus manifest.json.

Layout (written by `ofs-scale prepare`, or by megatron-core's IndexedDatasetBuilder + a manifest):
    manifest.json                   format, tokenizer (kind, model, sha256, vocab_size, eod_id),
                                    dtype, parts [{prefix, documents, tokens, ...}], totals
    tokenizer.model                 the sentencepiece model that made the tokens
    part_00000.bin / .idx ...       one megatron-core indexed dataset per input shard

Every document ends with the end-of-document token, so a part's .bin file is the token stream of
its documents with EOD between them. Opening reads the manifest and memory-maps each part's .idx
(megatron-core's IndexedDataset; only its header and last entry are touched); windows are read
from the .bin with pread. Time and memory do not depend on the number of tokens. (A memory map of
the .bin would do too, but every random window then maps the kernel's readahead into the
process: with 8 MB readahead, ~0.7 MB of resident memory per window of a batch.)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ofs_scale.data.corpus import DataError

FORMAT = "ofs_scale-indexed-v1"
MANIFEST = "manifest.json"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (a tokenizer model: a few hundred KB)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_manifest(path: str | Path) -> dict:
    """The manifest of the prepared dataset at `path`, or a DataError naming what is missing."""
    root = Path(path).expanduser()
    prepare = f"prepare it with `ofs-scale prepare INPUT... --out {root}`"
    if not root.is_dir():
        raise DataError(f"prepared dataset {root} does not exist; {prepare} or fix data.datasets")
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        raise DataError(
            f"{root} has no {MANIFEST} (an unfinished or foreign preparation); {prepare}"
        ) from None
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{root / MANIFEST}: unreadable ({e}); {prepare}") from e
    if manifest.get("format") != FORMAT:
        raise DataError(
            f"{root / MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT!r}; {prepare}"
        )
    if not manifest.get("complete", True):
        raise DataError(
            f"{root}: preparation unfinished (the manifest lists only the parts done so far); "
            "run the same `ofs-scale prepare` command again, it resumes"
        )
    return manifest


def write_manifest(
    out_dir: str | Path,
    parts: list[dict],
    tokenizer_model: str | Path,
    vocab_size: int,
    eod_id: int,
    sources: list[str],
    created_by: str,
) -> dict:
    """Write `manifest.json` (atomically) for parts already written into `out_dir`; the tokenizer
    model is copied next to them. Returns the manifest."""
    out = Path(out_dir)
    model_bytes = Path(tokenizer_model).read_bytes()
    if Path(tokenizer_model).resolve() != (out / "tokenizer.model").resolve():
        (out / "tokenizer.model").write_bytes(model_bytes)
    manifest = {
        "format": FORMAT,
        "tokenizer": {
            "kind": "sentencepiece",
            "model": "tokenizer.model",
            "sha256": hashlib.sha256(model_bytes).hexdigest(),
            "vocab_size": int(vocab_size),
            "eod_id": int(eod_id),
        },
        "dtype": "uint16" if vocab_size < 65500 else "int32",
        "parts": parts,
        "documents": sum(p["documents"] for p in parts),
        "tokens": sum(p["tokens"] for p in parts),
        "sources": sources,
        "created_by": created_by,
    }
    tmp = out / f".{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest


class TokenFile:
    """A part's token stream (its .bin file): length and positioned reads, no memory map."""

    def __init__(self, path: Path, dtype: np.dtype, num_tokens: int) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.num_tokens = num_tokens

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start + count) as int64."""
        # Opened per read (microseconds): no descriptor is held, so thousands of parts never
        # exhaust the process's limit and forked workers share nothing.
        fd = os.open(self.path, os.O_RDONLY)
        try:
            raw = os.pread(fd, count * self.dtype.itemsize, start * self.dtype.itemsize)
        finally:
            os.close(fd)
        return np.frombuffer(raw, dtype=self.dtype).astype(np.int64)


@dataclass
class PreparedDataset:
    """One prepared dataset opened for reading: each part's token stream."""

    path: Path
    manifest: dict
    streams: list[TokenFile]

    @property
    def tokenizer(self) -> dict:
        return self.manifest["tokenizer"]

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.streams)

    def num_windows(self, seq_len: int) -> np.ndarray:
        """Non-overlapping windows of seq_len+1 tokens (inputs and shifted targets) per part."""
        return np.array([max(0, (len(s) - 1) // seq_len) for s in self.streams], dtype=np.int64)


def _open_part(root: Path, part: dict) -> TokenFile:
    """One part's .bin, checked against its .idx (header and last pointer) and the manifest."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = root / part["prefix"]
    for suffix in (".bin", ".idx"):
        if not prefix.with_suffix(suffix).is_file():
            raise DataError(
                f"{prefix}{suffix} is missing (listed in {root / MANIFEST}); prepare {root} again"
            )
    try:
        index = IndexedDataset(str(prefix)).index
    except (AssertionError, ValueError, OSError) as e:
        raise DataError(f"{prefix}.idx: unreadable ({e}); prepare {root} again") from e
    dtype = np.dtype(index.dtype)
    n_seq = len(index.sequence_lengths)
    n_bytes = (
        int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * dtype.itemsize
        if n_seq
        else 0
    )
    size = prefix.with_suffix(".bin").stat().st_size
    if size != n_bytes or n_bytes // dtype.itemsize != int(part["tokens"]):
        raise DataError(
            f"{prefix}.bin holds {size} bytes, its .idx and the manifest say "
            f"{n_bytes} bytes / {part['tokens']} tokens (truncated?); prepare {root} again"
        )
    return TokenFile(prefix.with_suffix(".bin"), dtype, n_bytes // dtype.itemsize)


def open_prepared(path: str | Path) -> PreparedDataset:
    """Open the prepared dataset at `path` (see the module docstring); O(parts), reads no tokens."""
    root = Path(path).expanduser()
    manifest = read_manifest(root)
    streams = [_open_part(root, part) for part in manifest["parts"]]
    return PreparedDataset(root, manifest, streams)


def check_tokenizers(
    datasets: list[PreparedDataset], vocab_size: int, tokenizer: str | Path | None = None
) -> None:
    """Refuse datasets whose tokenizer differs from the run's: `tokenizer` (a .model path) when
    given, else the first dataset's, and whose vocabulary differs from `data.vocab_size`."""
    want = sha256_file(tokenizer) if tokenizer else datasets[0].tokenizer["sha256"]
    want_name = f"data.tokenizer={tokenizer}" if tokenizer else f"{datasets[0].path}'s"
    for ds in datasets:
        tok = ds.tokenizer
        if tok["vocab_size"] != vocab_size:
            raise DataError(
                f"{ds.path} was tokenized with a {tok['vocab_size']}-piece vocabulary, but the "
                f"model has data.vocab_size={vocab_size}; set data.vocab_size={tok['vocab_size']} "
                "or prepare the data again with the run's tokenizer"
            )
        if tok["sha256"] != want:
            raise DataError(
                f"{ds.path} was made by tokenizer sha256 {tok['sha256'][:12]}..., the run uses "
                f"{want_name} tokenizer sha256 {want[:12]}...: the token ids mean different "
                f"pieces; prepare it again with `ofs-scale prepare ... --tokenizer "
                f"{tokenizer or datasets[0].path / 'tokenizer.model'}`"
            )
