"""The SMC loss under DDP: this rank's rows are the anchors, scored against every rank's rows.

    loss = distributed_smc_loss(z_local, y_f_local, y_b_local, lam_local, tau=0.1, weighting="weighted")

Each rank holds n rows (the same n on every rank: the trainer drops partial batches). The features are
all-gathered with autograd into the global (R·n, D) batch in rank order, the labels and λ without
autograd, and the loss is computed over this rank's block of anchors, rows rank·n ... rank·n + n − 1.

Gradient convention. Let L be the single-process loss on the concatenated batch (the mean over all
R·n anchors) and L_r the value this function returns on rank r (the mean over its n anchors), so
L = (1/R)·Σ_r L_r. The gather's backward sums the gradients that every rank's loss sends to a rank's rows,
so after `L_r.backward()` on every rank, rank q's local features hold

    Σ_r ∂L_r/∂z_q = R · ∂L/∂z_q,

R times the single-process gradient. DDP then averages parameter gradients over the R ranks, which
divides that factor back out: the parameters get exactly ∂L/∂θ, as in a single-process run on the
whole batch (tests/test_distributed_loss.py checks both statements on 2 gloo processes).

Without an initialized process group (or with one rank) this is `smc_loss` on the local batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mixtail.kernels.reference import Weighting
from mixtail.kernels.reference import check_smc_arguments
from mixtail.kernels.smc_loss import unchecked_smc_loss


class _AllGatherRows(torch.autograd.Function):
    """(n, D) on each rank → (R·n, D) in rank order; backward: this rank's rows of Σ_r (grad on rank r)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        if grad.is_cuda and "nccl" in str(dist.get_backend(ctx.group)):
            out = grad.new_empty((ctx.rows, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None
        # Gloo has no reduce-scatter; an all-reduce of the (R·n, D) gradient moves R times more data,
        # which is still small next to the O(N²·D) loss.
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def distributed_smc_loss(local_features: torch.Tensor, local_fg: torch.Tensor, local_bg: torch.Tensor,
                         local_lam: torch.Tensor, *, tau: float = 0.1, weighting: Weighting = "weighted",
                         impl: str = "auto", group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """SMC loss of this rank's n anchors against the gathered R·n rows: the mean over the local anchors.

    local_features: (n, D), L2-normalized, the same n on every rank; local_fg, local_bg: (n,) int;
    local_lam: (n,) float. See the module docstring for the gradient convention (rank-local features get
    R × the single-process gradient; DDP's averaging makes parameter gradients exact).
    """
    # λ comes from the trainer's own plan: its range is not read back (a synchronization every step).
    check_smc_arguments(local_features, local_fg, local_bg, local_lam, tau, 0, None, values=False)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return unchecked_smc_loss(local_features, local_fg, local_bg, local_lam, tau=tau, weighting=weighting,
                                  anchor_start=0, num_anchors=None, impl=impl)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = local_features.shape[0]
    features = _AllGatherRows.apply(local_features, group)  # (R·n, D)
    # One collective for the metadata: labels and λ travel as float64, exact for ids below 2**53.
    meta = torch.stack([local_fg.double(), local_bg.double(), local_lam.detach().double()])  # (3, n)
    parts = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(parts, meta.contiguous(), group=group)
    meta = torch.cat(parts, dim=1)  # (3, R·n)
    fg, bg = meta[0].to(local_fg.dtype), meta[1].to(local_bg.dtype)
    lam = meta[2].to(local_lam.dtype)
    return unchecked_smc_loss(features, fg, bg, lam, tau=tau, weighting=weighting, anchor_start=rank * n,
                              num_anchors=n, impl=impl)


__all__ = ["distributed_smc_loss"]
