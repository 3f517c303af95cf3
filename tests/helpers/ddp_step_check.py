"""Run by tests/test_step.py under `torchrun --nproc_per_node 2` (gloo): one TrainStep under DDP on each rank's
half of a fixed batch, then, on rank 0, the same step in one process on the concatenated batch.

Writes OUT/rank{r}.pt ({"loss", "grads", "weights"} after one step and weights after three) and OUT/single.pt.
The model has no batch statistics (BatchNorm statistics are per rank by design), so the two must agree.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/helpers/ddp_step_check.py OUT
"""

from __future__ import annotations

import contextlib
import gc
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from mixtail.trainer.models import SMCNet
from mixtail.trainer.step import SGD, Health, Objective, TrainStep

B, C, S = 8, 5, 6  # pairs per rank, classes, image side


def model() -> nn.Module:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * S * S, 16), nn.ReLU())
    return SMCNet(backbone, 16, C, head_dim=8)


def batch(rank_slice: slice):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 2 * B, 3, S, S, generator=g)  # (views, all pairs, ...)
    y_f = torch.randint(0, C, (2 * B,), generator=g)
    y_b = torch.randint(0, C, (2 * B,), generator=g)
    lam = torch.rand(2 * B, generator=g)

    class Batch:
        pass

    out = Batch()
    out.images = images[:, rank_slice].reshape(-1, 3, S, S)  # view-major rows, as the loaders make them
    out.y_f, out.y_b, out.lam, out.plan = y_f[rank_slice], y_b[rank_slice], lam[rank_slice], None
    return out


def run(net: nn.Module, wrapped: nn.Module, data, steps: int):
    objective = Objective(num_classes=C, log_prior=torch.log(torch.full((C,), 1.0 / C)), eta=0.5, tau=0.1,
                          weighting="weighted", impl="reference", autocast=contextlib.nullcontext())
    sgd = SGD(net.parameters(), momentum=0.9, weight_decay=1e-3)
    step = TrainStep(wrapped, sgd, objective, health=Health(torch.device("cpu")))
    first = None
    for i in range(steps):
        parts = step(data, 0.05)
        if i == 0:
            first = {"loss": parts[0].clone(), "grads": [p.grad.clone() for p in net.parameters()],
                     "weights": [p.detach().clone() for p in net.parameters()]}
    first["final"] = [p.detach().clone() for p in net.parameters()]
    return first


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    net = model()
    ddp = nn.parallel.DistributedDataParallel(net)
    result = run(net, ddp, batch(slice(rank * B, (rank + 1) * B)), steps=3)
    torch.save({"loss": result["loss"], "grads": result["grads"], "weights": result["final"]},
               out / f"rank{rank}.pt")
    # DDP's reducer holds the gloo group through reference cycles: freed only at interpreter shutdown, the
    # group's threads can abort the process ("terminate called without an active exception", SIGABRT, seen
    # once in CI on 2026-12-02; https://github.com/pytorch/pytorch/pull/179291 describes the teardown).
    del ddp
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:  # one process, the whole batch, no process group
        single_net = model()
        single = run(single_net, single_net, batch(slice(0, 2 * B)), steps=3)
        torch.save({"loss": single["loss"], "grads": single["grads"], "weights": single["final"]}, out / "single.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
