"""The training objective: logit-adjusted soft cross-entropy + η·SMC (SPEC "Losses").

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
    """log P_Y(k) = log(n_k / N); a class with no training images is treated as having one."""
    counts = torch.as_tensor(np.asarray(counts), dtype=torch.float64).clamp(min=1)
    return (counts / counts.sum()).log().float().to(device)


def logit_adjusted_soft_ce(logits: torch.Tensor, targets: torch.Tensor, log_prior: torch.Tensor | None) -> torch.Tensor:
    """Mean over rows of −Σ_k ỹ_k · log softmax(logits + log P_Y)_k, in float32."""
    logits = logits.float()
    if log_prior is not None:
        logits = logits + log_prior
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
