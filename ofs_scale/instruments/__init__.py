"""Instruments: trainer callbacks that measure the run (OF metrics, collapse, batchless aux loss,
online CMD). `build_instruments` composes them from the config; the Trainer knows none by name."""

from __future__ import annotations

from ofs_scale.config import Config
from ofs_scale.instruments.batchless import BatchlessAuxCallback
from ofs_scale.instruments.cmd_online import CmdCallback
from ofs_scale.instruments.collapse import CollapseCallback
from ofs_scale.instruments.of_metrics import MetricsCallback
from ofs_scale.trainer.callbacks import Callback


def build_instruments(cfg: Config) -> list[Callback]:
    """The instruments a config asks for: OF metrics and collapse statistics on metric steps
    (`metrics.every`), the batchless aux loss with `model.norm=batchless`, CMD with
    `metrics.cmd.every`."""
    cbs: list[Callback] = []
    if cfg.metrics.every:
        cbs += [MetricsCallback(), CollapseCallback()]
    if cfg.model.norm == "batchless":
        cbs.append(BatchlessAuxCallback())
    if cfg.metrics.cmd.every:
        cbs.append(CmdCallback())
    return cbs
