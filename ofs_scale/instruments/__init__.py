"""Instruments: trainer callbacks that measure the run (OF metrics, collapse, batchless aux loss,
online CMD). `build_instruments` composes them from the config; the Trainer knows none by name."""

from __future__ import annotations

from ofs_scale.config import Config
from ofs_scale.instruments.batchless import BatchlessAuxCallback
from ofs_scale.instruments.cmd_online import CmdCallback
from ofs_scale.instruments.collapse import CollapseCallback
from ofs_scale.instruments.of_alarm import OFAlarmCallback
from ofs_scale.instruments.of_metrics import MetricsCallback
from ofs_scale.trainer.callbacks import Callback


def build_instruments(cfg: Config) -> list[Callback]:
    """The instruments a config asks for: OF metrics and collapse statistics on metric steps
    (`metrics.every`), the batchless aux loss with `model.norm=batchless`, CMD with
    `metrics.cmd.every`, the OF alarm with `metrics.alarm_kurtosis` / `alarm_mmr` (after the
    metrics, before the loggers the Trainer appends, so the record they write carries it)."""
    cbs: list[Callback] = []
    m = cfg.metrics
    if m.every:
        cbs += [MetricsCallback(), CollapseCallback()]
        if m.alarm_kurtosis > 0 or m.alarm_mmr > 0:
            thresholds = {"kurtosis": m.alarm_kurtosis, "mmr": m.alarm_mmr}
            cbs.append(OFAlarmCallback(thresholds, m.alarm_checkpoint))
    if cfg.model.norm == "batchless":
        cbs.append(BatchlessAuxCallback())
    if cfg.metrics.cmd.every:
        cbs.append(CmdCallback())
    return cbs
