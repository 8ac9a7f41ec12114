"""The OF alarm: fires once per threshold on residual sites only, writes its message and value
into the record, checkpoints when asked, and does so through the Trainer."""

from __future__ import annotations

import json

import pytest

from ofs_scale.config import ConfigError, load_config
from ofs_scale.instruments import build_instruments
from ofs_scale.instruments.of_alarm import OFAlarmCallback, residual_max
from ofs_scale.testing.distributed import run_distributed
from tests.helpers import tiny_overrides


class FakeTrainer:
    """The two TrainerView methods the alarm calls."""

    def __init__(self) -> None:
        self.logged: list[str] = []
        self.saved: list[str] = []

    def log(self, msg: str) -> None:
        self.logged.append(msg)

    def save_checkpoint(self, name: str):
        self.saved.append(name)
        return name


def record(kurt: float, mmr: float = 2.0) -> dict:
    return {
        "loss": 1.0,
        "of/kurtosis/embed": 1.1,
        "of/kurtosis/block_01": kurt,
        "of/kurtosis/mlp_01": 500.0,  # not a residual site: ignored
        "of/mmr/block_01": mmr,
        "of/mmr/final": float("nan"),
    }


def test_residual_max_reads_residual_sites_only():
    assert residual_max(record(3.0), "kurtosis") == 3.0
    assert residual_max(record(3.0, mmr=7.0), "mmr") == 7.0
    assert residual_max({"loss": 1.0}, "kurtosis") is None


def test_fires_once_per_threshold_with_record_and_checkpoint():
    cb, trainer = OFAlarmCallback({"kurtosis": 5.0, "mmr": 10.0}, checkpoint=True), FakeTrainer()
    steps = [record(2.0), {"loss": 1.0}, record(6.0), record(9.0, mmr=12.0), record(9.0, 20.0)]
    recs = []
    for step, rec in enumerate(steps, start=1):
        cb.post_step(trainer, step, rec)
        recs.append(rec)
    assert "alarm" not in recs[0] and "alarm" not in recs[1]
    assert recs[2]["alarm/kurtosis"] == 6.0 and "step 3" in recs[2]["alarm"]
    assert "alarm/kurtosis" not in recs[3] and recs[3]["alarm/mmr"] == 12.0
    assert "alarm" not in recs[4]
    assert trainer.saved == ["alarm_step_000003", "alarm_step_000004"]
    assert sum("warning: outlier-feature alarm" in m for m in trainer.logged) == 2
    # resumed: what fired stays fired
    again = OFAlarmCallback({"kurtosis": 5.0, "mmr": 10.0})
    again.load_shard_state(trainer, cb.shard_state(trainer))
    rec = record(50.0, 50.0)
    again.post_step(trainer, 9, rec)
    assert "alarm" not in rec


def test_config_builds_the_alarm_only_when_asked(tiny_cfg):
    assert not any(isinstance(c, OFAlarmCallback) for c in build_instruments(tiny_cfg()))
    cbs = build_instruments(tiny_cfg("metrics.every=1", "metrics.alarm_kurtosis=3"))
    assert isinstance(cbs[-1], OFAlarmCallback) and cbs[-1].thresholds == {"kurtosis": 3.0}
    with pytest.raises(ConfigError, match=r"metrics\.every"):
        tiny_cfg("metrics.every=0", "metrics.alarm_mmr=3")


def _train(rank: int, overrides: list[str]) -> None:
    from ofs_scale.trainer.loop import Trainer

    Trainer(load_config(None, overrides)).fit()


def test_trainer_writes_the_alarm_and_its_checkpoint(tiny_corpus, cache_dir, tmp_path):
    out = tmp_path / "run"
    # Residual kurtosis is >= 1 by definition, so a threshold of 1 fires at the first metric step.
    overrides = [
        *tiny_overrides(tiny_corpus, cache_dir, out),
        "metrics.every=1",
        "metrics.alarm_kurtosis=1.0",
        "metrics.alarm_checkpoint=true",
    ]
    run_distributed(_train, 1, overrides)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    alarms = [r for r in recs if "alarm" in r]
    assert len(alarms) == 1 and alarms[0]["step"] == 1
    assert alarms[0]["alarm/kurtosis"] == alarms[0]["of/kurtosis_max"]
    assert (out / "checkpoints" / "alarm_step_000001").is_dir()
