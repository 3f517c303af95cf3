"""The SMC loss in plain PyTorch: the test oracle, the benchmark baseline and the CPU path.

Exactly The paper's Eq. 4 (arXiv 2211.11938). For N features z (L2-normalized) with labels y_f, y_b and ratios λ:

    ℓ_ij = z_i·z_j/τ − log Σ_{k≠i} exp(z_i·z_k/τ)                       (j ≠ i)
    F_i  = {j ≠ i : y_f[j] = y_f[i]}        Bg_i = {j ≠ i : y_b[j] = y_b[i]}
    X_i  = {j ≠ i, j ∉ F_i ∪ Bg_i : y_f[j] = y_b[i] or y_b[j] = y_f[i]}
    L    = −mean_i [ w_f(i)·mean_F(i) + w_b(i)·mean_Bg(i) + w_c·mean_X(i) ]   (an empty set's mean is 0)

This materializes several (M, N) matrices: M·N·(4 B logits + 4 B log-probs + 3 bool masks) per call,
which is why kernels/smc_loss.py exists.

    z = torch.nn.functional.normalize(torch.randn(256, 128), dim=1)
    y = torch.randint(0, 10, (256,))
    loss = smc_loss(z, y, y.roll(1), torch.rand(256))
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import torch

Weighting = Literal["weighted", "average", "assign_larger"]
WEIGHTINGS = ("weighted", "average", "assign_larger")


def larger_component_labels(fg_labels: torch.Tensor, bg_labels: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """assign_larger: each image takes the label of its larger component (the foreground at λ = 0.5)."""
    return torch.where(lam >= 0.5, fg_labels, bg_labels)


def check_smc_arguments(features, fg_labels, bg_labels, lam, tau, anchor_start, num_anchors, *,
                        values: bool) -> None:
    """The public entry's checks, each error naming the argument: tensors of the right kinds, a positive
    finite tau, a non-empty batch and anchor range and, with `values`, every λ in [0, 1]. That last check reads
    λ on the host (a synchronization on a GPU), so the trainer, whose λ come from its own plan, skips it, and
    it is left out while torch.compile traces or a CUDA graph captures (neither can read a value back)."""
    for name, t in (("features", features), ("fg_labels", fg_labels), ("bg_labels", bg_labels), ("lam", lam)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__} (torch.as_tensor converts arrays)")
    if not features.is_floating_point():
        raise TypeError(f"features must be a floating-point tensor, got {features.dtype}")
    for name, t in (("fg_labels", fg_labels), ("bg_labels", bg_labels)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor of class ids, got {t.dtype}")
    if not lam.is_floating_point():
        raise TypeError(f"lam must be a floating-point tensor, got {lam.dtype}")
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise TypeError(f"tau must be a number, got {type(tau).__name__}")
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be positive and finite, got {tau}")
    for name, v in (("anchor_start", anchor_start), ("num_anchors", num_anchors)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
            raise TypeError(f"{name} must be an integer, got {type(v).__name__}")
    if features.dim() >= 1 and features.shape[0] == 0:
        raise ValueError("features is empty (N = 0): the loss is a mean over anchors, and there are none")
    if num_anchors is not None and num_anchors <= 0:
        raise ValueError(f"num_anchors must be positive (the loss is a mean over them), got {num_anchors}")
    if not values or torch.compiler.is_compiling() or (lam.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    outside = ~((lam >= 0) & (lam <= 1))  # NaN is outside too
    if outside.any():
        i = int(outside.flatten().nonzero()[0])
        raise ValueError(f"lam must lie in [0, 1] (the foreground's area ratio), got {lam.flatten()[i].item()} "
                         f"at row {i}")


def check_smc_inputs(features: torch.Tensor, fg_labels: torch.Tensor, bg_labels: torch.Tensor, lam: torch.Tensor,
                     weighting: str, anchor_start: int, num_anchors: int | None) -> int:
    """Validate the arguments every implementation shares; return the number of anchors."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if features.dim() != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}")
    n = features.shape[0]
    for name, t in (("fg_labels", fg_labels), ("bg_labels", bg_labels), ("lam", lam)):
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    m = n - anchor_start if num_anchors is None else num_anchors
    if not (0 <= anchor_start and 0 <= m and anchor_start + m <= n):
        raise ValueError(f"anchors {anchor_start}..{anchor_start + m} fall outside the {n} rows")
    return m


def _masked_mean(mask: torch.Tensor, log_prob: torch.Tensor) -> torch.Tensor:
    """Mean of log_prob over each row's mask, 0 for an empty row: (M,)."""
    return (mask * log_prob).sum(1) / mask.sum(1).clamp(min=1)


def smc_loss(features: torch.Tensor, fg_labels: torch.Tensor, bg_labels: torch.Tensor, lam: torch.Tensor, *,
             tau: float = 0.1, weighting: Weighting = "weighted", anchor_start: int = 0,
             num_anchors: int | None = None) -> torch.Tensor:
    """SMC loss of the anchors `anchor_start ... anchor_start + num_anchors − 1` (default: all N rows).

    features: (N, D), L2-normalized; fg_labels, bg_labels: (N,) int; lam: (N,) float, the foreground
    area ratio of each row. Every anchor scores against all N rows (under DDP: the gathered batch, with
    this rank's rows as anchors). Returns the mean over the anchors, a 0-dim tensor. Half-precision
    features are computed in float32; float64 stays float64 (gradcheck).
    """
    n = features.shape[0]
    m = check_smc_inputs(features, fg_labels, bg_labels, lam, weighting, anchor_start, num_anchors)
    z = features if features.dtype in (torch.float32, torch.float64) else features.float()
    rows = slice(anchor_start, anchor_start + m)
    lam = lam.to(z.dtype)

    logits = z[rows] @ z.T / tau  # (M, N)
    is_self = torch.zeros(m, n, dtype=torch.bool, device=z.device)
    is_self[torch.arange(m, device=z.device), torch.arange(anchor_start, anchor_start + m, device=z.device)] = True
    # A finite fill (not -inf) keeps the gradient finite when an anchor has no other rows at all (N = 1).
    logits = logits.masked_fill(is_self, torch.finfo(z.dtype).min)
    log_prob = (logits - torch.logsumexp(logits, dim=1, keepdim=True)).masked_fill(is_self, 0.0)  # (M, N)

    if weighting == "assign_larger":
        y = larger_component_labels(fg_labels, bg_labels, lam)
        positives = (y[rows, None] == y[None, :]) & ~is_self
        return -_masked_mean(positives, log_prob).mean()

    fg_shared = (fg_labels[rows, None] == fg_labels[None, :]) & ~is_self  # F_i
    bg_shared = (bg_labels[rows, None] == bg_labels[None, :]) & ~is_self  # Bg_i
    cross = ((fg_labels[None, :] == bg_labels[rows, None]) | (bg_labels[None, :] == fg_labels[rows, None]))
    cross = cross & ~fg_shared & ~bg_shared & ~is_self  # X_i
    mean_f = _masked_mean(fg_shared, log_prob)
    mean_b = _masked_mean(bg_shared, log_prob)
    mean_x = _masked_mean(cross, log_prob)
    if weighting == "weighted":
        w_f, w_b, w_c = lam[rows] / 1.5, (1 - lam[rows]) / 1.5, 0.5 / 1.5
    else:  # average
        w_f = w_b = w_c = 1.0 / 3.0
    return -(w_f * mean_f + w_b * mean_b + w_c * mean_x).mean()
