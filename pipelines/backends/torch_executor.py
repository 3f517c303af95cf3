"""The in-memory torch executor: small datasets (CIFAR scale) as uint8 tensors on the training device.

The images live on the device once; each batch plan (pipelines/plan.py) arrives there as one table, and
everything else (gathering images, per-component augmentation, resize-and-paste, normalization) runs batched
on the device, by the same reference ops (mixing.render_views) every other backend is tested against. No
worker processes and no per-image Python. Photos of varied sizes sit on a fixed canvas with their valid
size (datasets.ImageArrays.sizes), so crop windows keep each photo's own aspect ratio.

A training batch is handed out as a `PlanRender` (pipelines/batch.py): a function of the plan's device table
alone, which a CUDA-graphed step captures together with the forward, backward and SGD (trainer/step.py), so
the gather, augmentation, paste and normalization launch nothing outside the graph. AutoAugment and
cmo_randaug plans are the exception: which images take which op is read from the host plan
(pipelines/ops/autoaugment.py), so those batches are made eagerly, before the step.

    mixtail bench loader --backend torch --device cpu --num-photos 32 --size 64 --batch-size 16   # time it
"""

from __future__ import annotations

import functools
from typing import Iterator

import numpy as np
import torch

from mixtail.pipelines.batch import Batch, BatchTensors, PlanRender, normalize_views
from mixtail.pipelines.ops.mixing import render_plan
from mixtail.pipelines.plan import BatchPlan, DevicePlan
from mixtail.pipelines.sources.types import ImageArrays


class TorchExecutor:
    """Executes plans on images held in device memory (see the module docstring)."""

    def __init__(self, dataset: ImageArrays, *, device: torch.device | str, image_size: int, mean, std,
                 train: bool, channels_last: bool = True):
        if dataset.images.shape[-1] != 3:
            raise ValueError(f"the torch backend needs RGB images, got (N, H, W, C) = {dataset.images.shape}")
        self.device = torch.device(device)
        self.image_size = image_size
        # On the device once: normalizing then builds no tensor from host data (PlanRender's rule).
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)
        self.channels_last = channels_last
        self.train = train
        # (N, 3, H, W) uint8 on the device: 50k CIFAR images are 150 MB.
        self.images = torch.from_numpy(dataset.images).to(self.device).permute(0, 3, 1, 2).contiguous()
        sizes = getattr(dataset, "sizes", None)
        self.sizes = None if sizes is None else torch.from_numpy(np.asarray(sizes, np.int32)).to(self.device)

    def batches(self, stream, count: int) -> Iterator[Batch]:
        for _ in range(count):
            yield self.run(next(stream))

    def reset(self) -> None:
        pass

    def close(self) -> None:
        pass

    def run(self, plan: DevicePlan) -> Batch:
        return self._train_batch(plan) if self.train else self._test_batch(plan)

    def _train_batch(self, plan: DevicePlan) -> Batch:
        make = functools.partial(self._train_tensors, plan.host)
        if plan.layout.carries_policy:  # host-chosen rows: not capturable
            return Batch(*make(plan.table), plan=plan.host)
        # The key says which body renders the table; its length too, so a kept short last batch (data.drop_last
        # false) gets its own captured graph.
        return Batch(plan=plan.host, render=PlanRender((plan.mixed, plan.colour, len(plan)), plan.table, make))

    def _train_tensors(self, host: BatchPlan, table: torch.Tensor) -> BatchTensors:
        """The batch of the plan whose host side is `host` and whose device table is `table` (any plan with
        the same render key: a replayed graph passes the static copy of a later plan's table)."""
        plan = DevicePlan(host, table)
        views = render_plan(plan, self.images, out_size=self.image_size, sizes=self.sizes)
        images = normalize_views(views, self.mean, self.std, self.channels_last)
        return images, plan["y_f"].long(), plan["y_b"].long(), plan["lam"].float()

    def _test_batch(self, plan: DevicePlan) -> Batch:
        views = render_plan(plan, self.images, out_size=self.image_size, sizes=self.sizes)
        y = plan["y"].long()
        return Batch(normalize_views(views, self.mean, self.std, self.channels_last), y, y,
                     torch.ones(len(y), device=self.device), plan=plan.host)
