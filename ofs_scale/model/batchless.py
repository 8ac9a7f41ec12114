"""Batchless normalisation (Berger & Uc Cetina): per-feature statistics learned, not measured.

Each feature has a learned mean mu and scale sigma (stored as log sigma). Forward, identical in
training and inference:

    y = (x - sg(mu)) / sg(sigma) * gamma + beta                      (sg: stop-gradient)

mu and sigma are fitted by an auxiliary Gaussian negative log-likelihood per layer,

    aux = mean_D(log sigma) + 0.5 * mean_{N,D}(((sg(x) - mu) / sigma)^2),

whose minimum is the data's per-feature mean and standard deviation. The task loss never reaches
mu/sigma and the auxiliary loss never reaches x, so no batch statistic appears anywhere: results do
not depend on the micro-batch size and gradient accumulation is exact.

Why the aux gradient is injected here and not added to the loss: the engines backpropagate only the
task loss (a pipeline only from its last stage). `_BatchlessFn.backward` therefore adds d(aux)/d(mu)
and d(aux)/d(log sigma), times `aux_scale`, whenever the normalised output gets a gradient.

Scaling. One optimizer step must see the gradient of `bln_weight * mean over the step's micro
batches of aux`, exactly as the task loss is the mean over micro batches. The local engine divides
each micro-batch loss by the number of micro batches n before backward, so `aux_scale` is
`bln_weight / n`; the pipeline schedule instead divides the accumulated gradients by n after all
backward passes, which covers the aux gradient too, so there `aux_scale` is `bln_weight`
(`configure_aux_scaling`). With equal micro batches, the per-micro-batch means averaged over n
micro batches equal the mean over all tokens, so 1 x 8 and 8 x 1 micro batching give the same
gradient; averaging over DP ranks then gives the mean over the global batch.

Shapes: N tokens (all leading dims flattened), D features.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ofs_scale.model.recompute import recomputing


class _BatchlessFn(torch.autograd.Function):
    """z = (x - mu) / exp(log_sigma); backward: task gradient to x only, aux gradient to
    mu/log_sigma only."""

    @staticmethod
    def forward(ctx, x, mu_D, log_sigma_D, aux_scale: float):
        z = (x - mu_D) * torch.exp(-log_sigma_D)
        ctx.save_for_backward(z, log_sigma_D)
        ctx.aux_scale = aux_scale
        return z

    @staticmethod
    def backward(ctx, grad_z):
        z, log_sigma_D = ctx.saved_tensors
        inv_sigma_D = torch.exp(-log_sigma_D)
        grad_x = grad_z * inv_sigma_D
        acc = torch.promote_types(z.dtype, torch.float32)  # bf16 sums in fp32
        z_ND = z.detach().to(acc).reshape(-1, z.shape[-1])
        num_tokens, dim = z_ND.shape
        s = ctx.aux_scale
        # d/dmu_j of 0.5*mean(z^2) = -sum_n z_nj / (N D sigma_j)
        grad_mu_D = (-s / (num_tokens * dim)) * z_ND.sum(0) * inv_sigma_D.to(acc)
        # d/dlog_sigma_j of mean_D(log sigma) + 0.5*mean(z^2) = (1 - mean_n z_nj^2) / D
        grad_log_sigma_D = (s / dim) * (1.0 - z_ND.pow(2).mean(0))
        return (
            grad_x,
            grad_mu_D.to(log_sigma_D.dtype),
            grad_log_sigma_D.to(log_sigma_D.dtype),
            None,
        )


class BatchlessNorm(nn.Module):
    """Normalisation by learned per-feature mean and scale (see the module docstring).

    `data_init`: on the first training forward, set mu and sigma to the mean and standard
    deviation of that micro batch (summed over `dp_group` so replicas stay identical), sigma no
    less than `init_min_sigma`; the flag that it happened is a persistent buffer, so a resumed
    run does not re-initialise.

    Why the floor: the norm is a fixed affine map between optimizer steps, so its gain 1/sigma
    multiplies every change of x. Adam moves log sigma by about lr per step whatever the aux
    gradient, so sigma follows a growing x by at most a factor exp(lr) per step. Set to a
    0.02-scale residual stream, the gain is ~40 and the stream grows ~20x in the first step
    (smoke model, lr 3e-3): training diverges. The floor caps the gain (docs/instruments.md).
    """

    def __init__(
        self,
        dim: int,
        bias: bool = False,
        aux_weight: float = 1.0,
        data_init: bool = False,
        dp_group: dist.ProcessGroup | None = None,
        eps: float = 1e-5,
        init_min_sigma: float = 0.0,
    ) -> None:
        super().__init__()
        if aux_weight < 0:
            raise ValueError(f"model.bln_weight={aux_weight} must be >= 0")
        if not init_min_sigma >= 0:
            raise ValueError(
                f"model.bln_init_min_sigma={init_min_sigma} must be >= 0 (0: no floor)"
            )
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.mu = nn.Parameter(torch.zeros(dim))
        self.log_sigma = nn.Parameter(torch.zeros(dim))
        self.aux_weight = aux_weight
        self.aux_scale = aux_weight
        self.data_init = data_init
        self.dp_group = dp_group
        self.eps = eps
        self.init_min_sigma = init_min_sigma
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        # Sum and count of the aux loss over training forwards since the last `pop_aux_loss`.
        self._aux_sum = torch.zeros((), dtype=torch.float64)
        self._aux_count = 0

    def set_micro_batches(self, loss_divisor: int) -> None:
        """Scale the aux gradient by 1/loss_divisor, the factor by which the engine divides each
        micro batch's task loss before backward (1 when it scales gradients afterwards)."""
        if loss_divisor < 1:
            raise ValueError(f"loss_divisor={loss_divisor} must be >= 1")
        self.aux_scale = self.aux_weight / loss_divisor

    @torch.no_grad()
    def _init_from_data(self, x: torch.Tensor) -> None:
        x_ND = x.detach().float().reshape(-1, x.shape[-1])
        sums = torch.cat([x_ND.sum(0), x_ND.pow(2).sum(0), x_ND.new_tensor([x_ND.shape[0]])])
        if self.dp_group is not None and dist.get_world_size(self.dp_group) > 1:
            dist.all_reduce(sums, group=self.dp_group)
        dim = x_ND.shape[1]
        count = sums[-1]
        mean_D = sums[:dim] / count
        var_D = (sums[dim : 2 * dim] / count - mean_D.pow(2)).clamp_min(0.0)
        if not bool(torch.isfinite(sums).all()):
            return  # uninitialised input (pipeline metadata inference): wait for real data
        self.mu.copy_(mean_D)
        sigma_D = torch.sqrt(var_D + self.eps).clamp_min(self.init_min_sigma)
        self.log_sigma.copy_(torch.log(sigma_D))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a recompute (activation checkpointing) repeats a forward already counted
        training = self.training and torch.is_grad_enabled() and not recomputing()
        if training and self.data_init and not bool(self.initialized):
            self._init_from_data(x)
        z = _BatchlessFn.apply(x, self.mu, self.log_sigma, self.aux_scale)
        if training:
            with torch.no_grad():
                acc = torch.promote_types(z.dtype, torch.float32)
                sq = torch.linalg.vector_norm(z.detach(), dtype=acc).square()
                aux = self.log_sigma.double().mean() + 0.5 * sq.double() / z.numel()
            self._aux_sum = self._aux_sum.to(aux.device) + aux
            self._aux_count += 1
        y = z * self.weight
        return y + self.bias if self.bias is not None else y

    def pop_aux_loss(self) -> tuple[torch.Tensor, int]:
        """(sum of the aux loss over training forwards since the last call, their count); resets."""
        out = (self._aux_sum, self._aux_count)
        self._aux_sum = torch.zeros((), dtype=torch.float64)
        self._aux_count = 0
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.weight.shape[0]}, bias={self.bias is not None}, "
            f"aux_weight={self.aux_weight}, data_init={self.data_init}, "
            f"init_min_sigma={self.init_min_sigma}"
        )


def aux_loss(x: torch.Tensor, mu_D: torch.Tensor, log_sigma_D: torch.Tensor) -> torch.Tensor:
    """The auxiliary loss written with ordinary autograd ops (x detached), for reference and
    tests: mean_D(log sigma) + 0.5 * mean(((x - mu) / sigma)^2)."""
    z = (x.detach() - mu_D) * torch.exp(-log_sigma_D)
    return log_sigma_D.mean() + 0.5 * z.pow(2).mean()


def configure_aux_scaling(model: nn.Module, loss_divisor: int) -> int:
    """Set the aux-gradient scale of every BatchlessNorm in `model` (see the module docstring);
    returns how many were found."""
    found = 0
    for m in model.modules():
        if isinstance(m, BatchlessNorm):
            m.set_micro_batches(loss_divisor)
            found += 1
    return found


def pop_aux_losses(model: nn.Module) -> tuple[float, int]:
    """(sum over this module's BatchlessNorms of their mean aux loss since the last call, number
    of layers that ran); resets the running sums."""
    total, layers = 0.0, 0
    for m in model.modules():
        if isinstance(m, BatchlessNorm):
            s, n = m.pop_aux_loss()
            if n:
                total += float(s) / n
                layers += 1
    return total, layers
