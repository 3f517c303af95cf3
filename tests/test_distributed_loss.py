"""kernels/distributed.py on 2 gloo processes: each rank's gradients against one process on the whole batch.

    TRITON_INTERPRET=1 python -m pytest tests/test_distributed_loss.py -q

Each spawned rank holds 7 of the 14 rows. It checks, for the reference and the Triton (interpreter)
implementations and every weighting, the convention stated in kernels/distributed.py:
    - the mean over ranks of the returned local losses is the single-process loss;
    - each rank's local feature gradient is world_size × the single-process gradient of its rows;
    - parameters of a DDP-wrapped model get exactly the single-process gradient.
The ranks run in float64, so the comparisons are tight.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mixtail.kernels import WEIGHTINGS, distributed_smc_loss, smc_loss

WORLD = 2
ROWS = 7  # per rank
TOL = dict(rtol=1e-10, atol=1e-12)


def _global_batch(n: int, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    y_f = torch.randint(0, 3, (n,), generator=g)
    y_b = torch.randint(0, 3, (n,), generator=g)
    lam = 0.2 + 0.6 * torch.rand(n, generator=g, dtype=torch.float64)
    return z, y_f, y_b, lam


def _check_features(rank: int, impl: str, weighting: str) -> None:
    z, y_f, y_b, lam = _global_batch(WORLD * ROWS)
    rows = slice(rank * ROWS, (rank + 1) * ROWS)

    z_all = z.clone().requires_grad_()
    single = smc_loss(z_all, y_f, y_b, lam, weighting=weighting, impl=impl)
    (single_grad,) = torch.autograd.grad(single, z_all)

    z_local = z[rows].clone().requires_grad_()
    local = distributed_smc_loss(z_local, y_f[rows], y_b[rows], lam[rows], weighting=weighting, impl=impl)
    local.backward()

    mean = local.detach().clone()
    dist.all_reduce(mean)
    torch.testing.assert_close(mean / WORLD, single.detach(), **TOL)
    torch.testing.assert_close(z_local.grad, WORLD * single_grad[rows], **TOL)


def _check_ddp(rank: int, impl: str) -> None:
    z, y_f, y_b, lam = _global_batch(WORLD * ROWS, seed=1)
    x = torch.randn(WORLD * ROWS, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    torch.manual_seed(3)
    model = torch.nn.Linear(8, 16, dtype=torch.float64)
    reference = torch.nn.Linear(8, 16, dtype=torch.float64)
    reference.load_state_dict(model.state_dict())
    ddp = torch.nn.parallel.DistributedDataParallel(model)

    distributed_smc_loss(F.normalize(ddp(x[rows]), dim=1), y_f[rows], y_b[rows], lam[rows], impl=impl).backward()
    smc_loss(F.normalize(reference(x), dim=1), y_f, y_b, lam, impl=impl).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL)


def _worker(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for impl in ("reference", "triton"):
            for weighting in WEIGHTINGS:
                _check_features(rank, impl, weighting)
            _check_ddp(rank, impl)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process():
    # Spawned ranks inherit os.environ, including the TRITON_INTERPRET=1 that conftest.py set on a CPU.
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "pg_init"),), nprocs=WORLD, join=True)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_without_process_group_is_smc_loss(impl):
    assert not dist.is_initialized()
    z, y_f, y_b, lam = _global_batch(9)
    assert distributed_smc_loss(z, y_f, y_b, lam, impl=impl).item() == smc_loss(z, y_f, y_b, lam, impl=impl).item()
