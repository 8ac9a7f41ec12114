"""The small-corpus path: `data.corpus` (default: the standard library) prepared once into the
same indexed-dataset format as `ofs-scale prepare` writes, cached under `data.cache_dir`.

The cache entry is keyed by the corpus spec, the vocabulary size and the sorted file list with
sizes and modification times: a restart stats the files but reads and hashes no text. Rank 0
prepares (`ofs_scale.data.prepare.prepare_dataset`, which resumes an interrupted preparation);
the other ranks wait at a barrier, then all open the result.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from filelock import FileLock

from ofs_scale.data.corpus import DataError, list_files
from ofs_scale.data.indexed import read_manifest


def corpus_key(spec: str, vocab_size: int, max_files: int = 0) -> str:
    """Cache key of a corpus: spec, vocabulary and each file's path, size and mtime (no text)."""
    h = hashlib.blake2b(f"{spec}\0{vocab_size}\0{max_files}".encode(), digest_size=12)
    for path in list_files(spec, max_files):
        st = path.stat()
        h.update(f"\0{path}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def corpus_dataset_dir(spec: str, vocab_size: int, cache_dir: str, max_files: int = 0) -> Path:
    """Where the prepared dataset of this corpus lives in the cache."""
    key = corpus_key(spec, vocab_size, max_files)
    return Path(cache_dir).expanduser() / "datasets" / f"corpus-v{vocab_size}-{key}"


def _prepare(spec: str, vocab_size: int, max_files: int, out: Path, progress: bool) -> None:
    from ofs_scale.data.prepare import prepare_dataset

    inputs = [str(f) for f in list_files(spec, max_files)] if max_files else [spec]
    prepare_dataset(inputs, out, vocab_size=vocab_size, progress=progress)


def prepare_corpus(
    spec: str, vocab_size: int, cache_dir: str, max_files: int = 0, progress: bool = True
) -> Path:
    """The prepared dataset of corpus `spec`, building it into the cache if it is not there
    (one process at a time, under a file lock). Call it on one rank, then barrier."""
    out = corpus_dataset_dir(spec, vocab_size, cache_dir, max_files)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        try:
            read_manifest(out)
        except DataError:  # absent or unfinished: (re)start; prepare_dataset resumes parts
            _prepare(spec, vocab_size, max_files, out, progress)
    return out
