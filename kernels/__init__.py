"""Loss kernels: `smc_loss` with a choice of implementation, beside the plain PyTorch reference.

    from mixtail.kernels import smc_loss, distributed_smc_loss
    loss = smc_loss(z, y_f, y_b, lam, tau=0.1, weighting="weighted", impl="auto")

impl: "reference" (kernels/reference.py), "triton" (kernels/smc_loss.py; on the CPU only with
TRITON_INTERPRET=1 set before this package is imported) or "auto" (Triton on CUDA, the reference elsewhere).
`distributed_smc_loss` (kernels/distributed.py) scores this rank's rows against the all-gathered batch.
"""

from __future__ import annotations

from mixtail.kernels.reference import WEIGHTINGS, smc_loss as reference_smc_loss
from mixtail.kernels.smc_loss import IMPLS, smc_loss
from mixtail.kernels.distributed import distributed_smc_loss

__all__ = ["smc_loss", "distributed_smc_loss", "reference_smc_loss", "WEIGHTINGS", "IMPLS"]
