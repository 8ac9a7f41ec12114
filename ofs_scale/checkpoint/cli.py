"""`ofs-scale ckpt`: list a run's checkpoints, or verify them against their recorded checksums.

ofs-scale ckpt list RUN_DIR_OR_CHECKPOINTS_DIR
ofs-scale ckpt verify PATH [PATH ...]     a checkpoint, a checkpoints/ directory or a run directory

`verify` reads every file of every checkpoint it is given (one process, about 5 GB/s of crc32)
and exits 1 when any is incomplete, truncated or changed since it was saved.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ofs_scale.checkpoint.integrity import DCP_METADATA, LATEST, META, read_meta, verify_dir
from ofs_scale.cli_args import command_parser


def checkpoint_dirs(path: Path) -> list[Path]:
    """The checkpoint directories `path` names: itself, or those under it (or its checkpoints/)."""
    if (path / META).is_file() or (path / DCP_METADATA).is_file():
        return [path]
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(p for p in found if p.name != LATEST)


def describe(path: Path) -> str:
    """Step and health of one checkpoint, from its ofs_meta.json."""
    try:
        meta = read_meta(path)
    except (OSError, ValueError):
        return "no readable ofs_meta.json"
    health = {True: "healthy", False: "UNHEALTHY"}.get(meta.get("healthy"), "health unknown")
    sums = "checksums" if "files" in meta else "no checksums"
    return f"step {meta.get('step')}, {health}, {sums}"


def main(argv: list[str] | None = None) -> int:
    """Run `ofs-scale ckpt list|verify`; exit status 1 when a verified checkpoint is bad."""
    parser = command_parser("ckpt", __doc__)
    parser.add_argument("action", choices=["list", "verify"])
    parser.add_argument("paths", nargs="+", type=Path)
    args = parser.parse_args(argv)
    bad = 0
    for path in args.paths:
        dirs = checkpoint_dirs(path)
        if not dirs:
            print(f"{path}: no checkpoints found (pass a run, checkpoints/ or checkpoint dir)")
            bad += 1
        for d in dirs:
            if args.action == "list":
                print(f"{d}: {describe(d)}")
                continue
            problem = verify_dir(d)
            bad += problem is not None
            print(f"{d}: {'OK' if problem is None else 'BAD'} ({problem or describe(d)})")
    return 1 if bad and args.action == "verify" else 0


if __name__ == "__main__":
    sys.exit(main())
