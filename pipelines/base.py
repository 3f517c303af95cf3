"""The loader interface the trainer sees, and `build_loader`, which composes a planner and a backend.

The trainer only sees `Loader` and `Batch`; it never branches on the backend. Every backend is an
executor of batch plans (pipelines/plan.py) behind the one loader class of pipelines/loader.py. A backend
module imports its heavy library (DALI, FFCV) inside itself, so `import mixtail.pipelines` works on any
machine.

    loader = build_loader(cfg.data, cfg.aug, cfg.mix, split="train", rank=0, world_size=1,
                          device=torch.device("cpu"), seed=0, num_epochs=cfg.train.epochs)
    loader.set_epoch(0)
    for batch in loader:            # Batch(images, y_f, y_b, lam) on the device
        ...
    planner = build_planner(labels, cfg.data, cfg.aug, cfg.mix, split="train")   # plans without a loader
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from mixtail.errors import ConfigError, check_int

if TYPE_CHECKING:
    from mixtail.pipelines.loader import Loader
    from mixtail.pipelines.plan import Planner

BatchTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # images, y_f, y_b, lam


@dataclass(frozen=True)
class PlanRender:
    """How an executor makes a batch from its plan's device table, as one function the step can capture.

    fn(table) -> (images, y_f, y_b, lam) reads nothing but `table` (the plan on the device, one static
    (B, K) float32 tensor) and tensors the executor holds, never reads a value back to the host and never
    builds a tensor from host data: a CUDA graph can hold it together with the training step (issue 8).
    key: the plan's host-side structure that fn was built for (mixed or not, colour or not); plans with
    equal keys run the same kernels on the same shapes, so one graph serves them all.
    """

    key: tuple
    table: torch.Tensor
    fn: Callable[[torch.Tensor], BatchTensors]


class Batch:
    """One batch on the training device.

    images: (V·B, 3, H, W) float32, normalized, channels_last; view v of pair b is row v·B + b.
    y_f, y_b: (B,) int64 foreground and background labels; lam: (B,) float32 foreground area ratio.
    Test batches have V = 1, y_f = y_b = the label and lam = 1.
    plan: the host BatchPlan this batch was built from (its indices name the samples in errors).
    render: set by executors whose on-device work can join the step's CUDA graph; the batch is then
    made from it the first time its tensors are read, so a graphed step that reads only `render` never
    runs that work outside its graph.

    >>> import torch, mixtail
    >>> batch = mixtail.Batch(torch.zeros(4, 3, 8, 8), torch.tensor([0, 1]), torch.tensor([2, 2]),
    ...                       torch.tensor([0.5, 1.0]))
    >>> batch.num_views  # 4 images for 2 pairs: rows 0-1 are view 0, rows 2-3 view 1
    2
    >>> batch.soft_targets(3)  # one row per image, the pair's soft label repeated for each view
    tensor([[0.5000, 0.0000, 0.5000],
            [0.0000, 1.0000, 0.0000],
            [0.5000, 0.0000, 0.5000],
            [0.0000, 1.0000, 0.0000]])
    """

    def __init__(self, images: torch.Tensor | None = None, y_f: torch.Tensor | None = None,
                 y_b: torch.Tensor | None = None, lam: torch.Tensor | None = None, plan: Any = None, *,
                 render: PlanRender | None = None):
        if images is None and render is None:
            raise ValueError("a Batch needs its tensors or a render that makes them")
        self._tensors = None if images is None else (images, y_f, y_b, lam)
        self.plan, self.render = plan, render

    def tensors(self) -> BatchTensors:
        if self._tensors is None:
            self._tensors = self.render.fn(self.render.table)
        return self._tensors

    def __deepcopy__(self, memo) -> "Batch":
        """A copy holds the batch's tensors (made now), not the executor its render would bring along."""
        return Batch(*(copy.deepcopy(t, memo) for t in self.tensors()), plan=copy.deepcopy(self.plan, memo))

    images = property(lambda self: self.tensors()[0])
    y_f = property(lambda self: self.tensors()[1])
    y_b = property(lambda self: self.tensors()[2])
    lam = property(lambda self: self.tensors()[3])

    @property
    def num_views(self) -> int:
        return self.images.shape[0] // self.y_f.shape[0]

    def soft_targets(self, num_classes: int) -> torch.Tensor:
        """ỹ = λ·onehot(y_f) + (1 − λ)·onehot(y_b), repeated for every view: (V·B, num_classes)."""
        return soft_targets(self.y_f, self.y_b, self.lam, num_classes).repeat(self.num_views, 1)


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


