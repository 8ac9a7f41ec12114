"""Input files of a preparation: which files the inputs name, how they group into output parts,
and a streaming reader of documents for each format.

Formats, by file name: `.jsonl`, `.jsonl.gz`, `.jsonl.zst` (one JSON object per line, the text
under `text_key`), `.parquet` (a string column `text_key`), `.arrow` (a Hugging Face `datasets`
dataset saved with `save_to_disk`: its directory is recognised by `state.json` or
`dataset_dict.json`), and anything else is plain text, one document per file. Readers hold one
line or one record batch at a time. A malformed record (bad JSON, text missing or not a string,
bytes that are not UTF-8) is yielded as a problem string `"file:line: reason"` so that the writer
skips and counts it; a file that cannot be read at all raises `DataError` naming it and the fix.
"""

from __future__ import annotations

import glob
import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ofs_scale.data.corpus import DataError, _stdlib_files

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst"}  # plain-text files picked up inside directories
# Plain-text files (one document each) are grouped into parts of about this many bytes.
TEXT_PART_BYTES = 64 << 20
_BATCH_ROWS = 1024

# A record: (text, None) or (None, "file:line: why it was skipped").
Record = tuple[str | None, str | None]


@dataclass(frozen=True)
class Source:
    """One input file and its format: `jsonl`, `parquet`, `arrow` or `text`."""

    path: str
    kind: str


def kind_of(path: Path) -> str:
    """The format of one input file, from its name."""
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    return "text"


def _hf_arrow_files(root: Path) -> list[Path]:
    """The .arrow files of a `save_to_disk` directory (a Dataset or a DatasetDict)."""
    if (root / "dataset_dict.json").is_file():
        splits = json.loads((root / "dataset_dict.json").read_text())["splits"]
        return [f for split in splits for f in _hf_arrow_files(root / split)]
    state = json.loads((root / "state.json").read_text())
    return [root / entry["filename"] for entry in state["_data_files"]]


def _from_directory(root: Path) -> list[Source]:
    if (root / "state.json").is_file() or (root / "dataset_dict.json").is_file():
        try:
            return [Source(str(p), "arrow") for p in _hf_arrow_files(root)]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(
                f"{root}: looks like a Hugging Face dataset saved with save_to_disk, but its "
                f"state.json / dataset_dict.json cannot be read ({e}); save it again"
            ) from e
    found = []
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        kind = kind_of(p)
        if kind != "text" or p.suffix in TEXT_SUFFIXES:
            found.append(Source(str(p), kind))
    if not found:
        raise DataError(
            f"input directory {root} holds no .jsonl(.gz/.zst), .parquet, .arrow or text "
            f"({', '.join(sorted(TEXT_SUFFIXES))}) files; point the input at your data"
        )
    return found


def list_sources(inputs: list[str]) -> list[Source]:
    """Every input file named by `inputs` (files, directories, globs, or "stdlib"), in order:
    inputs as given, each directory or glob sorted; a file named twice is read once."""
    sources: list[Source] = []
    for spec in inputs:
        if spec == "stdlib":
            sources += [Source(str(p), "text") for p in _stdlib_files()]
            continue
        path = Path(spec).expanduser()
        if any(c in spec for c in "*?[") and not path.exists():
            matches = sorted(glob.glob(str(path), recursive=True))
            if not matches:
                raise DataError(f"input glob {spec!r} matches no file; check the pattern")
            paths = [Path(m) for m in matches]
        elif path.exists():
            paths = [path]
        else:
            raise DataError(
                f"input {spec!r} does not exist; give files, directories or globs of "
                ".jsonl(.gz/.zst), .parquet, text, a save_to_disk dataset, or 'stdlib'"
            )
        for p in paths:
            p = p.absolute()
            sources += _from_directory(p) if p.is_dir() else [Source(str(p), kind_of(p))]
    seen: set[str] = set()
    return [s for s in sources if not (s.path in seen or seen.add(s.path))]


