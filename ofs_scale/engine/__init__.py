"""Engines: forward/backward, gradient reduction, clipping and the optimizer step of one rank.

`LocalEngine` (pp=1, `local.py`), `PipelineEngine` (pp>1, `pipeline.py`) and `DeepSpeedEngine`
(`train.engine=deepspeed`, `deepspeed.py`) implement the `Engine` interface of `base.py`.
"""

from __future__ import annotations

from ofs_scale.config import Config
from ofs_scale.parallel.mesh import Mesh


def build_engine(cfg: Config, mesh: Mesh, vocab_size: int):
    """The engine for this config and layout: local for pp=1, pipelined otherwise."""
    if mesh.pp == 1:
        from ofs_scale.engine.local import LocalEngine

        return LocalEngine(cfg, mesh, vocab_size)
    from ofs_scale.engine.pipeline import PipelineEngine

    return PipelineEngine(cfg, mesh, vocab_size)
