"""Read a text corpus into named documents: the stdlib default, a directory, a glob, .txt or .jsonl.

Unreadable, empty and non-UTF-8 files are skipped and counted; a corpus with nothing usable stops
with a message that says what was found.
"""

from __future__ import annotations

import glob
import json
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
_TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst"}


class DataError(ValueError):
    """A corpus or data file is unusable; the message names it and the fix."""


@dataclass
class Corpus:
    """Documents as (name, text) pairs in a deterministic order, plus what was skipped."""

    docs: list[tuple[str, str]]
    skipped: dict[str, int] = field(default_factory=dict)
    source: str = ""

    @property
    def num_chars(self) -> int:
        return sum(len(t) for _, t in self.docs)


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
        "point it at your text (.txt, .jsonl with a 'text' field, or a folder of files)"
    )


def _read_jsonl(path: Path, skipped: dict[str, int]) -> list[tuple[str, str]]:
    docs = []
    with path.open("rb") as f:
        for i, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(
                    f"{path}:{i}: not a JSON line ({e}); fix or remove that line"
                ) from e
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise DataError(f"{path}:{i}: each JSON line needs a string field 'text'")
            if rec["text"].strip():
                docs.append((f"{path.name}:{i}", rec["text"]))
            else:
                skipped["empty"] = skipped.get("empty", 0) + 1
    return docs


def read_corpus(spec: str, max_files: int = 0) -> Corpus:
    """Read every usable document named by `spec` (see module docstring)."""
    files = _list_files(spec)
    if max_files:
        files = files[:max_files]
    skipped: dict[str, int] = {}
    docs: list[tuple[str, str]] = []
    base = stdlib_root() if spec == "stdlib" else None
    for path in files:
        if path.suffix == ".jsonl":
            docs.extend(_read_jsonl(path, skipped))
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped["not utf-8"] = skipped.get("not utf-8", 0) + 1
            continue
        except OSError:
            skipped["unreadable"] = skipped.get("unreadable", 0) + 1
            continue
        if not text.strip():
            skipped["empty"] = skipped.get("empty", 0) + 1
            continue
        name = str(path.relative_to(base)) if base else str(path)
        docs.append((name, text))
    if not docs:
        found = f"{len(files)} file(s)" + (f", skipped {skipped}" if skipped else "")
        raise DataError(
            f"data.corpus={spec!r} has no usable text ({found}); "
            "give UTF-8 text files, a .txt, or a .jsonl with a 'text' field"
        )
    return Corpus(docs=docs, skipped=skipped, source=spec)
