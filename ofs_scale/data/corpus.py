"""What `data.corpus` names: the stdlib default, a directory, a glob or one file, as a sorted file
list (the small-corpus path keys its cache on it; `ofs_scale.data.prepare` reads the files)."""

from __future__ import annotations

import glob
import sysconfig
from pathlib import Path

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
_TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".jsonl"}


class DataError(ValueError):
    """A corpus or data file is unusable; the message names it and the fix."""


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[Path]:
    root = stdlib_root()
    return sorted(
        p
        for p in root.rglob("*.py")
        if not (_SKIP_DIRS & set(p.relative_to(root).parts[:-1])) and p.is_file()
    )


def list_files(spec: str, max_files: int = 0) -> list[Path]:
    """The files `spec` names ('stdlib', a directory, a file or a glob), sorted; the first
    `max_files` if set."""
    files = _list_files(spec)
    return files[:max_files] if max_files else files


def _list_files(spec: str) -> list[Path]:
    if spec == "stdlib":
        return _stdlib_files()
    path = Path(spec).expanduser()
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _TEXT_SUFFIXES)
    if path.is_file():
        return [path]
    if any(c in spec for c in "*?["):
        return sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    raise DataError(
        f"data.corpus={spec!r} is neither 'stdlib', a directory, a file nor a glob; "
        "point it at your text (.txt, .jsonl with a 'text' field, or a folder of files), or "
        "prepare it with `ofs-scale prepare` and name the result in data.datasets"
    )
