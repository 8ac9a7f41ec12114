"""Checkpoints: DCP state (`state`), atomic verified saves and resume (`manager`), integrity
checks and checksums (`integrity`), a new run started from a checkpoint (`init`), per-shard
callback state (`shards`), the `ofs-scale ckpt` command (`cli`)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names load from their module on first use, so the light parts (`integrity`, `cli`) import
# without torch.distributed.checkpoint or megatron-core.
_HOME = {
    "load_init": "init",
    "LATEST": "integrity",
    "META": "integrity",
    "SHARDS": "integrity",
    "CheckpointError": "integrity",
    "read_meta": "integrity",
    "truncation_problem": "integrity",
    "verify_dir": "integrity",
    "write_atomic": "integrity",
    "write_errors": "integrity",
    "CheckpointManager": "manager",
    "commit_dir": "manager",
    "load_shard_state": "shards",
    "save_shard_state": "shards",
    "checkpoint_fingerprint": "state",
    "training_state": "state",
    "weights_fingerprint": "state",
}

if TYPE_CHECKING:
    from ofs_scale.checkpoint.init import load_init
    from ofs_scale.checkpoint.integrity import (
        LATEST,
        META,
        SHARDS,
        CheckpointError,
        read_meta,
        truncation_problem,
        verify_dir,
        write_atomic,
        write_errors,
    )
    from ofs_scale.checkpoint.manager import CheckpointManager, commit_dir
    from ofs_scale.checkpoint.shards import load_shard_state, save_shard_state
    from ofs_scale.checkpoint.state import (
        checkpoint_fingerprint,
        training_state,
        weights_fingerprint,
    )


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)


__all__ = [
    "LATEST",
    "META",
    "SHARDS",
    "CheckpointError",
    "CheckpointManager",
    "checkpoint_fingerprint",
    "commit_dir",
    "load_init",
    "load_shard_state",
    "read_meta",
    "save_shard_state",
    "training_state",
    "truncation_problem",
    "verify_dir",
    "weights_fingerprint",
    "write_atomic",
    "write_errors",
]
