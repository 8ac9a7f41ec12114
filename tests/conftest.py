"""Fixtures shared by several test modules: a small cached corpus, a tiny config, one thread.

Plain helper functions live in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ofs_scale.config import load_config
from tests.helpers import tiny_overrides, write_tiny_corpus

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def tiny_cfg(tiny_corpus, cache_dir, tmp_path):
    def make(*extra: str):
        return load_config(
            None, [*tiny_overrides(tiny_corpus, cache_dir, tmp_path / "run"), *extra]
        )

    return make


@pytest.fixture
def single_thread():
    """Tiny matrices: one intra-op thread avoids spin-waiting on a shared, busy machine.
    Modules request it with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
