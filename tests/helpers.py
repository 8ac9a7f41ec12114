"""Helpers shared by the test modules (fixtures live in conftest.py; the multi-process harness is
`ofs_scale.testing.distributed`). No test module imports from another test module or conftest."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from ofs_scale.config import Config
from ofs_scale.model.batchless import pop_aux_losses
from ofs_scale.parallel.grads import average_across_dp
from ofs_scale.trainer.callbacks import Callback

if TYPE_CHECKING:
    from collections.abc import Callable

    from ofs_scale.trainer.loop import Trainer

# --- data and config -------------------------------------------------------------------------


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


def write_indexed_dataset(
    root: Path, docs: list[list[int]], vocab_size: int, tokenizer: bytes = b"test tokenizer"
) -> Path:
    """A prepared dataset written outside `ofs-scale prepare`: megatron-core's own builder (two
    parts) plus a hand-written manifest; `tokenizer` stands for the .model bytes (its sha256 is
    what the trainer compares). Each document should end with its EOD token."""
    import hashlib

    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.model").write_bytes(tokenizer)
    dtype = np.uint16 if vocab_size < 65500 else np.int32
    halves = [docs[: len(docs) // 2], docs[len(docs) // 2 :]]
    parts = []
    for i, half in enumerate(halves):
        prefix = f"part_{i:05d}"
        builder = IndexedDatasetBuilder(str(root / f"{prefix}.bin"), dtype=dtype)
        for doc in half:
            builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
        builder.finalize(str(root / f"{prefix}.idx"))
        n_tokens = sum(len(d) for d in half)
        parts.append({"prefix": prefix, "sources": [], "documents": len(half), "tokens": n_tokens})
    manifest = {
        "format": "ofs_scale-indexed-v1",
        "tokenizer": {
            "kind": "sentencepiece",
            "model": "tokenizer.model",
            "sha256": hashlib.sha256(tokenizer).hexdigest(),
            "vocab_size": vocab_size,
            "eod_id": 1,
        },
        "dtype": np.dtype(dtype).name,
        "parts": parts,
        "documents": len(docs),
        "tokens": sum(p["tokens"] for p in parts),
        "sources": [],
        "created_by": "tests.helpers.write_indexed_dataset",
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def random_docs(
    n_docs: int, vocab_size: int, seed: int, mark: int | None = None
) -> list[list[int]]:
    """Random documents of 20-200 tokens ending in EOD (id 1); `mark`, if given, is every
    non-EOD token, so that a test can tell which dataset a window came from."""
    gen = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n_docs):
        n = int(torch.randint(20, 200, (1,), generator=gen))
        doc = torch.randint(2, vocab_size, (n,), generator=gen).tolist()
        docs.append(([mark] * n if mark is not None else doc) + [1])
    return docs


# --- training ----------------------------------------------------------------------------------


class Losses(Callback):
    """Records the training loss of every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def post_step(self, trainer, step, record):
        self.losses.append(record["loss"])


class Records(Callback):
    """Keeps every step record (by reference: keys that later callbacks add are seen)."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def post_step(self, trainer, step, record) -> None:
        self.records.append(record)


def assert_weights_close(got: dict, want: dict, lr: float) -> None:
    """Weights after Adam-like steps from two computations of the same steps.

    Adam turns a rounding-sized gradient near zero into a full-size step, so two exact-in-maths
    paths (DP=2 vs DP=1, DeepSpeed vs native) can differ there by a fraction of `lr`; weights get
    an absolute tolerance of 1% of one step and the usual tight relative one elsewhere.
    """
    assert got.keys() >= want.keys()
    for n, p in want.items():
        torch.testing.assert_close(got[n], p, rtol=1e-5, atol=0.01 * lr, msg=n)


def crashed_save(trainer: Trainer, module: object, attr: str) -> None:
    """Move every weight, then save checkpoint `step_000099` with `module.<attr>` replaced by a
    function that raises, as a crash at that point of the save would; `<attr>` is restored.
    Every rank must call it: each dies at the same point (one alone would hang the others)."""

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


def first_step_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Gradients of the first global batch (before any optimizer step), averaged over DP; the
    trainer is left as if nothing ran."""
    start = trainer.sampler.state_dict()
    trainer.engine.train(True)
    trainer.engine.forward_backward(trainer._batches(trainer.train_split, trainer.sampler.next()))
    average_across_dp(trainer.params, trainer.mesh)
    grads = {n: p.grad.clone() for n, p in trainer.named_params}
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.sampler.load_state_dict(start)
    for chunk in trainer.engine.chunks:
        pop_aux_losses(chunk)
    return grads


# --- optimizers --------------------------------------------------------------------------------


def make_problem(
    shape: tuple[int, int], seed: int
) -> tuple[torch.Tensor, Callable[[torch.Tensor, int], torch.Tensor]]:
    """Gradient of a noisy Kronecker-structured quadratic: A (W - T) B plus fresh noise."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    a = torch.randn(m, m, generator=gen) / math.sqrt(m)
    b = torch.randn(n, n, generator=gen) / math.sqrt(n)
    a, b = a @ a.T + 0.1 * torch.eye(m), b @ b.T + 0.1 * torch.eye(n)
    target = torch.randn(m, n, generator=gen)
    noise = torch.randn(64, m, n, generator=gen) * 0.1
    w0 = torch.randn(m, n, generator=gen)

    def grad(w, call):
        return a @ (w - target) @ b + noise[call]

    return w0, grad


# --- launcher ----------------------------------------------------------------------------------


def record_hook(cfg: Config, run_dir: Path) -> None:
    """A `launch.post_run` hook for the tests (`tests.helpers:record_hook`): appends a line per
    call to the run directory."""
    with open(Path(run_dir) / "post_run.jsonl", "a") as f:
        f.write(json.dumps({"block": cfg.model.block, "steps": cfg.total_steps}) + "\n")


def hook_calls(run_dir: Path) -> list[dict]:
    """The calls `record_hook` recorded in `run_dir`, in order."""
    return [json.loads(line) for line in (run_dir / "post_run.jsonl").read_text().splitlines()]