def plan_parts(sources: list[Source]) -> list[list[Source]]:
    """Group sources into output parts: one per jsonl / parquet / arrow file; consecutive
    plain-text files (one document each) share a part of about TEXT_PART_BYTES."""
    parts: list[list[Source]] = []
    size = 0
    for src in sources:
        if src.kind != "text":
            parts.append([src])
            continue
        nbytes = Path(src.path).stat().st_size if Path(src.path).exists() else 0
        if parts and parts[-1][0].kind == "text" and size + nbytes <= TEXT_PART_BYTES:
            parts[-1].append(src)
            size += nbytes
        else:
            parts.append([src])
            size = nbytes
    return parts


def _unreadable(path: str, e: BaseException) -> DataError:
    if isinstance(e, FileNotFoundError):
        fix = "it was removed after listing; restore it or leave it out of the inputs"
    elif isinstance(e, PermissionError):
        fix = "make it readable (chmod) or leave it out of the inputs"
    else:
        fix = "the file is corrupt or truncated: download it again or leave it out of the inputs"
    return DataError(f"cannot read input file {path}: {type(e).__name__}: {e}; {fix}")


def _zst_lines(path: str) -> Iterator[bytes]:
    """Lines of a zstandard file (any number of frames). zstandard's stream reader ends
    silently on a truncated frame, so frames are decoded here and a cut one raises."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    dobj, in_frame, pending = dctx.decompressobj(), False, b""
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            while block:
                pending += dobj.decompress(block)
                in_frame = not dobj.eof
                block = b"" if in_frame else dobj.unused_data
                if not in_frame:
                    dobj = dctx.decompressobj()
            *lines, pending = pending.split(b"\n")
            yield from lines
    if in_frame:
        raise zstandard.ZstdError("the last frame is truncated")
    if pending:
        yield pending


def _lines(path: str) -> Iterator[bytes]:
    if path.endswith(".zst"):
        yield from _zst_lines(path)
        return
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
        yield from f


def _jsonl(path: str, key: str) -> Iterator[Record]:
    for i, raw in enumerate(_lines(path), 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except UnicodeDecodeError:
            yield None, f"{path}:{i}: not UTF-8"
            continue
        except ValueError as e:
            yield None, f"{path}:{i}: not a JSON line ({e})"
            continue
        text = rec.get(key) if isinstance(rec, dict) else None
        if isinstance(text, str):
            yield text, None
        else:
            yield None, f"{path}:{i}: no string field {key!r}"


def _column_batches(path: str, kind: str, key: str) -> Iterator:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == "parquet":
        pf = pq.ParquetFile(path)
        schema, batches = pf.schema_arrow, pf.iter_batches(_BATCH_ROWS, columns=[key])
    else:
        reader = pa.ipc.open_stream(pa.memory_map(path))
        schema, batches = reader.schema, reader
    if key not in schema.names:
        raise DataError(
            f"{path} has no column {key!r} (columns: {', '.join(schema.names)}); "
            "name the text column with --text-key"
        )
    for batch in batches:
        yield batch.column(batch.schema.get_field_index(key))


def _columnar(path: str, kind: str, key: str) -> Iterator[Record]:
    row = 0
    for column in _column_batches(path, kind, key):
        for value in column.to_pylist():
            row += 1
            if isinstance(value, str):
                yield value, None
            else:
                yield None, f"{path}:row {row}: {key!r} is {type(value).__name__}, not text"


def _plain(path: str) -> Iterator[Record]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        yield data.decode("utf-8"), None
    except UnicodeDecodeError:
        yield None, f"{path}: not UTF-8"


def read_documents(source: Source, text_key: str = "text") -> Iterator[Record]:
    """Stream the documents of one input file (see the module docstring for the contract)."""
    import zstandard

    try:
        if source.kind == "jsonl":
            yield from _jsonl(source.path, text_key)
        elif source.kind in ("parquet", "arrow"):
            yield from _columnar(source.path, source.kind, text_key)
        else:
            yield from _plain(source.path)
    except DataError:
        raise
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
        raise _unreadable(source.path, e) from e
    except Exception as e:  # pyarrow raises ArrowInvalid & co. for corrupt files
        if type(e).__module__.startswith("pyarrow"):
            raise _unreadable(source.path, e) from e
        raise
