"""Write one output part (megatron-core's indexed dataset, .bin + .idx) and the manifest.

A part is tokenized in chunks of documents and written by megatron-core's own
`IndexedDatasetBuilder` under temporary names, renamed into place only when complete: a part
killed half-way leaves no `part_*.bin`, and the manifest lists only parts that were renamed.
Every document ends with the tokenizer's end-of-sequence id (EOD), so the concatenated documents
are the token stream with EOD between documents.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ofs_scale.data.prepare.sources import Source, read_documents

FORMAT = "ofs_scale-indexed-v1"
MANIFEST = "manifest.json"
MAX_BAD_RECORDS = 5  # problems kept per part (file and line) for the summary
_CHUNK_CHARS = 1 << 20  # characters of text tokenized per sentencepiece call
_CHUNK_DOCS = 512

# Progress callback: (documents, tokens) written since the last call.
Report = Callable[[int, int], None]


def token_dtype(vocab_size: int) -> type[np.integer]:
    """uint16 while every id fits (below 65500, as Megatron-LM chooses), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def part_prefix(index: int) -> str:
    """The file name prefix of part `index`."""
    return f"part_{index:05d}"


def _tmp_paths(out_dir: Path, prefix: str) -> tuple[Path, Path]:
    return out_dir / f".{prefix}.tmp.bin", out_dir / f".{prefix}.tmp.idx"


def write_part(
    out_dir: Path,
    index: int,
    sources: list[Source],
    sp,
    text_key: str = "text",
    report: Report | None = None,
) -> dict:
    """Tokenize `sources` into part `index` of `out_dir`; returns its manifest entry."""
    with warnings.catch_warnings():  # megatron-core warns about optional CUDA packages
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = part_prefix(index)
    tmp_bin, tmp_idx = _tmp_paths(out_dir, prefix)
    dtype = token_dtype(sp.get_piece_size())
    eod = sp.eos_id()
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
    entry = {
        "prefix": prefix,
        "sources": [s.path for s in sources],
        "documents": 0,
        "tokens": 0,
        "skipped": 0,
        "empty": 0,
        "bad_records": [],
    }
    texts: list[str] = []
    chars = 0

    def flush() -> None:
        nonlocal chars
        tokens = 0
        for ids in sp.encode(texts, num_threads=1):  # parallelism comes from workers
            ids.append(eod)
            builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
            tokens += len(ids)
        entry["documents"] += len(texts)
        entry["tokens"] += tokens
        if report is not None:
            report(len(texts), tokens)
        texts.clear()
        chars = 0

    try:
        for source in sources:
            for text, problem in read_documents(source, text_key):
                if problem is not None:
                    entry["skipped"] += 1
                    if len(entry["bad_records"]) < MAX_BAD_RECORDS:
                        entry["bad_records"].append(problem)
                elif not text.strip():
                    entry["empty"] += 1
                else:
                    texts.append(text)
                    chars += len(text)
                    if chars >= _CHUNK_CHARS or len(texts) >= _CHUNK_DOCS:
                        flush()
        flush()
        builder.finalize(str(tmp_idx))
    except BaseException:
        builder.data_file.close()
        for p in (tmp_bin, tmp_idx):
            p.unlink(missing_ok=True)
        raise
    os.replace(tmp_idx, out_dir / f"{prefix}.idx")
    os.replace(tmp_bin, out_dir / f"{prefix}.bin")
    return entry


def part_files_exist(out_dir: Path, prefix: str) -> bool:
    """Both files of a part are in place."""
    return (out_dir / f"{prefix}.bin").is_file() and (out_dir / f"{prefix}.idx").is_file()


def read_manifest(out_dir: Path) -> dict | None:
    """The manifest of `out_dir`, or None if there is none."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def build_manifest(
    tokenizer: dict, dtype: str, parts: list[dict], sources: list[str], created_by: str, done: bool
) -> dict:
    """The manifest object: parts in index order and the totals over them."""
    return {
        "format": FORMAT,
        "tokenizer": tokenizer,
        "dtype": dtype,
        "parts": sorted(parts, key=lambda p: p["prefix"]),
        "documents": sum(p["documents"] for p in parts),
        "tokens": sum(p["tokens"] for p in parts),
        "sources": sources,
        "created_by": created_by,
        "complete": done,
    }


def write_manifest(out_dir: Path, manifest: dict) -> None:
    """Write the manifest atomically (a temporary file, then a rename)."""
    path = Path(out_dir) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)
