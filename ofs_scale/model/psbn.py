"""Post-shifted batch normalisation (psBN, Zhou et al. 2020) for token features.

Batch normalisation over every token of the micro batch, per feature, with statistics summed over
the data-parallel group (so DP=2 with micro batch b equals DP=1 with micro batch 2b), running
statistics for evaluation, and a constant post-shift alpha added after the affine transform:

    y = (x - mean) / sqrt(var + eps) * gamma + beta + alpha

BN followed by ReLU has an attractor at (gamma, beta) -> 0 where a unit never fires again
("collapse"); with alpha > 0 that point still leaves the following ReLU active. alpha = 0 is plain
batch normalisation (biased variance for normalising, unbiased for the running estimate, as
torch.nn.BatchNorm1d).

The DP all-reduce of the statistics is differentiable (`all_reduce_sum`): its backward all-reduces
the gradient, so each rank's input gradient is that of the sum of every rank's loss through the
shared statistics; the usual gradient average over DP then gives the gradient of the global mean
loss. Every DP replica must therefore run the same number of training forwards and backwards
(which the engines do). Model code receives the group; it never reads global parallel state.

Shapes: N tokens (all leading dims flattened), D features.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ofs_scale.model.recompute import recomputing


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group in forward; the adjoint (sum of the gradients) in backward."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group: dist.ProcessGroup):
        ctx.group = group
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Differentiable sum of `t` over `group` (identity without a group or at size 1)."""
    if group is None or dist.get_world_size(group) == 1:
        return t
    return _AllReduceSum.apply(t, group)


class PostShiftBatchNorm(nn.Module):
    """Batch norm over tokens with DP-synchronised statistics and a constant post-shift alpha.

    Running mean/var are persistent buffers (saved in checkpoints); evaluation uses them.
    """

    def __init__(
        self,
        dim: int,
        bias: bool = False,
        alpha: float = 0.1,
        dp_group: dist.ProcessGroup | None = None,
        momentum: float = 0.1,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"psBN momentum={momentum} must be in (0, 1]")
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.alpha = float(alpha)
        self.dp_group = dp_group
        self.momentum = momentum
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def batch_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean_D, biased var_D, token count) over this micro batch on every DP rank."""
        acc = torch.promote_types(x.dtype, torch.float32)  # bf16 sums in fp32
        x_ND = x.to(acc).reshape(-1, x.shape[-1])
        count = x_ND.new_tensor([float(x_ND.shape[0])])
        sums = all_reduce_sum(torch.cat([x_ND.sum(0), count]), self.dp_group)
        n = sums[-1]
        mean_D = sums[:-1] / n
        # Two passes (mean, then squared deviations): E[x^2] - E[x]^2 cancels badly when a
        # feature's mean is large against its spread, which outlier features make common.
        var_D = all_reduce_sum((x_ND - mean_D).pow(2).sum(0), self.dp_group) / n
        return mean_D, var_D, n.detach()

    @torch.no_grad()
    def _track(self, mean_D: torch.Tensor, var_D: torch.Tensor, n: torch.Tensor) -> None:
        """Move the running statistics towards this micro batch's."""
        m = self.momentum
        unbiased_D = var_D.detach() * (n / (n - 1).clamp_min(1.0))
        new_mean_D = (1 - m) * self.running_mean + m * mean_D.detach()
        new_var_D = (1 - m) * self.running_var + m * unbiased_D
        # A forward on uninitialised memory (torch.distributed.pipelining's dynamic metadata
        # inference runs one) can give non-finite statistics: keep them out of the running
        # estimate, which evaluation relies on for the rest of the run.
        ok_D = torch.isfinite(new_mean_D) & torch.isfinite(new_var_D)
        self.running_mean.copy_(torch.where(ok_D, new_mean_D, self.running_mean))
        self.running_var.copy_(torch.where(ok_D, new_var_D, self.running_var))
        self.num_batches_tracked.add_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean_D, var_D, n = self.batch_stats(x)
            if not recomputing():  # activation checkpointing: the first forward counted it
                self._track(mean_D, var_D, n)
        else:
            mean_D, var_D = self.running_mean, self.running_var
        z = (x.to(mean_D.dtype) - mean_D) * torch.rsqrt(var_D + self.eps)
        y = z * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y + self.alpha

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, bias={self.bias is not None}, alpha={self.alpha}"
