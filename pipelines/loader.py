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

`build_loader` composes a planner and a backend's executor from the typed configs; the trainer only sees
`Loader` and `Batch`, and never branches on the backend. A backend module imports its heavy library (DALI,
FFCV) inside itself, so `import mixtail.pipelines` works on any machine.

    loader = build_loader(cfg.data, cfg.aug, cfg.mix, split="train", rank=0, world_size=1,
                          device=torch.device("cpu"), seed=0, num_epochs=cfg.train.epochs)
    planner = build_planner(labels, cfg.data, cfg.aug, cfg.mix, split="train")   # plans without a loader
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator, Protocol

import numpy as np
import torch

from mixtail.errors import ConfigError, check_int
from mixtail.pipelines.batch import Batch
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

    def close(self, wait: bool = True) -> None:
        for f in self._ahead:
            f.cancel()
        self._ahead.clear()
        self._pool.shutdown(wait=wait, cancel_futures=True)


class Loader:
    """The one loader: a planner and an executor behind the Loader interface; made by `build_loader`.

    `len(loader)` batches per epoch on this rank; `set_epoch(epoch, start_batch=0)` positions the next
    iteration (a resume passes the batch to start from); iterating yields `Batch`es on the device. Also
    `classes`, `num_classes`, `class_counts` (training images per class: the prior of the soft CE),
    `batch_size` (pairs per batch on this rank), `planner` and `mixing_on(epoch)`. `close()` stops its plan
    thread and backend.

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

    def mixing_on(self, epoch: int) -> bool:
        """Whether `epoch` lies in the mixing window (a training loader): its planner's answer, the one place the
        window is decided, which the trainer's logit-adjustment prior follows too."""
        if not self.train:
            raise ValueError("a test or validation loader mixes nothing: ask the training loader")
        return self.planner.mixing_on(epoch)

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

    def close(self, wait: bool = True) -> None:
        if self._stream is not None:
            self._stream.close(wait)
            self._stream = None
        self._next = None
        self.executor.close()

    def __del__(self):
        # Never wait here: the garbage collector may run this inside another thread's start-up (threading's
        # _maintain_shutdown_locks), and joining the plan thread there deadlocks with the thread that started it.
        try:
            self.close(wait=False)
        except Exception:  # interpreter shutdown: the libraries may already be gone
            pass


def rank_batch_size(data, split: str, world_size: int) -> int:
    """Batch size on one rank: data.batch_size (global) split over the ranks for training, else eval's."""
    if split != "train":
        return data.eval_batch_size
    if data.batch_size % world_size:
        raise ConfigError(f"key 'data.batch_size': {data.batch_size} pairs do not divide over {world_size} ranks; "
                          f"use a multiple of {world_size}")
    return data.batch_size // world_size


def test_resize_ratio(data) -> float:
    """docs/method.md, "The test-time view": the 224 px datasets resize the shorter side to S·8/7 and
    centre-crop S; CIFAR-scale data (S <= 64, the same rule as the normalization statistics) is used whole."""
    return 8.0 / 7.0 if data.image_size > 64 else 1.0


def build_loader(data, aug, mix, *, split: str, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", seed: int = 0, num_epochs: int | None = None,
                 channels_last: bool = True) -> Loader:
    """A loader for `split` ("train", "val" or "test") of the dataset in `data` (a DataConfig), on its backend.
    A validation split (data.val_per_class) is read like the test split: one unaugmented view, every image once.

    data, aug, mix: the typed DataConfig, AugConfig and MixConfig (a RunConfig's sections). rank, world_size:
    this process's shard (DDP); data.batch_size is global and split over the ranks. seed: with (epoch, batch)
    it decides every batch, so the same arguments give the same batches on any backend. num_epochs: the run's
    length, which closes the mixing window (mix.unmixed_last_epochs); None leaves it open. The loader yields
    `Batch`es on `device`; `len(loader)` is the exact number of batches per epoch, and `loader.set_epoch(e)`
    picks the epoch the next iteration delivers.

    >>> import mixtail
    >>> cfg = mixtail.load_config("demo")
    >>> loader = mixtail.build_loader(cfg.data, cfg.aug, cfg.mix, split="train", device="cpu", seed=0,
    ...                               num_epochs=cfg.train.epochs)
    >>> len(loader), loader.num_classes, loader.batch_size
    (15, 10, 64)
    >>> loader.set_epoch(5)
    >>> batch = next(iter(loader))
    >>> batch.images.shape, batch.y_f.shape, batch.num_views
    (torch.Size([128, 3, 32, 32]), torch.Size([64]), 2)
    """
    from mixtail.pipelines.sources.build import build_dataset
    from mixtail.pipelines.sources.types import SPLITS

    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    check_shard(rank, world_size, seed)  # before the dataset is read
    dataset = build_dataset(data, split, decoded=False)
    return loader_for_dataset(dataset, data, aug, mix, split=split, rank=rank, world_size=world_size, device=device,
                              seed=seed, num_epochs=num_epochs, channels_last=channels_last)


def check_shard(rank, world_size, seed) -> None:
    """The arguments that place a loader or planner: a ValueError or TypeError naming the bad one."""
    check_int("world_size", world_size, 1)
    check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank must be below world_size ({world_size}), got {rank}")
    check_int("seed", seed, 0)


