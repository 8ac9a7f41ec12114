"""What a checkpoint holds: the flat DCP state dict (model, optimizer by parameter name, the
trainer's counters) and the fingerprint of the settings its tensors depend on.

Tensors split over tensor parallelism are saved as DTensors of the full shape, so a checkpoint
written under one (tp, pp, dp) layout loads under another.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch
from torch.distributed.tensor import DeviceMesh, DTensor, Shard

from ofs_scale.config import Config
from ofs_scale.model.gpt import resolved
from ofs_scale.optim.registry import OPTIMIZER_SPECS
from ofs_scale.parallel.mesh import Mesh
from ofs_scale.parallel.tp import is_tp_sharded, tp_partition_dim


def _tp_device_mesh(mesh: Mesh) -> DeviceMesh | None:
    if mesh.tp == 1:
        return None
    return DeviceMesh.from_group(mesh.tp_group, device_type=mesh.device.type)


def _wrap(t: torch.Tensor, param: torch.Tensor | None, mesh: Mesh, tp_mesh) -> torch.Tensor:
    """A TP-split tensor of the parameter's shape becomes a DTensor of the full shape."""
    if tp_mesh is None or param is None or not is_tp_sharded(param) or t.shape != param.shape:
        return t
    dim = tp_partition_dim(param)
    full = list(t.shape)
    full[dim] *= mesh.tp
    stride = torch.empty(full, device="meta").stride()
    return DTensor.from_local(
        t, tp_mesh, [Shard(dim)], run_check=False, shape=torch.Size(full), stride=stride
    )


def training_state(
    model: torch.nn.Module, optimizer: Any, extra: dict[str, Any], mesh: Mesh
) -> dict[str, Any]:
    """The flat state dict DCP saves and loads in place: model, optimizer (by parameter name),
    and `extra` (trainer counters, sampler, RNG)."""
    tp_mesh = _tp_device_mesh(mesh)
    params = dict(model.named_parameters())
    sd: dict[str, Any] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        p = params.get(name)
        sd[f"model/{name}"] = _wrap(t.data if p is not None else t, p, mesh, tp_mesh)
    for name, state in optimizer.named_state().items():
        p = params[name]
        for k, v in state.items():
            if not isinstance(v, torch.Tensor):
                sd[f"optim/{name}/{k}"] = v
                continue
            key = f"optim/{name}/{k}"
            if mesh.tp > 1 and is_tp_sharded(p) and v.ndim and v.shape != p.shape:
                # Per-shard state of a different shape (e.g. SOAP factors): one key per TP rank.
                key += f"@tp{mesh.tp_rank}of{mesh.tp}"
            sd[key] = _wrap(v, p, mesh, tp_mesh)
    sd["extra"] = extra
    return sd


# Model settings that only shape the initialisation: a resumed run may change them freely.
_INIT_ONLY = {"init_std", "scale_out_init", "bln_data_init", "bln_init_min_sigma"}


def checkpoint_fingerprint(cfg: Config) -> dict[str, Any]:
    """The settings a run's saved tensors and their meaning depend on: the model (with defaults
    resolved), the vocabulary, the learned position table's length, the optimizer, and the keys
    its registry entry names (`OptimizerSpec.fingerprint`: the TP size for SOAP/Shampoo)."""
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in _INIT_ONLY}
    model.update(resolved(cfg.model))
    fp = {f"model.{k}": v for k, v in model.items()}
    fp["data.vocab_size"] = cfg.data.vocab_size
    if cfg.model.position == "learned":
        fp["data.seq_len"] = cfg.data.seq_len
    fp["optim.name"] = cfg.optim.name
    for key in OPTIMIZER_SPECS[cfg.optim.name].fingerprint:
        section, name = key.split(".")
        fp[key] = getattr(getattr(cfg, section), name)
    return json.loads(json.dumps(fp))  # as it reads back from ofs_meta.json


def weights_fingerprint(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The part of a fingerprint that the model weights alone depend on (model and data keys):
    what must match to load weights without the optimizer state."""
    return {k: v for k, v in fingerprint.items() if k.startswith(("model.", "data."))}
