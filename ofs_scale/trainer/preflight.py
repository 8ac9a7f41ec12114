"""Everything a run can check before it allocates a model or waits in a queue.

`preflight(cfg, world_size)` returns every problem it finds, one line each, naming the config key
and the fix: prepared datasets (manifest, .bin/.idx parts, tokenizer and vocabulary), the corpus,
the tokenizer file, metric sites, the checkpoints named by `checkpoint.resume_from` and
`checkpoint.init_from`, whether run.out_dir and checkpoint.dir can be written, the world size
against the layout, and wandb credentials. The dry run prints them all; nothing is created.
"""

from __future__ import annotations

import os
from pathlib import Path

from ofs_scale.checkpoint.integrity import META
from ofs_scale.checkpoint.manager import POLICIES
from ofs_scale.config import Config, ConfigError, check_world
from ofs_scale.data import DataError, check_datasets
from ofs_scale.data.corpus import list_files
from ofs_scale.metrics.collect import select_sites
from ofs_scale.trainer.wandb_auth import missing_wandb_login


def launch_world_size(cfg: Config) -> int:
    """Processes the `launch` section starts: nodes x (gpus_per_node or tasks_per_node)."""
    lc = cfg.launch
    return lc.nodes * (lc.gpus_per_node or lc.tasks_per_node)


def _data_problems(cfg: Config) -> list[str]:
    d = cfg.data
    problems = []
    if d.tokenizer and not Path(d.tokenizer).expanduser().is_file():
        problems.append(
            f"data.tokenizer={d.tokenizer} does not exist; name the sentencepiece .model the "
            "datasets were prepared with (the tokenizer.model inside a prepared dataset), or "
            "leave it empty"
        )
    if d.datasets:
        try:
            check_datasets(d)
        except DataError as e:
            problems.append(f"data.datasets: {e}")
        return problems
    try:
        if not list_files(d.corpus, d.max_files):
            problems.append(
                f"data.corpus={d.corpus} names no files; point it at your text (.txt, .jsonl or a "
                "folder of files) or at `stdlib`"
            )
    except DataError as e:
        problems.append(str(e))
    return problems


def _checkpoint_problems(cfg: Config) -> list[str]:
    c = cfg.checkpoint
    problems = []
    if c.resume_from not in POLICIES and not (Path(c.resume_from) / META).is_file():
        problems.append(
            f"checkpoint.resume_from={c.resume_from} is not a checkpoint directory (no {META}); "
            f"use {' or '.join(POLICIES)}, or the path of a checkpoint (`ofs-scale ckpt list RUN`)"
        )
    if c.init_from and not Path(c.init_from).expanduser().exists():
        problems.append(
            f"checkpoint.init_from={c.init_from} does not exist; name a checkpoint directory or a "
            "run directory (its newest checkpoint is used), or leave it empty"
        )
    return problems


def _writable_problem(key: str, path: Path) -> str | None:
    """Why `path` (a directory to be) cannot be created or written, or None; creates nothing."""
    for parent in [path, *path.parents]:
        if not parent.exists():
            continue
        if not parent.is_dir():
            return f"{key}={path}: {parent} is a file, not a directory; move it or choose another"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"{key}={path}: {parent} is not writable; fix its permissions or choose another"
        return None
    return None


def preflight(cfg: Config, world_size: int) -> list[str]:
    """Every problem found in `cfg` for a run of `world_size` processes (see module doc)."""
    problems = _data_problems(cfg)
    try:
        select_sites(cfg.metrics.sites, cfg.model.n_layers)
    except ValueError as e:
        problems.append(str(e))
    problems += _checkpoint_problems(cfg)
    dirs = [("run.out_dir", cfg.run.out_dir), ("checkpoint.dir", cfg.checkpoint.dir)]
    for key, path in dirs:
        if path and (problem := _writable_problem(key, Path(path).expanduser())) is not None:
            problems.append(problem)
    try:
        check_world(cfg, world_size)
    except ConfigError as e:
        problems.append(
            f"{e} (world size {world_size}: WORLD_SIZE, else launch.nodes x launch.gpus_per_node "
            "or launch.tasks_per_node); set the launch section or the parallel layout to match"
        )
    if (problem := missing_wandb_login(cfg.logging.wandb)) is not None:
        problems.append(problem)
    return problems
