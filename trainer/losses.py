"""The training objective: logit-adjusted soft cross-entropy + η·SMC (docs/method.md, "The SMC loss" and
"Logit adjustment and the mixed prior").

    L_CE = CE(f(x̃) + log P_Y, ỹ)        (Eq. 5; at test time the prediction is argmax f(x))
    L    = L_CE + η·L_SMC                (Eq. 6)

    log_prior = log_class_prior(train_counts)
    ce = logit_adjusted_soft_ce(logits, soft_targets, log_prior)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def log_class_prior(counts: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """log P_Y(k) = log(n_k / N); a class with no training images is treated as having one.

    counts: (C,) training images per class (a Loader's `class_counts`). Returns (C,) float32 on `device`.

    >>> import mixtail
    >>> mixtail.log_class_prior([75, 25]).exp()
    tensor([0.7500, 0.2500])
    """
    if isinstance(counts, torch.Tensor):
        counts = counts.detach().cpu()
    try:
        values = np.asarray(counts, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"counts must be a sequence of numbers, got {type(counts).__name__}") from None
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"counts must be a non-empty (C,) sequence, got shape {values.shape}")
    bad = ~(np.isfinite(values) & (values >= 0))  # a negative count was taken as 1, a NaN poisoned every class
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise ValueError(f"counts must be finite and >= 0, got {values[k]} for class {k}")
    counts = torch.as_tensor(values).clamp(min=1)
    return (counts / counts.sum()).log().float().to(device)


def logit_adjusted_soft_ce(logits: torch.Tensor, targets: torch.Tensor, log_prior: torch.Tensor | None) -> torch.Tensor:
    """Mean over rows of −Σ_k ỹ_k · log softmax(logits + log P_Y)_k, in float32 (the paper's Eq. 5).

    logits: (N, C) raw classifier outputs; targets: (N, C) soft labels, rows summing to 1 (`soft_targets`);
    log_prior: (C,) from `log_class_prior`, or None for plain soft cross-entropy. The prior is added in
    training only: at test time the prediction is argmax of the raw logits.

    >>> import torch, mixtail
    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    >>> targets = mixtail.soft_targets(torch.tensor([0, 1]), torch.tensor([1, 1]), torch.tensor([0.7, 1.0]), 2)
    >>> ce = mixtail.logit_adjusted_soft_ce(logits, targets, mixtail.log_class_prior([90, 10]))
    >>> round(ce.item(), 4)  # the rare class 1 carries most of the targets: adjusted, it costs more
    1.3676
    >>> round(mixtail.logit_adjusted_soft_ce(logits, targets, None).item(), 4)  # no adjustment
    0.5201
    """
    logits = logits.float()
    if log_prior is not None:
        logits = logits + log_prior
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


def mean_mix_ratio(mix) -> float:
    """E[λ'] of the normalized ratio λ' = lo + (hi − lo)·Beta(α, α): the midpoint (Beta(α, α) is symmetric).
    The pasted area rounds the box to whole pixels, which moves E[λ] by well under a percent at 32 px."""
    lo, hi = mix.ratio_range
    return lo + (hi - lo) * 0.5


def mixed_prior(counts: np.ndarray, fg_class_probs: np.ndarray, mean_lam: float, mix_prob: float) -> np.ndarray:
    """π(k) = p·(E[λ]·q(k) + (1 − E[λ])·P_Y(k)) + (1 − p)·P_Y(k): the marginal of the soft labels ỹ when a
    pair is mixed with probability p, its foreground drawn with class probabilities q and its background
    uniformly (loss.prior=mixed; docs/method.md, "Logit adjustment and the mixed prior")."""
    counts = np.asarray(counts, dtype=np.float64)
    p_y = counts / counts.sum()
    q = np.asarray(fg_class_probs, dtype=np.float64)
    return mix_prob * (mean_lam * q + (1 - mean_lam) * p_y) + (1 - mix_prob) * p_y


def log_prior_vector(prior: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """log of a class distribution as float32 on `device`; an empty class counts as a tenth of the smallest."""
    prior = np.asarray(prior, dtype=np.float64)
    floor = prior[prior > 0].min() / 10 if (prior > 0).any() else 1.0
    return torch.from_numpy(np.log(np.maximum(prior, floor))).float().to(device)


def soft_targets(y_f: torch.Tensor, y_b: torch.Tensor, lam: torch.Tensor, num_classes: int) -> torch.Tensor:
    """ỹ = λ·onehot(y_f) + (1 − λ)·onehot(y_b): (B, C) float32. Built with scatter_add, which never reads the
    labels back to the host (a CUDA graph cannot hold a synchronization; one_hot's range check is one).

    >>> import torch, mixtail
    >>> mixtail.soft_targets(torch.tensor([0, 2]), torch.tensor([1, 2]), torch.tensor([0.25, 1.0]), 3)
    tensor([[0.2500, 0.7500, 0.0000],
            [0.0000, 0.0000, 1.0000]])
    """
    lam = lam.float()[:, None]
    target = torch.zeros(y_f.shape[0], num_classes, device=lam.device)
    target.scatter_add_(1, y_f[:, None], lam)
    return target.scatter_add_(1, y_b[:, None], 1 - lam)
