"""fp32 gradient buffers and DP reduction in buckets, launched from gradient hooks.

Every trainable parameter gets `main_grad`, an fp32 view into a flat bucket. A
post-accumulate-grad hook adds the gradient autograd produced (bf16 for bf16 weights) into it
and frees `.grad`, so micro batches accumulate in fp32 whatever the weights' dtype. The hook
also counts its calls per parameter: the call that brings the count to the step's number of
micro batches is the last micro batch's backward, whichever loop or pipelining schedule runs
the backwards (the "no sync" of DDP, without asking the schedule). A bucket whose parameters
are all complete is reduced over DP at once, asynchronously (`overlap`), or else by `finish`.

Buckets launch in index order on every rank, so collectives match across DP ranks; the index
order follows the backward order (parameters in reverse). With `owners` (ZeRO-1: each whole
parameter belongs to one DP rank) a bucket holds one owner's parameters and is reduced to that
owner only, instead of all-reduced. `comm_bytes` counts what the reductions moved on this rank:
an all-reduce as twice its buffer (reduce-scatter plus all-gather), a reduce as once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ofs_scale.parallel.mesh import Mesh

REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Bucket:
    """Consecutive parameters (in backward order) whose fp32 gradients share one flat buffer."""

    params: list[nn.Parameter]
    owner: int | None
    """DP rank the gradients are reduced to; None: all-reduced to every rank."""
    flat: torch.Tensor = field(init=False)
    pending: int = 0
    """Parameters whose gradient is not complete yet in this step."""
    work: dist.Work | None = None
    sent: torch.Tensor | None = None
    """The buffer handed to the collective (`flat`, or its bf16 copy)."""


def _split(params: list[nn.Parameter], owners: list[int | None], max_elems: int) -> list[Bucket]:
    """Buckets of about `max_elems` elements, one owner each, ordered by their last parameter
    (the one whose gradient completes the bucket in a backward pass in this order)."""
    open_: dict[int | None, tuple[list[nn.Parameter], int]] = {}
    closed: list[tuple[int, Bucket]] = []
    for i, (p, owner) in enumerate(zip(params, owners)):
        members, size = open_.get(owner, ([], 0))
        members.append(p)
        size += p.numel()
        if size >= max_elems:
            closed.append((i, Bucket(members, owner)))
            open_.pop(owner, None)
        else:
            open_[owner] = (members, size)
    last = {p: i for i, p in enumerate(params)}
    closed += [(last[m[-1]], Bucket(m, owner)) for owner, (m, _) in open_.items()]
    return [b for _, b in sorted(closed, key=lambda c: c[0])]


class GradBuffer:
    """fp32 `main_grad` buffers of `params`, reduced over DP in buckets (see the module doc).

    One step: `start(num_micro)`, the backward passes of `num_micro` micro batches, then
    `finish(divisor)`; afterwards `main_grad` holds the gradient summed over micro batches and
    DP ranks, divided by `divisor` (on the owner only, with `owners`).
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        mesh: Mesh,
        *,
        bucket_mb: float,
        reduce_dtype: str,
        overlap: bool,
        owners: list[int] | None = None,
    ) -> None:
        if reduce_dtype not in REDUCE_DTYPES:
            raise ValueError(f"parallel.grad_reduce_dtype={reduce_dtype!r}: use fp32 or bf16")
        if bucket_mb <= 0:
            raise ValueError(f"parallel.bucket_mb={bucket_mb} must be positive")
        self.mesh = mesh
        self.overlap = overlap
        self.reduce_dtype = REDUCE_DTYPES[reduce_dtype]
        keep = [i for i, p in enumerate(params) if p.requires_grad]
        self.params = [params[i] for i in reversed(keep)]
        who = [None if owners is None else owners[i] for i in reversed(keep)]
        item = torch.empty((), dtype=self.reduce_dtype).element_size()
        self.buckets = _split(self.params, who, max(1, int(bucket_mb * 2**20 / item)))
        self.bucket_of: dict[nn.Parameter, Bucket] = {}
        for b in self.buckets:
            total = sum(p.numel() for p in b.params)
            b.flat = torch.zeros(total, dtype=torch.float32, device=mesh.device)
            offset = 0
            for p in b.params:
                p.main_grad = b.flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                self.bucket_of[p] = b
        self.counts = dict.fromkeys(self.params, 0)
        self.num_micro = 0
        self.next_launch = 0
        self.armed = False
        self.comm_bytes = 0
        self.launched_in_backward = 0  # buckets of the last step launched from the hooks
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def start(self, num_micro: int) -> None:
        """Zero the buffers and count `num_micro` backward passes per parameter from now."""
        for b in self.buckets:
            b.flat.zero_()
            b.pending, b.work, b.sent = len(b.params), None, None
        for p in self.params:
            p.grad = None
            self.counts[p] = 0
        self.num_micro, self.next_launch, self.armed = num_micro, 0, True

    def _on_grad(self, p: nn.Parameter) -> None:
        if not self.armed:
            return  # a backward outside a step (tests, tools) keeps plain `.grad`
        p.main_grad.add_(p.grad)
        p.grad = None
        self.counts[p] += 1
        if self.counts[p] == self.num_micro:
            self.bucket_of[p].pending -= 1
            if self.overlap:
                self._launch_ready()

    def _launch_ready(self) -> None:
        while self.next_launch < len(self.buckets) and self.buckets[self.next_launch].pending == 0:
            self._launch(self.buckets[self.next_launch])
            self.next_launch += 1

    def _launch(self, b: Bucket) -> None:
        if self.mesh.dp == 1:
            return
        b.sent = b.flat if self.reduce_dtype == torch.float32 else b.flat.to(self.reduce_dtype)
        group = self.mesh.dp_group
        if b.owner is None:
            b.work = dist.all_reduce(b.sent, group=group, async_op=True)
            self.comm_bytes += 2 * b.sent.nbytes
        else:
            dst = dist.get_global_rank(group, b.owner)
            b.work = dist.reduce(b.sent, dst=dst, group=group, async_op=True)
            self.comm_bytes += b.sent.nbytes

    def finish(self, divisor: float) -> None:
        """Launch what is left, wait for every reduction, divide by `divisor`. A gradient that
        reached `.grad` without the hook (a backward path that accumulates by hand) is folded
        in first, so nothing is lost."""
        for p in self.params:
            if p.grad is not None:
                p.main_grad.add_(p.grad)
                p.grad = None
                self.counts[p] = max(1, self.counts[p])
        self.launched_in_backward = self.next_launch
        for b in self.buckets:
            b.pending = 0
        self._launch_ready()
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
            mine = b.owner is None or b.owner == self.mesh.dp_rank
            if mine and b.sent is not None and b.sent is not b.flat:
                b.flat.copy_(b.sent)
            if mine and divisor != 1:
                b.flat.div_(divisor)
        self.armed = False

    def received(self, p: nn.Parameter) -> bool:
        """Whether `p` got a gradient in this step (the optimizer skips parameters without)."""
        return self.counts.get(p, 0) > 0
