"""Checkpoints: DCP state (`state`), atomic verified saves and resume (`manager`), integrity
checks and checksums (`integrity`), per-shard callback state (`shards`), the `ofs-scale ckpt`
command (`cli`)."""

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
from ofs_scale.checkpoint.state import checkpoint_fingerprint, training_state

__all__ = [
    "LATEST",
    "META",
    "SHARDS",
    "CheckpointError",
    "CheckpointManager",
    "checkpoint_fingerprint",
    "commit_dir",
    "load_shard_state",
    "read_meta",
    "save_shard_state",
    "training_state",
    "truncation_problem",
    "verify_dir",
    "write_atomic",
    "write_errors",
]
