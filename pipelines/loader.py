"""The one loader: epochs, resume, prefetched plans and test sharding, over a backend's executor.

Every backend is an executor that turns batch plans (pipelines/plan.py) into `Batch`es; this class owns
everything around it, once, for all of them:

- length: `len(loader)` is the exact number of batches per epoch on this rank (the planner's);
- epochs and resume: `set_epoch(epoch, start_batch)` positions the next iteration; iterating delivers
  batches start_batch .. len − 1 of that epoch;
- prefetch: a `PlanStream` builds plans `prefetch` batches ahead on a side thread and, for executors that
  run on a torch device, copies each plan's table there in one transfer (from pinned memory on CUDA), so
  the training loop never waits for the host;
- the stream is endless (epoch e's last batch is followed by epoch e + 1's first), so an executor with its
  own lookahead (DALI's pipeline prefetch) keeps running across epoch boundaries; only a jump (a resume,
  or an epoch abandoned part-way) restarts the stream and resets the executor.

    loader = Loader(planner, TorchExecutor(...), classes=ds.classes, class_counts=counts)
    loader.set_epoch(3)
    for batch in loader:
        ...
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator, Protocol

import numpy as np
import torch

from mixtail.errors import check_int
from mixtail.pipelines.base import Batch
from mixtail.pipelines.plan import BatchPlan, DevicePlan, Planner


class Executor(Protocol):
    """A backend: turns the plans of a stream into batches."""

    device: torch.device | None  # where plans' tables should be copied to; None: the executor reads them on the host

    def batches(self, stream: "PlanStream", count: int) -> Iterator[Batch]: ...  # exactly `count` batches

    def reset(self) -> None: ...  # forget any lookahead taken from the previous stream

    def close(self) -> None: ...


def stage(plan: BatchPlan, device: torch.device | None) -> BatchPlan | DevicePlan:
    """A plan ready for its executor: its table copied to `device` in one transfer (pinned on CUDA)."""
    if device is None:
        return plan
    table = torch.from_numpy(plan.table)
    if device.type == "cuda":
        table = table.pin_memory()  # the copy below is then truly asynchronous
    return DevicePlan(plan, table.to(device, non_blocking=True))


class PlanStream:
    """An endless iterator of staged plans from (epoch, batch) on, built `depth` ahead on a side thread.

    Training streams run e, b → e, b + 1 → ... → e + 1, 0; test streams cycle over the one epoch.
    """

    def __init__(self, planner: Planner, epoch: int, batch: int, device: torch.device | None, depth: int = 2):
        self.planner, self.device = planner, device
        self.position = (epoch, batch)  # of the next plan submitted
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mixtail-plans")
        self._ahead: deque[Future] = deque()
        for _ in range(max(1, depth)):
            self._submit()

    def _successor(self, epoch: int, b: int) -> tuple[int, int]:
        if b + 1 < len(self.planner):
            return epoch, b + 1
        return (epoch + 1 if self.planner.train else 0), 0

    def _submit(self) -> None:
        epoch, b = self.position
        self._ahead.append(self._pool.submit(lambda: stage(self.planner.plan(epoch, b), self.device)))
        self.position = self._successor(epoch, b)

    def __iter__(self) -> "PlanStream":
        return self

    def __next__(self) -> BatchPlan | DevicePlan:
        plan = self._ahead.popleft().result()  # re-raises anything the planner raised
        self._submit()
        return plan

    def close(self) -> None:
        for f in self._ahead:
            f.cancel()
        self._ahead.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


class Loader:
    """The Loader interface (pipelines/base.py) over a planner and an executor; made by `build_loader`.

    `len(loader)` batches per epoch on this rank; `set_epoch(epoch, start_batch=0)` positions the next
    iteration (a resume passes the batch to start from); iterating yields `Batch`es on the device. Also
    `classes`, `num_classes`, `class_counts` (training images per class: the prior of the soft CE),
    `batch_size` (pairs per batch on this rank) and `planner`. `close()` stops its plan thread and backend.

    >>> import mixtail
    >>> cfg = mixtail.load_config("demo")
    >>> loader = mixtail.build_loader(cfg.data, cfg.aug, cfg.mix, split="test", device="cpu")
    >>> len(loader), int(loader.class_counts.sum())  # 1,000 test images in batches of 250
    (4, 1000)
    >>> loader.set_epoch(0, start_batch=3)  # resume: only the last batch of the epoch is left
    >>> [batch.y_f.shape[0] for batch in loader]
    [250]
    >>> loader.close()
    """

    def __init__(self, planner: Planner, executor: Executor, *, classes: list[str], class_counts: np.ndarray,
                 prefetch: int = 2, skipped: tuple[tuple[str, str], ...] = ()):
        self.planner, self.executor = planner, executor
        self.skipped = tuple(skipped)  # (path, reason) of each bad file data.on_error=skip left out
        self.train = planner.train
        self.batch_size = planner.batch_size
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.class_counts = np.asarray(class_counts)
        self.prefetch = prefetch
        self.epoch, self.start_batch = 0, 0
        self._stream: PlanStream | None = None
        self._next: tuple[int, int] | None = None  # (epoch, batch) the running stream delivers next

    def __len__(self) -> int:
        return len(self.planner)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        check_int("epoch", epoch, 0)
        check_int("start_batch", start_batch, 0)
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} is outside the {len(self)} batches of an epoch")
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch if self.train else 0
        first, count = self.start_batch, len(self) - self.start_batch
        self.start_batch = 0
        if count == 0:
            return
        if self._next != (epoch, first):
            self._restart(epoch, first)
        delivered = 0
        for batch in self.executor.batches(self._stream, count):
            delivered += 1
            # Updated as each batch is handed out, so a loop that stops early makes the next epoch restart.
            self._next = self._stream_position(epoch, first + delivered)
            yield batch

    def _stream_position(self, epoch: int, b: int) -> tuple[int, int]:
        if b < len(self):
            return epoch, b
        return (epoch + 1 if self.train else 0), 0

    def _restart(self, epoch: int, b: int) -> None:
        self.executor.reset()
        if self._stream is not None:
            self._stream.close()
        self._stream = PlanStream(self.planner, epoch, b, self.executor.device, depth=self.prefetch)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._next = None
        self.executor.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the libraries may already be gone
            pass
