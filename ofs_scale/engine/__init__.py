"""Engines: one rank's model chunks, their optimizer, and everything one training step does.

Every engine implements the `Engine` protocol of `base.py`, so the Trainer never asks which one
it has: `LocalEngine` (pp=1, `local.py`) and `PipelineEngine` (pp>1, `pipeline.py`) share the
native step of `native.py` (our DP reduction, clipping and sharded optimizers); `DeepSpeedEngine`
(`train.engine=deepspeed`, `deepspeed.py`) hands those to DeepSpeed ZeRO. DeepSpeed itself is
imported only when that engine is built.
"""

from __future__ import annotations

from ofs_scale.config import Config
from ofs_scale.engine.base import Batch, Engine, StepResult
from ofs_scale.engine.deepspeed import DeepSpeedEngine
from ofs_scale.engine.local import LocalEngine
from ofs_scale.engine.pipeline import PipelineEngine
from ofs_scale.parallel.mesh import Mesh

__all__ = [
    "Batch",
    "DeepSpeedEngine",
    "Engine",
    "LocalEngine",
    "PipelineEngine",
    "StepResult",
    "build_engine",
]


def build_engine(cfg: Config, mesh: Mesh, vocab_size: int) -> Engine:
    """The engine for this config and layout: DeepSpeed for `train.engine=deepspeed`, otherwise
    the native engine, local for pp=1 and pipelined for pp>1."""
    if cfg.train.engine == "deepspeed":
        return DeepSpeedEngine(cfg, mesh, vocab_size)
    if mesh.pp == 1:
        return LocalEngine(cfg, mesh, vocab_size)
    return PipelineEngine(cfg, mesh, vocab_size)
