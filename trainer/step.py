"""One training step of SMC, eager or captured as a CUDA graph: forward of both views, L = logit-adjusted
soft CE + η·SMC (the paper's Eq. 5-6), backward, momentum SGD with the learning rate as a device tensor, and a
device-side record of non-finite values, so the host never has to synchronize per step.

    step = TrainStep(model, sgd, objective, cuda_graphs=False)
    parts = step(batch, lr)           # (3,) device tensor: loss, ce, smc (detached)
    step.health.check()               # where the loop synchronizes anyway: raises or warns on NaN/inf

`SGD` is torch.optim.SGD's update rule (coupled weight decay, momentum, optional Nesterov) written with
foreach ops and a 0-dim lr tensor: the same code runs eagerly and inside a graph, and the learning-rate
schedule is a `fill_` of that tensor, never a Python float baked into a capture. tests/test_step.py checks a
step against torch.optim.SGD and an independent recomputation of the loss.

CUDA graphs (train.cuda_graphs): the CIFAR step is launch-bound (ResNet-32 at 256 images ran at 8.7k img/s
eager and 27.9k under graphs on an H100), so it is captured once per batch kind, after
warm-up iterations whose effects on the weights, the momentum and the BatchNorm statistics are undone, so a
graphed run follows the eager run's trajectory. A batch that carries a `PlanRender` (the torch executor's)
is captured together with the loader's on-device work: the graph's one input is the plan's table, and the
gather, augmentation, paste and normalization replay inside it; its kind is the render's key. Other batches
(DALI, FFCV, AutoAugment plans) are captured from their finished tensors, one graph per mixed or unmixed
batch. Each step copies its input into the static buffers and replays. Graph capture needs CUDA: on the
CPU, tests run the same static-buffer path through `StaticReplay`, which replays the captured function
without a graph, and tests on a GPU check the graph itself.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

from mixtail.errors import MixtailError
from mixtail.kernels import distributed_smc_loss
from mixtail.trainer.losses import soft_targets
from mixtail.trainer.losses import logit_adjusted_soft_ce


class NonFiniteError(MixtailError, FloatingPointError):
    """The loss or the weights went NaN/inf; the message names the epoch, step, batch and the loss part."""


# --------------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------------


class SGD:
    """Momentum SGD with torch.optim.SGD's rule and a 0-dim device lr:

        d = g + wd·p;  buf = momentum·buf + d  (buf starts at 0, so the first buf is d, as torch's);
        p -= lr · (d + momentum·buf if nesterov else buf)

    `step(lr, keep)`: with `keep` a 0-dim bool tensor, a False leaves parameters and momentum untouched
    (the skip policy for non-finite steps), decided on the device.
    """

    def __init__(self, params, *, momentum: float, weight_decay: float, nesterov: bool = False):
        self.params = [p for p in params if p.requires_grad]
        self.momentum, self.weight_decay, self.nesterov = momentum, weight_decay, nesterov
        self.buffers = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        params = [p for p in self.params if p.grad is not None]
        bufs = [b for p, b in zip(self.params, self.buffers) if p.grad is not None]
        grads = [p.grad for p in params]
        d = torch._foreach_add(grads, params, alpha=self.weight_decay) if self.weight_decay else grads
        if self.momentum:
            new_bufs = torch._foreach_mul(bufs, self.momentum)
            torch._foreach_add_(new_bufs, d)
            update = torch._foreach_add(d, new_bufs, alpha=self.momentum) if self.nesterov else new_bufs
        else:
            new_bufs, update = None, d
        steps = torch._foreach_mul(update, -lr)
        if keep is None:
            torch._foreach_add_(params, steps)
            if new_bufs is not None:
                for b, nb in zip(bufs, new_bufs):
                    b.copy_(nb)
            return
        # where() selects, so NaNs in the rejected branch never reach the weights.
        for p, s in zip(params, steps):
            p.copy_(torch.where(keep, p + s, p))
        if new_bufs is not None:
            for b, nb in zip(bufs, new_bufs):
                b.copy_(torch.where(keep, nb, b))

    def state_dict(self) -> dict:
        return {"momentum_buffers": [b.detach().cpu().clone() for b in self.buffers],
                "momentum": self.momentum, "weight_decay": self.weight_decay, "nesterov": self.nesterov}

    def load_state_dict(self, state: dict) -> None:
        saved = state["momentum_buffers"]
        if len(saved) != len(self.buffers):
            raise ValueError(f"the checkpoint has {len(saved)} momentum buffers, the model {len(self.buffers)}")
        for b, s in zip(self.buffers, saved):
            b.copy_(s)


# --------------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------------


@dataclass
class Objective:
    """L = CE(f(x̃) + log prior, ỹ) + η·SMC(z; y_f, y_b, λ) over the V views of a batch."""

    num_classes: int
    log_prior: torch.Tensor | None  # (C,) on the device; updated in place when the prior changes (loss.prior=mixed)
    eta: float
    tau: float
    weighting: str
    impl: str
    autocast: contextlib.AbstractContextManager

    def __call__(self, model, images: torch.Tensor, y_f: torch.Tensor, y_b: torch.Tensor, lam: torch.Tensor):
        """(loss, ce, smc) as 0-dim float32 tensors."""
        v = images.shape[0] // y_f.shape[0]
        with self.autocast:
            logits, z = model(images)
        ce = logit_adjusted_soft_ce(logits, soft_targets(y_f, y_b, lam, self.num_classes).repeat(v, 1), self.log_prior)
        if self.eta == 0:
            smc = ce.new_zeros(())  # plain (LA-)CE baselines do not pay for the contrastive term
        else:
            # z stays in the model's dtype (bf16 under autocast): the fused kernel accumulates in fp32.
            smc = distributed_smc_loss(z, y_f.repeat(v), y_b.repeat(v), lam.repeat(v), tau=self.tau,
                                       weighting=self.weighting, impl=self.impl)
        return ce + self.eta * smc, ce, smc.float()


# --------------------------------------------------------------------------------------------------
# Non-finite values, tracked on the device
# --------------------------------------------------------------------------------------------------


PARTS = ("loss", "ce", "smc")


class Health:
    """Device-side record of non-finite steps since the last check: no host sync per step.

    `record(parts)` after each step; `check(policy, describe)` where the loop synchronizes anyway
    (logging, checkpoints, epoch ends). policy "stop" raises NonFiniteError naming the first bad step and the
    loss parts that were non-finite; "skip" warns with the number of skipped steps (the steps themselves were
    not applied: TrainStep passes `keep` to the optimizer).
    """

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # step index of the first bad step
        self.bad_parts = torch.zeros(len(PARTS), dtype=torch.bool, device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.step_index = torch.zeros((), dtype=torch.int64, device=device)

    def record(self, parts: torch.Tensor) -> torch.Tensor:
        """Returns the 0-dim `ok` flag of this step (all parts finite)."""
        finite = torch.isfinite(parts)
        ok = finite.all()
        self.bad_parts |= ~finite
        self.first_bad.copy_(torch.where((~ok) & (self.first_bad < 0), self.step_index, self.first_bad))
        self.skipped += (~ok).long()
        self.step_index += 1
        return ok

    def sync_step(self, step: int) -> None:
        """Set the device step counter (after a resume)."""
        self.step_index.fill_(step)

    def check(self, policy: str, describe) -> None:
        """Read the record (one sync). describe(step) -> str names the epoch, step and batch of a step."""
        first = int(self.first_bad)
        if first < 0:
            return
        parts = [name for name, bad in zip(PARTS, self.bad_parts.tolist()) if bad]
        skipped = int(self.skipped)
        self.first_bad.fill_(-1)
        self.bad_parts.zero_()
        self.skipped.zero_()
        if policy == "stop":
            raise NonFiniteError(f"non-finite {', '.join(parts)} at {describe(first)}; the run stops before any "
                                 f"checkpoint holds it (train.on_nonfinite=skip skips such steps instead)")
        warnings.warn(f"skipped {skipped} step(s) with non-finite {', '.join(parts)}, the first at {describe(first)}",
                      RuntimeWarning, stacklevel=2)


# --------------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------------


class TrainStep:
    """zero_grad → objective → backward → SGD, on a Batch; returns (3,) [loss, ce, smc], detached.

    model: what runs the forward (the DDP wrapper under DDP); sgd: over the raw model's parameters;
    skip_nonfinite: apply a step only when every loss part is finite (decided on the device).
    accumulate: k > 1 sums the gradients of k batches (each loss scaled by 1/k) before one SGD step; under
    DDP the first k − 1 backward passes run in `no_sync()`, so gradients are all-reduced once per step. Call
    `flush()` at the end of an epoch to apply a partial group. (The SMC loss is per batch: accumulation gives
    k batches of negatives, not one batch of k times the size.)
    """

    def __init__(self, model, sgd: SGD, objective: Objective, *, health: Health, skip_nonfinite: bool = False,
                 cuda_graphs: bool = False, state_modules=(), accumulate: int = 1, graph_loader: bool = True):
        self.model, self.sgd, self.objective, self.health = model, sgd, objective, health
        self.skip_nonfinite = skip_nonfinite
        device = sgd.params[0].device
        self.lr = torch.zeros((), dtype=torch.float32, device=device)
        if cuda_graphs and device.type != "cuda":
            raise ValueError("train.cuda_graphs needs a CUDA device")
        if cuda_graphs and accumulate > 1:
            raise ValueError("train.cuda_graphs captures whole steps: it cannot accumulate gradients")
        self.cuda_graphs = cuda_graphs
        self._capture = CapturedStep if cuda_graphs else None  # CPU tests put StaticReplay here
        self.graph_loader = graph_loader  # capture a batch's PlanRender with the step (train.graph_loader)
        self.accumulate = accumulate
        self._pending = 0  # batches whose gradients wait for the next SGD step
        self._ok = torch.ones((), dtype=torch.bool, device=device)  # every part of the pending batches finite
        self._graphs: dict[tuple, CapturedStep] = {}
        self._state_modules = list(state_modules)  # whose buffers (BatchNorm statistics) warm-up must not change

    def _eager(self, images, y_f, y_b, lam) -> torch.Tensor:
        self.sgd.zero_grad()
        loss, ce, smc = self.objective(self.model, images, y_f, y_b, lam)
        loss.backward()
        parts = torch.stack([loss.detach(), ce.detach(), smc.detach()])
        ok = self.health.record(parts)
        self.sgd.step(self.lr, keep=ok if self.skip_nonfinite else None)
        return parts

    def _accumulating(self, images, y_f, y_b, lam) -> torch.Tensor:
        if self._pending == 0:
            self.sgd.zero_grad()
            self._ok.fill_(True)
        last = self._pending + 1 == self.accumulate
        no_sync = getattr(self.model, "no_sync", None)
        with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
            loss, ce, smc = self.objective(self.model, images, y_f, y_b, lam)
            (loss / self.accumulate).backward()
        parts = torch.stack([loss.detach(), ce.detach(), smc.detach()])
        self._ok &= self.health.record(parts)
        self._pending += 1
        if last:
            self.flush()
        return parts

    @property
    def pending(self) -> int:
        """Batches whose gradients wait for the next SGD step (0: the weights are those of a whole step)."""
        return self._pending

    def flush(self) -> None:
        """Apply the gradients of a partial accumulation group (nothing pending: nothing to do)."""
        if self._pending:
            if self._pending < self.accumulate:  # each loss was scaled by 1/k: make it the mean of what ran
                grads = [p.grad for p in self.sgd.params if p.grad is not None]
                torch._foreach_mul_(grads, self.accumulate / self._pending)
            self.sgd.step(self.lr, keep=self._ok if self.skip_nonfinite else None)
            self._pending = 0

    def __call__(self, batch, lr: float) -> torch.Tensor:
        self.lr.fill_(lr)
        if self.accumulate > 1:
            return self._accumulating(batch.images, batch.y_f, batch.y_b, batch.lam)
        if self._capture is None:
            return self._eager(batch.images, batch.y_f, batch.y_b, batch.lam)
        render = getattr(batch, "render", None) if self.graph_loader else None
        if render is not None:  # the loader's work joins the graph: its one input is the plan table
            kind = ("render", *render.key)
            if kind not in self._graphs:
                self._graphs[kind] = self._capture(self, [render.table], lambda table: self._eager(*render.fn(table)))
            return self._graphs[kind].run([render.table])
        # The batch length is part of the kind: a kept short last batch (data.drop_last false) is its own graph.
        kind = ("tensors", bool(batch.plan.mixed) if batch.plan is not None else True, batch.y_f.shape[0])
        tensors = [batch.images, batch.y_f, batch.y_b, batch.lam]
        if kind not in self._graphs:
            self._graphs[kind] = self._capture(self, tensors, self._eager)
        return self._graphs[kind].run(tensors)


class CapturedStep:
    """One CUDA graph of `body(*inputs)` (a whole step, TrainStep._eager after any loader work) on static
    input buffers shaped like `example`; `run(inputs)` copies them in and replays."""

    def __init__(self, step: TrainStep, example: list[torch.Tensor], body, warmup: int = 3):
        self.step = step
        self.inputs = [t.detach().clone(memory_format=torch.preserve_format) for t in example]
        snapshot = self._snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):  # allocations, cuDNN/Triton autotuning, lazy state: outside the capture
                body(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self._restore(snapshot)
        step.sgd.zero_grad()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.parts = body(*self.inputs)

    def _snapshot(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        tensors = list(self.step.sgd.params) + list(self.step.sgd.buffers)
        for m in self.step._state_modules:
            tensors += list(m.buffers())
        h = self.step.health
        tensors += [h.first_bad, h.bad_parts, h.skipped, h.step_index]
        return [(t, t.detach().clone()) for t in tensors]

    @staticmethod
    @torch.no_grad()
    def _restore(snapshot) -> None:
        for t, saved in snapshot:
            t.copy_(saved)  # in place: the graph keeps pointing at these tensors

    def run(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        for dst, src in zip(self.inputs, inputs):
            dst.copy_(src, non_blocking=True)
        self.graph.replay()
        return self.parts.clone()


class StaticReplay:
    """CapturedStep's contract without a graph, for the CPU: static input buffers, copied into on every
    run, and the same body replayed on them. What it checks is the graph path's plumbing (one table in,
    the body rebuilt only from the static buffers, a body per kind); the capture itself needs CUDA."""

    def __init__(self, step: TrainStep, example: list[torch.Tensor], body):
        self.inputs = [t.detach().clone(memory_format=torch.preserve_format) for t in example]
        self.body = body

    def run(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        for dst, src in zip(self.inputs, inputs):
            dst.copy_(src)
        return self.body(*self.inputs).clone()
