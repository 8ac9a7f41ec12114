"""Whether a checkpoint directory is usable: complete, not truncated, and the same bytes that were
saved (a crc32 and size per file, recorded in `ofs_meta.json` at save time).

crc32 (zlib) reads at about 5 GB/s on one core, so the checksums cost a small fraction of the
save itself; the files are split over the ranks that wrote them, each hashing its share.
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# torch.distributed.checkpoint is imported where DCP files are read or DCP errors caught, so
# `ofs-scale ckpt --help` and the checksum code load without torch

META = "ofs_meta.json"
LATEST = "latest"
SHARDS = "shards"
DCP_METADATA = ".metadata"
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used or written; the message names it and what to do."""


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ofs_meta.json of a checkpoint."""
    return json.loads((Path(path) / META).read_text())


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` so that a reader sees the old or the new file, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_complete(path: Path) -> bool:
    """Both metadata files are there (the save reached its end)."""
    return (path / META).is_file() and (path / DCP_METADATA).is_file()


def incompleteness(path: Path) -> str | None:
    """Which metadata file a checkpoint directory lacks, and the likely reason; None if neither."""
    if not path.is_dir():
        return "missing or not a directory"
    if not (path / DCP_METADATA).is_file():
        return (
            f"incomplete: {DCP_METADATA} is missing (was it copied by a tool that skips "
            "dotfiles? copy it again with `cp -a` or `rsync -a`)"
        )
    if not (path / META).is_file():
        return f"incomplete: {META} is missing (the save did not finish)"
    return None


def truncation_problem(path: Path) -> str | None:
    """A reason why the checkpoint at `path` is unusable, or None (checks sizes, not contents)."""
    if problem := incompleteness(path):
        return problem
    try:
        from torch.distributed.checkpoint import FileSystemReader

        meta = read_meta(path)
        md = FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        return f"unreadable metadata ({type(e).__name__}: {e})"
    needed: dict[str, int] = {}
    for info in md.storage_data.values():
        needed[info.relative_path] = max(
            needed.get(info.relative_path, 0), info.offset + info.length
        )
    for rel, end in needed.items():
        f = path / rel
        if not f.is_file() or f.stat().st_size < end:
            return f"{rel} is missing or truncated"
    if "step" not in meta:
        return f"{META} has no step"
    return None


def file_crc32(path: Path) -> str:
    """crc32 of a file's bytes, as 8 hex digits."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def saved_files(root: Path) -> list[str]:
    """Every file of a checkpoint directory but its ofs_meta.json, relative and sorted."""
    found = (p for p in root.rglob("*") if p.is_file() and p.name != META)
    return sorted(str(p.relative_to(root)) for p in found)


def checksums(root: Path, files: list[str]) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "crc32"}} of `files` under `root`."""
    return {
        rel: {"size": (root / rel).stat().st_size, "crc32": file_crc32(root / rel)} for rel in files
    }


def mismatches(root: Path, recorded: dict[str, dict[str, Any]], files: list[str]) -> list[str]:
    """The files among `files` whose bytes differ from `recorded` (size or crc32), described.

    A missing callback shard-state file (under `shards/`) is not a problem of the checkpoint:
    the model and optimizer are whole, and the callback restarts its state with a message
    (`load_shard_state`). A shard-state file that is present must still match."""
    out = []
    for rel in files:
        f, want = root / rel, recorded[rel]
        if not f.is_file():
            if not rel.startswith(f"{SHARDS}/"):
                out.append(f"{rel} is missing")
        elif f.stat().st_size != want["size"]:
            out.append(f"{rel} has {f.stat().st_size} bytes, {want['size']} were saved")
        elif file_crc32(f) != want["crc32"]:
            out.append(f"{rel} changed since it was saved (crc32 mismatch)")
    return out


def verify_dir(path: Path) -> str | None:
    """Every check of one checkpoint directory in this process: complete, not truncated, and
    every recorded checksum matches. None when usable; otherwise the first problem."""
    if problem := truncation_problem(path):
        return problem
    recorded = read_meta(path).get("files")
    if recorded is None:
        return None  # written before checksums were recorded: sizes were checked above
    bad = mismatches(path, recorded, sorted(recorded))
    return "; ".join(bad) or None


def root_cause(e: BaseException) -> str:
    """The first error DCP collected from a rank (or `e` itself), as `Type: message`."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    return f"{type(e).__name__}: {str(e)[:300]}"


@contextlib.contextmanager
def write_errors(name: str, tmp: Path) -> Iterator[None]:
    """Turn a failed write into a CheckpointError naming the checkpoint and the fix."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException
        raise CheckpointError(
            f"writing checkpoint {name} into {tmp} failed ({root_cause(e)}); the previous "
            f"checkpoints are intact; free disk space or fix permissions of {tmp.parent}, "
            "then resume"
        ) from e
