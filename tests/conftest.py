"""Shared fixtures: a small cached corpus and a tiny config for fast CPU tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ofs_scale.config import load_config

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "disabled")


def write_tiny_corpus(root: Path, n_files: int = 12) -> Path:
    """A small deterministic corpus: stdlib files copied so content never changes under tests."""
    from ofs_scale.data.corpus import stdlib_root

    src = stdlib_root()
    names = [
        "bisect.py",
        "heapq.py",
        "fnmatch.py",
        "colorsys.py",
        "keyword.py",
        "textwrap.py",
        "string.py",
        "numbers.py",
        "copy.py",
        "abc.py",
        "stat.py",
        "queue.py",
        "glob.py",
        "shlex.py",
        "cmd.py",
        "this.py",
    ][:n_files]
    root.mkdir(parents=True, exist_ok=True)
    for n in names:
        (root / n).write_text((src / n).read_text())
    return root


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def assert_weights_close(got: dict, want: dict, lr: float) -> None:
    """Weights after Adam-like steps from two computations of the same steps.

    Adam turns a rounding-sized gradient near zero into a full-size step, so two exact-in-maths
    paths (DP=2 vs DP=1, DeepSpeed vs native) can differ there by a fraction of `lr`; weights get
    an absolute tolerance of 1% of one step and the usual tight relative one elsewhere.
    """
    import torch

    assert got.keys() >= want.keys()
    for n, p in want.items():
        torch.testing.assert_close(got[n], p, rtol=1e-5, atol=0.01 * lr, msg=n)


def crashed_save(trainer, module, attr: str) -> None:
    """Move every weight, then save checkpoint `step_000099` with `module.<attr>` replaced by a
    function that raises, as a crash at that point of the save would; `<attr>` is restored.
    Every rank must call it: each dies at the same point (one alone would hang the others)."""
    import pytest
    import torch

    def crash(*args, **kwargs):
        raise RuntimeError(f"simulated crash in {attr}")

    orig = getattr(module, attr)
    setattr(module, attr, crash)
    try:
        with torch.no_grad():
            for p in trainer.params:
                p.add_(1.0)
        trainer.step = 99
        with pytest.raises(RuntimeError, match="simulated crash"):
            trainer.save_checkpoint("step_000099")
    finally:
        setattr(module, attr, orig)


def tiny_overrides(corpus: Path, cache: Path, out: Path) -> list[str]:
    """Overrides for a model and run small enough for 4 processes on 2 cores."""
    return [
        f"data.corpus={corpus}",
        f"data.cache_dir={cache}",
        "data.vocab_size=512",
        "data.seq_len=16",
        "data.val_fraction=0.2",
        "model.d_model=32",
        "model.n_layers=2",
        "model.n_heads=4",
        "train.global_batch=8",
        "train.micro_batch=4",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.stages=[{name: main, steps: 3, lr_schedule: constant}]",
        "metrics.every=0",
        "logging.wandb=disabled",
        "logging.progress=false",
        f"run.out_dir={out}",
    ]


@pytest.fixture
def tiny_cfg(tiny_corpus, cache_dir, tmp_path):
    def make(*extra: str):
        return load_config(
            None, [*tiny_overrides(tiny_corpus, cache_dir, tmp_path / "run"), *extra]
        )

    return make
