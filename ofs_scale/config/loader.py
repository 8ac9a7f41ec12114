"""Reading a config: YAML file, then `section.key=value` overrides, coerced to the schema's types.

Every value is checked against its field's annotation (schema.py); an unknown key names the
closest valid one ("did you mean ..."). `load_config` then runs the cross-field checks (checks.py).
`to_dict` and `dump_yaml` write a config back as plain data.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from ofs_scale.config.checks import validate
from ofs_scale.config.schema import (
    DEFAULT_OPTIM,
    OPTIM_DEFAULTS,
    Config,
    ConfigError,
    OptimConfig,
    StageConfig,
)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        keys.append(name)
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, name + "."))
    return keys


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` converted to type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}{hint}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # `X | None`: X's own message ("should be a number", "did you mean")
            return _coerce(value, options[0], key)
        for a in options:
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r} should be {_describe(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} should be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}={value!r} should be a list")
        return [_coerce(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{key}={value!r} should be a list of {len(args)} values")
        return tuple(_coerce(v, a, f"{key}.{i}") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} should be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r} should be an integer")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} should be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} should be a string")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _unknown_key(cls: type, key: str, prefix: str) -> ConfigError:
    full = prefix + key
    root_keys = _all_keys(Config) + [
        f"train.stages.N.{f.name}" for f in dataclasses.fields(StageConfig)
    ]
    # A right key in the wrong section (`model.lr`) first, then the closest spelling.
    close = [k for k in root_keys if k.rsplit(".", 1)[-1] == key][:1]
    close = close or difflib.get_close_matches(full, root_keys, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]}?)" if close else ""
    valid = ", ".join(f.name for f in dataclasses.fields(cls))
    return ConfigError(f"unknown config key {full!r}{hint}; valid keys here: {valid}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        if k not in names:
            raise _unknown_key(cls, k, prefix)
        kwargs[k] = _coerce(v, hints[k], prefix + k)
    return cls(**kwargs)


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [_to_plain(v) for v in obj]
    return obj


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain YAML/JSON-able data."""
    return _to_plain(cfg)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: no list element {part}")
            node = node[int(part)]
        else:
            if part not in node:
                node[part] = {}
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{key}: no list element {last}")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{key}: {'.'.join(parts[:-1])} is not a section")


def parse_override(text: str) -> tuple[str, Any]:
    """Split `section.key=value` and parse the value as YAML (ints, floats, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} should look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r} ({e})") from e
    return key, value


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Read a YAML config (optional), apply dotted overrides, validate, and return a Config.

    optim.lr, optim.betas, optim.eps and optim.weight_decay that neither the YAML nor an override
    sets (or that are set to null) take the defaults of the final optim.name (OPTIM_DEFAULTS); a
    value that is set always wins. The returned config, and so `dump_yaml`, holds the numbers."""
    loaded: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"config file {str(path)!r} does not exist; see configs/ for examples"
            )
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level should be a mapping of sections")
    parsed = [parse_override(item) for item in overrides]
    # First pass: which optimizer the YAML and overrides choose. Second pass: the same values on
    # top of that optimizer's defaults, so that an override of one element (`optim.betas.1=0.99`)
    # edits the right pair.
    name = _apply(to_dict(Config()), loaded, parsed, path)["optim"]["name"]
    if not isinstance(name, str) or name not in OPTIM_DEFAULTS:
        name = DEFAULT_OPTIM  # _build reports a wrong name
    tree = _apply(to_dict(Config(optim=OptimConfig(name=name))), loaded, parsed, path)
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def _apply(
    tree: dict[str, Any],
    loaded: dict[str, Any],
    overrides: list[tuple[str, Any]],
    path: Path | None,
) -> dict[str, Any]:
    """`tree` (plain defaults) updated with the YAML sections `loaded`, then the overrides."""
    for section, values in loaded.items():
        if section not in tree:
            raise _unknown_key(Config, section, "")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {section!r} should be a mapping")
        tree[section].update(copy.deepcopy(values))
    for key, value in overrides:
        section = key.split(".", 1)[0]
        if section not in tree:
            raise _unknown_key(Config, section, "")
        if "." not in key:
            raise ConfigError(f"override {key!r} should name section.key")
        _check_key_path(key)
        _set_dotted(tree, key, copy.deepcopy(value))
    return tree


def _check_key_path(key: str) -> None:
    cls: Any = Config
    prefix = ""
    for part in key.split("."):
        if part.isdigit():
            prefix += part + "."
            continue
        if not dataclasses.is_dataclass(cls):
            return
        hints = _hints(cls)
        if part not in hints:
            raise _unknown_key(cls, part, prefix)
        tp = hints[part]
        prefix += part + "."
        if typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        cls = tp


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
