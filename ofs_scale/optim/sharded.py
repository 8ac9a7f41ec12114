"""ZeRO-1 for shape-aware optimizers: every whole parameter has one owner in the DP group.

Flattening parameters into equal partitions (DeepSpeed, Megatron's distributed optimizer) cuts
matrices apart, which SOAP and Shampoo cannot work with; here the unit of ownership is a whole
parameter (a whole TP shard under tensor parallelism), assigned by longest-processing-time.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ofs_scale.optim.master import MasterWeights, WrappingOptimizer
from ofs_scale.optim.settings import OptimSettings
from ofs_scale.parallel.grads import buckets
from ofs_scale.parallel.mesh import Mesh

CostFn = Callable[[tuple[int, ...], OptimSettings], float]


def assign_owners(
    named: list[tuple[str, torch.Tensor]], cost: CostFn, cfg: OptimSettings, num_ranks: int
) -> dict[str, int]:
    """Owner rank of every parameter: longest-processing-time over `cost`, deterministic.

    Parameters are taken by decreasing cost (name breaks ties) and each goes to the rank with
    the least load so far (lowest rank breaks ties); every rank computes the same answer from
    names and shapes alone, with no communication.
    """
    jobs = sorted(((cost(tuple(p.shape), cfg), n) for n, p in named), key=lambda j: (-j[0], j[1]))
    loads = [(0.0, r) for r in range(num_ranks)]
    owner: dict[str, int] = {}
    for c, name in jobs:
        load, rank = heapq.heappop(loads)
        owner[name] = rank
        heapq.heappush(loads, (load + c, rank))
    return owner


def state_bytes(optimizer) -> int:
    """Bytes of the optimizer state tensors this rank holds (materialising lazy state)."""
    total = 0
    for st in optimizer.named_state().values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


class ShardedOptimizer(WrappingOptimizer):
    """Runs an inner optimizer on the parameters this DP rank owns, then shares the results.

    Communication per step: none before the update (the engine has already averaged the full
    gradient over DP, so every rank holds it and the owner preconditions a fully reduced
    gradient); after the update each owner broadcasts its updated parameters to the DP group in
    flat buckets, so every rank ends the step with identical weights. Total traffic equals one
    all-gather of the parameters. State (moments, factors, bases) exists only on the owner, and
    `named_state` returns only owned parameters, so checkpoint keys are unique across ranks and
    a different DP size on load simply has another rank request each key. With one DP rank
    everything is owned and no collective runs: it is then exactly the inner optimizer.

    `inner_cls` is a registered optimizer class (optim/registry.py): built as
    `inner_cls(named, cfg, **inner_kwargs)`, with `inner_cls.cost(shape, cfg)` the load ownership
    balances. Ownership depends on names and shapes only, so the TP ranks of one DP rank own the
    same parameters, and an inner optimizer that gathers over TP (Muon) meets its peers.

    With `master=True` (bf16 model weights, `train.master_weights`) the inner optimizer runs
    over fp32 masters of the owned parameters only, and the owners broadcast the updated bf16
    weights: half the bytes of an fp32 broadcast. The engine then reduces each gradient to its
    owner only (`parallel.grad_buffer`), so a step moves the parameters' bytes twice in bf16.
    `comm_bytes` counts the broadcast bytes this rank sent or received.
    """

    def __init__(
        self,
        named: list[tuple[str, nn.Parameter]],
        cfg: OptimSettings,
        mesh: Mesh,
        inner_cls: type,
        inner_kwargs: dict | None = None,
        master: bool = False,
    ) -> None:
        self.mesh = mesh
        self.params = [p for _, p in named]
        self.owner = assign_owners(named, inner_cls.cost, cfg, mesh.dp)
        owned = [(n, p) for n, p in named if self.owner[n] == mesh.dp_rank]
        self.master = MasterWeights(owned) if master else None
        self.inner = inner_cls(self.master.named if master else owned, cfg, **(inner_kwargs or {}))
        self.comm_bytes = 0
        self.by_owner = [[p for n, p in named if self.owner[n] == r] for r in range(mesh.dp)]
        self.src = [
            dist.get_global_rank(mesh.dp_group, r) if mesh.dp > 1 else mesh.rank
            for r in range(mesh.dp)
        ]

    @torch.no_grad()
    def sync_model(self) -> None:
        """Owned model weights from the masters (if any), then every owner's weights to the
        DP group (also after a checkpoint loaded the owned masters)."""
        if self.master is not None:
            self.master.copy_to_model()
        if self.mesh.dp > 1:
            for rank, params in enumerate(self.by_owner):
                self._broadcast(params, rank)

    def _broadcast(self, params: list[torch.Tensor], rank: int) -> None:
        mine = rank == self.mesh.dp_rank
        for bucket in buckets(params):
            self._broadcast_bucket(bucket, sum(t.numel() for t in bucket), rank, mine)

    def _broadcast_bucket(
        self, bucket: list[torch.Tensor], size: int, rank: int, mine: bool
    ) -> None:
        if mine:
            flat = _flatten_dense_tensors([t.data for t in bucket])
        else:
            flat = torch.empty(size, dtype=bucket[0].dtype, device=bucket[0].device)
        dist.broadcast(flat, src=self.src[rank], group=self.mesh.dp_group)
        self.comm_bytes += flat.nbytes
        if not mine:
            for dst, src in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                dst.data.copy_(src)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of every parameter, owned or not (and of the masters)."""
        extra = [m for _, m in self.master.named] if self.master is not None else []
        for p in [*self.params, *extra]:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def owned_names(self) -> list[str]:
        """Names of the parameters this rank owns."""
        return [n for n, r in self.owner.items() if r == self.mesh.dp_rank]
