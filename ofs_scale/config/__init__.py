"""One dataclass tree for every setting of a run: YAML files plus `section.key=value` overrides.

schema.py holds the dataclasses (every field with a default and a docstring), loader.py reads YAML
and overrides into them (types checked, "did you mean" for unknown keys), checks.py holds the
cross-field checks. Import from here: `from ofs_scale.config import Config, load_config`.
"""

from __future__ import annotations

from ofs_scale.config.checks import check_world, validate
from ofs_scale.config.loader import dump_yaml, load_config, parse_override, to_dict
from ofs_scale.config.schema import (
    OPTIM_DEFAULTS,
    CheckpointConfig,
    CmdConfig,
    Config,
    ConfigError,
    DataConfig,
    LaunchConfig,
    LoggingConfig,
    MetricsConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    StageConfig,
    Switch,
    TrainConfig,
    switch_on,
)

__all__ = [
    "OPTIM_DEFAULTS",
    "CheckpointConfig",
    "CmdConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LaunchConfig",
    "LoggingConfig",
    "MetricsConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "RunConfig",
    "StageConfig",
    "Switch",
    "TrainConfig",
    "check_world",
    "dump_yaml",
    "load_config",
    "parse_override",
    "switch_on",
    "to_dict",
    "validate",
]
