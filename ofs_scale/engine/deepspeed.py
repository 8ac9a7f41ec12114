"""The Pre-Norm + AdamW baseline trained by a DeepSpeed ZeRO-1/2 engine (`train.engine=deepspeed`).

The model is the megatron-core GPT that `LocalEngine` builds (tensor parallelism through its
layers). DeepSpeed does what the native engines do in `NativeEngine.step` after the forward
pass: gradient accumulation, the gradient all-reduce / reduce-scatter over our data-parallel
group (handed to DeepSpeed through `MeshMpu`), global-norm clipping, the skip of non-finite steps
and the AdamW update on flat ZeRO partitions. The Trainer keeps the data order and the
learning-rate schedule: it writes the stage schedule's lr into `optimizer.param_groups` before
every step, as for every engine.

Precision: `fp32` trains fp32 weights; `bf16` is DeepSpeed's own bf16 mode (bf16 module weights,
activations and gradients, fp32 master weights and moments inside the ZeRO partitions), which is
how DeepSpeed users run it, not the native engine's fp32-weights autocast.

Checkpoints keep the layout of `ofs_scale/checkpoint.py` (see `DeepSpeedCheckpoints`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from ofs_scale.checkpoint import (
    CheckpointError,
    CheckpointManager,
    read_meta,
    save_shard_state,
    training_state,
    truncation_problem,
    write_errors,
)
from ofs_scale.config import Config
from ofs_scale.engine.base import Batch, StepResult, mean_over_dp
from ofs_scale.engine.local import mean_loss
from ofs_scale.model.build import build_model
from ofs_scale.model.gpt import GPT
from ofs_scale.optim.adamw import param_groups
from ofs_scale.parallel.mesh import Mesh

# DeepSpeed writes one model file per TP rank and one optimizer file per (DP, TP) rank.
_MODEL_FILE = "mp_rank_{tp:02d}_model_states.pt"
_OPTIM_GLOB = "*zero_pp_rank_{dp}_mp_rank_{tp:02d}_optim_states.pt"


class MeshMpu:
    """Our mesh in the shape DeepSpeed's `mpu` argument expects (Megatron's naming).

    With pp=1 (the only layout this engine accepts) the model-parallel group is the TP group, so
    DeepSpeed's gradient norm sums TP-sharded parameters over TP and counts replicated ones once.
    """

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh

    def get_model_parallel_rank(self) -> int:
        return self.mesh.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.mesh.tp

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.mesh.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_data_parallel_rank(self) -> int:
        return self.mesh.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.mesh.dp

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.mesh.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.mesh.dp_group)


def deepspeed_config(cfg: Config, mesh: Mesh) -> dict[str, Any]:
    """The DeepSpeed JSON config equivalent to our `train` section at this mesh's DP size."""
    t = cfg.train
    accumulation = t.global_batch // (t.micro_batch * mesh.dp)
    return {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": t.dtype == "bf16"},
        "zero_optimization": {
            "stage": t.zero_stage,
            # Overlapping communication with backward needs CUDA streams.
            "overlap_comm": mesh.device.type == "cuda",
            "contiguous_gradients": True,
        },
        # torch.optim.AdamW is on DeepSpeed's ZeRO list; the flag only silences the check.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _import_deepspeed(mesh: Mesh):
    """Import DeepSpeed with its accelerator chosen to match our device (set before import)."""
    if mesh.device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "LOCAL_RANK" not in os.environ:
        if mesh.world_size > 1:
            raise RuntimeError(
                "train.engine=deepspeed needs LOCAL_RANK in the environment; start the run with "
                "torchrun (or srun + torchrun, see slurm/) so every process has it"
            )
        # One process without a launcher: DeepSpeed still asserts that the variable exists.
        os.environ["LOCAL_RANK"] = "0"
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError(
            "train.engine=deepspeed needs DeepSpeed: pip install deepspeed==0.19.8 "
            "(on CPU machines add `-c constraints-cpu.txt` so torch is not replaced)"
        ) from e
    return deepspeed


class DeepSpeedEngine:
    """Our model under a DeepSpeed ZeRO engine; implements `Engine` (see `base.py`).

    `chunks`, `state_module`, `evaluate` and `train` behave as on `LocalEngine`, so metrics,
    evaluation and quantisation read the same modules. `optimizer` is the torch AdamW that
    DeepSpeed steps on its flat partitions; its param groups carry the lr and weight decay.
    """

    def __init__(self, cfg: Config, mesh: Mesh, vocab_size: int) -> None:
        deepspeed = _import_deepspeed(mesh)
        self.cfg = cfg
        self.mesh = mesh
        self.model: GPT = build_model(cfg, mesh, vocab_size)
        self.chunks: list[nn.Module] = [self.model]
        self.state_module: nn.Module = self.model
        o = cfg.optim
        # Same groups as NamedAdamW: matrices decay, gains / biases / scalars do not.
        self.optimizer = torch.optim.AdamW(
            param_groups(self.named_parameters(), o.weight_decay),
            lr=o.lr,
            betas=o.betas,
            eps=o.eps,
        )
        self.ds, self.zero_optimizer, _, _ = deepspeed.initialize(
            model=self.model,
            optimizer=self.optimizer,
            config=deepspeed_config(cfg, mesh),
            mpu=MeshMpu(mesh),
            dist_init_required=False,
        )

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The model's parameters by name (the same objects DeepSpeed updates in place)."""
        return list(self.model.named_parameters())

    def step(self, batches: list[Batch]) -> StepResult:
        """Forward/backward every micro batch and let DeepSpeed reduce, clip and update.

        DeepSpeed skips the update when the gradient norm is not finite; a non-finite loss
        counts as skipped too, as on the native engines.
        """
        if len(batches) != self.ds.gradient_accumulation_steps():
            raise ValueError(
                f"{len(batches)} micro batches but DeepSpeed accumulates "
                f"{self.ds.gradient_accumulation_steps()}; train.global_batch, micro_batch and "
                "the DP size must not change after the engine is built"
            )
        dev = self.mesh.device
        loss = torch.zeros((), device=dev)
        skipped = self.ds.skipped_steps
        for x, y in batches:
            micro = self.model.loss(self.ds(x.to(dev)), y.to(dev))
            # DeepSpeed divides by the accumulation steps itself (mean over micro batches).
            self.ds.backward(micro)
            self.ds.step()
            loss += micro.detach().float() / len(batches)
        mean_over_dp(loss, self.mesh)
        norm = self.ds.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if norm is None else float(norm))
        applied = self.ds.skipped_steps == skipped and bool(torch.isfinite(loss))
        return StepResult(loss, norm, applied)

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> torch.Tensor:
        """Mean loss over `batches`, averaged over the DP group, as on `LocalEngine`."""
        loss = mean_loss(self.model, batches, self.cfg.train.dtype, self.mesh.device)
        return mean_over_dp(loss, self.mesh)

    def train(self, mode: bool = True) -> None:
        """Training or evaluation mode for the model (through DeepSpeed's engine)."""
        self.ds.train(mode)

    def optimizer_state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for the optimizer: AdamW moments and fp32 master partitions."""
        moments = sum(
            v.numel() * v.element_size()
            for st in self.optimizer.state.values()
            for v in st.values()
            if isinstance(v, torch.Tensor)
        )
        masters = sum(
            t.numel() * t.element_size()
            for t in self.zero_optimizer.single_partition_of_fp32_groups
        )
        return {"moments": moments, "master": masters}

    # -- checkpoints -----------------------------------------------------------------------

    def checkpoint_state(self, extra: dict[str, Any]) -> dict[str, Any]:
        """What goes through DCP next to DeepSpeed's files: fp32 model weights (readable by
        quantisation eval and other layouts) and the trainer's `extra` counters."""
        state = training_state(self.state_module, _NoOptimizerState(), extra, self.mesh)
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and torch.is_floating_point(v):
                state[k] = v.float()
        return state

    def save_checkpoint(
        self, manager: CheckpointManager, name: str, state: dict, step: int, shards: dict
    ) -> Path:
        """DeepSpeed's own save plus the DCP state and callbacks' shard state, committed
        atomically as `<root>/<name>`."""
        return DeepSpeedCheckpoints(manager, self).save(name, state, step, shards)

    def load_latest(
        self, manager: CheckpointManager, state: dict, log: Callable[[str], None] = print
    ) -> Path | None:
        """Resume from the newest usable checkpoint (DeepSpeed files and DCP `extra`)."""
        return DeepSpeedCheckpoints(manager, self).load_latest(state, log)


