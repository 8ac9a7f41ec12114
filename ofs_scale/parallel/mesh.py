"""The 3-D process mesh (dp x pp x tp) built with megatron-core's parallel_state.

Rank order follows megatron-core: tp varies fastest, then dp, then pp. A single process without
torchrun still gets a (world size 1) gloo process group, so every code path is the same.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Mesh:
    """Sizes, ranks and process groups of each named axis, and the device of this rank."""

    world_size: int
    rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    device: torch.device
    backend: str

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        """Global rank 0 logs and writes files."""
        return self.rank == 0

    def pp_global_rank(self, stage: int) -> int:
        """Global rank of pipeline stage `stage` with this rank's dp and tp coordinates."""
        return stage * self.dp * self.tp + self.dp_rank * self.tp + self.tp_rank


def _pick_device(device: str) -> torch.device:
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but CUDA is not available; use train.device=cpu")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def init_mesh(
    tp: int = 1, pp: int = 1, backend: str = "auto", device: str = "auto", timeout_min: float = 60
) -> Mesh:
    """Initialise torch.distributed (if needed; collectives time out after `timeout_min`
    minutes, `parallel.timeout_min`) and megatron-core's model-parallel groups."""
    from megatron.core import parallel_state

    dev = _pick_device(device)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        timeout = timedelta(minutes=timeout_min)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:
            store = dist.HashStore()
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tp*pp = {tp}*{pp}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            distributed_timeout_minutes=max(1, round(timeout_min)),
        )
    dp = world // (tp * pp)
    return Mesh(
        world_size=world,
        rank=rank,
        tp=tp,
        pp=pp,
        dp=dp,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
        device=dev,
        backend=backend,
    )


def destroy_mesh() -> None:
    """Tear down megatron-core groups and the default process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