def normalize_views(views: list[torch.Tensor], mean, std, channels_last: bool = True) -> torch.Tensor:
    """Stack views into (V·B, 3, H, W), normalize with per-channel mean/std (sequences or (3,) tensors), and
    lay out channels_last."""
    x = torch.cat(views) if len(views) > 1 else views[0]
    # Tensors already on x's device are used as they are (no host copy: PlanRender.fn may call this).
    m = torch.as_tensor(mean, device=x.device, dtype=x.dtype)[None, :, None, None]
    s = torch.as_tensor(std, device=x.device, dtype=x.dtype)[None, :, None, None]
    x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def rank_batch_size(data, split: str, world_size: int) -> int:
    """Batch size on one rank: data.batch_size (global) split over the ranks for training, else eval's."""
    if split != "train":
        return data.eval_batch_size
    if data.batch_size % world_size:
        raise ConfigError(f"key 'data.batch_size': {data.batch_size} pairs do not divide over {world_size} ranks; "
                          f"use a multiple of {world_size}")
    return data.batch_size // world_size


def test_resize_ratio(data) -> float:
    """SPEC "Evaluation": the 224 px datasets resize the shorter side to S·8/7 and centre-crop S; CIFAR-scale
    data (S <= 64, the same rule as the normalization statistics) is used whole."""
    return 8.0 / 7.0 if data.image_size > 64 else 1.0


def build_loader(data, aug, mix, *, split: str, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", seed: int = 0, num_epochs: int | None = None,
                 channels_last: bool = True) -> "Loader":
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
    from mixtail.pipelines.datasets import SPLITS, build_dataset

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
                       channels_last: bool = True) -> "Loader":
    """The loader of an already built dataset (ImageArrays or ImageFiles); `data` gives batch sizes, views,
    sampling, normalization and the backend. build_loader is this after reading the dataset.

    Plans are drawn on each image's true size (ImageFiles.sizes, from the image check), whatever copy a
    backend holds, so every backend crops the same part of each photo; the torch backend decodes files into
    memory here (datasets.decode_in_memory).
    """
    from mixtail.pipelines.config import normalization
    from mixtail.pipelines.datasets import ImageFiles, decode_in_memory
    from mixtail.pipelines.loader import Loader
    from mixtail.pipelines.sampling import class_counts

    train = split == "train"
    device = torch.device(device)
    sizes = getattr(dataset, "sizes", None)  # true sizes of files; the valid canvas region of in-memory images
    if data.backend == "torch" and isinstance(dataset, ImageFiles):
        dataset = decode_in_memory(dataset, data.image_size, desc=f"decoding {split}")
    counts = class_counts(dataset.labels, len(dataset.classes))
    planner = build_planner(dataset.labels, data, aug, mix, split=split, sizes=sizes, num_classes=len(dataset.classes),
                            rank=rank, world_size=world_size, seed=seed, num_epochs=num_epochs)
    mean, std = normalization(data)
    common = dict(device=device, image_size=data.image_size, mean=mean, std=std, train=train,
                  mix_op=mix.mix_op, aug_order=mix.aug_order, num_views=data.num_views if train else 1,
                  channels_last=channels_last)
    if data.backend == "torch":
        from mixtail.pipelines.torch_loader import TorchExecutor

        executor = TorchExecutor(dataset, **common)
    elif data.backend == "dali":
        try:
            from mixtail.pipelines.dali_loader import DaliExecutor
        except ImportError as err:
            raise ConfigError(f"key 'data.backend': dali needs NVIDIA DALI: pip install 'mixtail[dali]' ({err})") from None
        executor = DaliExecutor(dataset, planner=planner, num_threads=data.num_threads, **common)
    elif data.backend == "ffcv":
        try:
            from mixtail.pipelines.ffcv_loader import FfcvExecutor
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

    from mixtail.pipelines.datasets import SPLITS

    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    check_shard(rank, world_size, seed)
    labels = np.asarray(labels)
    batch_size = rank_batch_size(data, split, world_size)
    if split != "train":  # val and test: one unaugmented view of every image, once
        return Planner.for_testing(labels, sizes, image_size=data.image_size, batch_size=batch_size, rank=rank,
                                   world_size=world_size, test_resize_ratio=test_resize_ratio(data))
    if samples_per_rank(len(labels), world_size) < batch_size:
        raise ConfigError(f"key 'data.batch_size': {len(labels)} training images over {world_size} ranks do not "
                          f"fill one batch of {batch_size} pairs per rank")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    return Planner.for_training(labels, sizes, aug=aug, mix=mix, image_size=data.image_size, batch_size=batch_size,
                                num_views=data.num_views,
                                fg_weights=foreground_weights(labels, num_classes, data.fg_sampling, data.fg_gamma),
                                seed=seed, rank=rank, world_size=world_size, num_epochs=num_epochs)