class _NoOptimizerState:
    """DeepSpeed saves the optimizer itself; DCP gets no optimizer keys."""

    def named_state(self) -> dict[str, Any]:
        return {}


class DeepSpeedCheckpoints:
    """DeepSpeed checkpoints inside our layout: `<root>/<name>/` holds DeepSpeed's model and
    ZeRO optimizer files plus a DCP part (fp32 weights, trainer counters) and `ofs_meta.json`.
    Written under `.tmp-<name>` and renamed into place, then `latest` moves; stage checkpoints
    are kept and periodic ones pruned by the same rules as native checkpoints.

    ZeRO partitions depend on the DP size, so a checkpoint resumes only on the same (tp, dp).
    """

    def __init__(self, manager: CheckpointManager, engine: DeepSpeedEngine) -> None:
        self.manager = manager
        self.engine = engine
        self.mesh = manager.mesh
        self.root = manager.root

    def save(self, name: str, state: dict[str, Any], step: int, shards: dict[str, Any]) -> Path:
        """Write checkpoint `name` (collective); returns its final path."""
        tmp = self.manager.begin(name)
        with write_errors(name, tmp):
            self.engine.ds.save_checkpoint(str(self.root), tag=tmp.name, save_latest=False)
            dcp.save(state, checkpoint_id=str(tmp))
            save_shard_state(tmp, self.mesh, shards)
        cfg = self.engine.cfg.train
        return self.manager.commit(
            name, state, step, engine="deepspeed", zero_stage=cfg.zero_stage, dtype=cfg.dtype
        )

    def problem(self, path: Path) -> str | None:
        """Why `path` cannot resume this engine, or None (checked on rank 0)."""
        problem = truncation_problem(path)
        if problem:
            return problem
        meta = read_meta(path)
        if meta.get("engine") != "deepspeed":
            return (
                "written by the native engine; resume it with train.engine=native, or start "
                "a new run.out_dir for train.engine=deepspeed"
            )
        layout, now = meta.get("layout", {}), self.manager.layout()
        if (layout.get("tp"), layout.get("dp")) != (now["tp"], now["dp"]):
            return (
                f"written at tp={layout.get('tp')} dp={layout.get('dp')}; DeepSpeed ZeRO state "
                f"resumes only on the same layout (this run: tp={now['tp']} dp={now['dp']})"
            )
        for tp in range(now["tp"]):
            needed = [_MODEL_FILE.format(tp=tp)]
            needed += [_OPTIM_GLOB.format(dp=d, tp=tp) for d in range(now["dp"])]
            for pattern in needed:
                found = [f for f in path.glob(pattern) if f.stat().st_size > 0]
                if not found:
                    return f"DeepSpeed file {pattern} is missing or empty"
        return None

    def load_latest(self, state: dict[str, Any], log=print) -> Path | None:
        """Load the newest usable checkpoint, skipping unusable ones with a report (the rules
        of `CheckpointManager.load_first_usable`)."""
        return self.manager.load_first_usable(
            self.problem, lambda path: self._load(path, state), log
        )

    def _load(self, path: Path, state: dict[str, Any]) -> None:
        loaded, _ = self.engine.ds.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint in {path}")
        # Weights and optimizer come from DeepSpeed's files; DCP supplies only the counters.
        extra = {"extra": state["extra"]}
        dcp.load(extra, checkpoint_id=str(path))
        state["extra"] = extra["extra"]