def loader_for_dataset(dataset, data, aug, mix, *, split: str, rank: int = 0, world_size: int = 1,
                       device: torch.device | str = "cpu", seed: int = 0, num_epochs: int | None = None,
                       channels_last: bool = True) -> Loader:
    """The loader of an already built dataset (ImageArrays or ImageFiles); `data` gives batch sizes, views,
    sampling, normalization and the backend. build_loader is this after reading the dataset.

    Plans are drawn on each image's true size (ImageFiles.sizes, from the image check), whatever copy a
    backend holds, so every backend crops the same part of each photo; the torch backend decodes files into
    memory here (datasets.decode_in_memory).
    """
    from mixtail.pipelines.config import normalization
    from mixtail.pipelines.sampling import class_counts
    from mixtail.pipelines.sources.folders import decode_in_memory
    from mixtail.pipelines.sources.types import ImageFiles

    train = split == "train"
    device = torch.device(device)
    sizes = getattr(dataset, "sizes", None)  # true sizes of files; the valid canvas region of in-memory images
    if data.backend == "torch" and isinstance(dataset, ImageFiles):
        dataset = decode_in_memory(dataset, data.image_size, desc=f"decoding {split}")
    counts = class_counts(dataset.labels, len(dataset.classes))
    planner = build_planner(dataset.labels, data, aug, mix, split=split, sizes=sizes, num_classes=len(dataset.classes),
                            rank=rank, world_size=world_size, seed=seed, num_epochs=num_epochs)
    mean, std = normalization(data)
    # How a plan's components combine (mix.aug_order, mix.mix_op, data.num_views) travels in the planner's
    # layout: each executor reads it there, never from an argument of its own.
    common = dict(device=device, image_size=data.image_size, mean=mean, std=std, train=train,
                  channels_last=channels_last)
    if data.backend == "torch":
        from mixtail.pipelines.backends.torch_executor import TorchExecutor

        executor = TorchExecutor(dataset, **common)
    elif data.backend == "dali":
        try:
            from mixtail.pipelines.backends.dali_executor import DaliExecutor
        except ImportError as err:
            raise ConfigError(f"key 'data.backend': dali needs NVIDIA DALI: pip install 'mixtail[dali]' ({err})") from None
        executor = DaliExecutor(dataset, planner=planner, num_threads=data.num_threads, **common)
    elif data.backend == "ffcv":
        try:
            from mixtail.pipelines.backends.ffcv_executor import FfcvExecutor
        except ImportError as err:
            raise ConfigError(f"key 'data.backend': ffcv needs FFCV: pip install 'mixtail[ffcv]' ({err})") from None
        executor = FfcvExecutor(dataset, planner=planner, num_threads=data.num_threads, **common)
    else:
        raise ConfigError(f"key 'data.backend': {data.backend!r} is not a known backend")
    return Loader(planner, executor, classes=dataset.classes, class_counts=counts,
                  skipped=getattr(dataset, "skipped", ()))


def build_planner(labels, data, aug, mix, *, split: str, sizes=None, num_classes: int | None = None, rank: int = 0,
                  world_size: int = 1, seed: int = 0, num_epochs: int | None = None) -> "Planner":
    """The batch planner (pipelines/plan.py) of `split` for a dataset with these labels, from the typed configs:
    the planner `build_loader` gives its backend, for drawing and rendering plans without a loader.

    labels: (N,) class ids; sizes: (N, 2) true (height, width) of each image, or None when every image is
    data.image_size square; num_classes: None takes max(labels) + 1. rank, world_size, seed, num_epochs: as
    for build_loader. `planner.plan(epoch, batch)` is then a pure function of its arguments.

    >>> import numpy as np, mixtail
    >>> cfg = mixtail.load_config("demo")
    >>> labels = np.repeat(np.arange(4), [40, 20, 10, 5])
    >>> planner = mixtail.build_planner(labels, cfg.data, cfg.aug, cfg.mix, split="train", seed=0)
    >>> len(planner), planner.batch_size
    (1, 64)
    >>> plan = planner.plan(epoch=5, batch=0)
    >>> plan["lam"].shape, plan["bg0.crop"].shape
    ((64,), (64, 4))
    """
    from mixtail.pipelines.plan import Planner
    from mixtail.pipelines.sampling import foreground_weights, samples_per_rank
    from mixtail.pipelines.sources.types import SPLITS

    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    check_shard(rank, world_size, seed)
    labels = np.asarray(labels)
    batch_size = rank_batch_size(data, split, world_size)
    if split != "train":  # val and test: one unaugmented view of every image, once
        return Planner.for_testing(labels, sizes, image_size=data.image_size, batch_size=batch_size, rank=rank,
                                   world_size=world_size, test_resize_ratio=test_resize_ratio(data))
    if samples_per_rank(len(labels), world_size) < (batch_size if data.drop_last else 1):
        raise ConfigError(f"key 'data.batch_size': {len(labels)} training images over {world_size} ranks do not "
                          f"fill one batch of {batch_size} pairs per rank")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    return Planner.for_training(labels, sizes, aug=aug, mix=mix, image_size=data.image_size, batch_size=batch_size,
                                num_views=data.num_views,
                                fg_weights=foreground_weights(labels, num_classes, data.fg_sampling, data.fg_gamma),
                                seed=seed, rank=rank, world_size=world_size, num_epochs=num_epochs,
                                drop_last=data.drop_last)
