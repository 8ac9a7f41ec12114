"""Sweeps: a grid of dotted overrides expanded into points, submitted as one job array.

A sweep file (see configs/sweeps/):

    name: block_x_optim          # sweep name (default: the file name)
    config: configs/smoke.yaml   # base config (or --config on the command line)
    out_dir: runs/sweeps/block_x_optim   # default: runs/sweeps/<name>
    overrides: [train.eval_every=0]      # applied to every point
    grid:
      model.block: [pre, op]
      optim.name: [adamw, soap]

Each point gets `run.out_dir = <out_dir>/<point name>` and `run.name = <name>/<point name>`.
`sweep.json` in the sweep dir lists every point (parameters, run dir, config snapshot, job id) so a
report tool finds them all without scanning directories.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
import yaml

from ofs_scale.config import Config, ConfigError, load_config
from ofs_scale.launch.files import SWEEP_FILE
from ofs_scale.launch.job import CONFIG_SNAPSHOT, TrainJob
from ofs_scale.launch.submit import job_result, make_executor, write_launch_record, write_snapshot

SWEEP_KEYS = {"name", "config", "out_dir", "overrides", "grid"}


@dataclass
class SweepPoint:
    """One combination of grid values and its resolved config."""

    name: str
    params: dict[str, Any]
    cfg: Config


@dataclass
class Sweep:
    """A parsed sweep: its name, output dir, base config and points."""

    name: str
    out_dir: Path
    base_config: str | None
    grid: dict[str, list[Any]]
    points: list[SweepPoint]


def _slug(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return "".join(c if c.isalnum() or c in "-." else "-" for c in text).strip("-") or "x"


def _short_keys(keys: list[str]) -> dict[str, str]:
    """The last part of each dotted key, or the whole key (dots as dashes) where that part is
    shared with another key or is just `name`."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {
        k: k.replace(".", "-") if last.count(part) > 1 or part == "name" else part
        for k, part in zip(keys, last)
    }


def point_name(index: int, params: dict[str, Any]) -> str:
    """`003_block-op_optim-name-soap`: the index, then a short key and value per grid entry."""
    short = _short_keys(list(params))
    parts = [f"{short[key]}-{_slug(v)}" for key, v in params.items()]
    return "_".join([f"{index:03d}", *parts])


def _override(key: str, value: Any) -> str:
    # YAML flow style keeps lists/dicts on one line, as `parse_override` expects.
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...')}"


def load_sweep(
    path: str | Path, config: str | None = None, extra_overrides: list[str] | tuple = ()
) -> Sweep:
    """Read a sweep file and resolve (and validate) every point's config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} does not exist; see configs/sweeps/")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping with keys {sorted(SWEEP_KEYS)}")
    unknown = set(spec) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; use {sorted(SWEEP_KEYS)}")
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{path}: `grid` must map dotted keys to lists of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid entry {key!r} must be a non-empty list")
        if key.startswith("run."):
            raise ConfigError(f"{path}: grid entry {key!r}: run.* is set per point by the sweep")
    name = str(spec.get("name") or path.stem)
    base = config or spec.get("config")
    out_dir = Path(spec.get("out_dir") or Path("runs/sweeps") / name)
    common = [*(spec.get("overrides") or []), *extra_overrides]
    points = []
    for i, combo in enumerate(itertools.product(*grid.values())):
        params = dict(zip(grid.keys(), combo))
        pname = point_name(i, params)
        overrides = [
            *common,
            *(_override(k, v) for k, v in params.items()),
            f"run.out_dir={out_dir / pname}",
            f"run.name={name}/{pname}",
        ]
        try:
            cfg = load_config(base, overrides)
        except ConfigError as e:
            raise ConfigError(f"sweep point {pname}: {e}") from e
        points.append(SweepPoint(pname, params, cfg))
    return Sweep(name, out_dir, base, grid, points)


def write_index(sweep: Sweep, jobs: list[submitit.Job] | None, cluster: str) -> Path:
    """Write `<sweep dir>/sweep.json`, the index of every point (and its job id)."""
    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    index = {
        "name": sweep.name,
        "dir": str(sweep.out_dir),
        "created": time.time(),
        "base_config": sweep.base_config,
        "grid": sweep.grid,
        "cluster": cluster,
        "points": [
            {
                "name": p.name,
                "params": p.params,
                "out_dir": p.cfg.run.out_dir,
                "config": str(Path(p.cfg.run.out_dir) / CONFIG_SNAPSHOT),
                "job_id": str(jobs[i].job_id) if jobs else None,
            }
            for i, p in enumerate(sweep.points)
        ],
    }
    path = sweep.out_dir / SWEEP_FILE
    path.write_text(json.dumps(index, indent=1))
    return path


def submit_sweep(sweep: Sweep, local: bool = False, wait: bool = False) -> list[submitit.Job]:
    """Submit every point as one job array (resources from the first point's `launch`)."""
    snapshots = [str(write_snapshot(p.cfg)) for p in sweep.points]
    executor = make_executor(sweep.points[0].cfg, sweep.out_dir / "submitit", local)
    executor.update_parameters(name=sweep.name)
    jobs = executor.map_array(TrainJob(), snapshots, [None] * len(snapshots))
    for p, job in zip(sweep.points, jobs):
        write_launch_record(
            Path(p.cfg.run.out_dir),
            {
                "time": time.time(),
                "cluster": executor.cluster,
                "config": str(Path(p.cfg.run.out_dir) / CONFIG_SNAPSHOT),
                "jobs": [{"job_id": str(job.job_id), "stage": None}],
                "sweep": str(sweep.out_dir),
            },
        )
    write_index(sweep, jobs, executor.cluster)
    if wait:
        for job in jobs:
            job_result(job)
    return jobs
