"""The classic baseline: how most long-tailed recognition repositories train, written here, timed beside our loop.

What LDAM-DRW, CMO and their descendants do for a plain CE epoch, on the same images, model, batch size and
GPU as the run it is compared with:

- a torchvision-style `Dataset` that opens each image with PIL (decoding the file, or wrapping the in-memory
  array) and applies PIL transforms per image: RandomCrop(S, padding=aug.pad_px) + horizontal flip + ToTensor +
  Normalize at 32 px (CIFAR), RandomResizedCrop(S) + flip + ToTensor + Normalize above 64 px;
- a `DataLoader` with worker processes (shuffled, drop_last, pinned memory on CUDA). Its workers persist across
  epochs, which the repositories' loaders do not: that only makes this baseline faster than what it stands for;
- an eager fp32 step on one view: backbone + classifier (the same trainer/models.py network; the contrastive
  head is not run), plain cross-entropy, torch.optim.SGD with the run's lr, momentum and weight decay, with
  cudnn.benchmark on, as CMO's cifar_train.py sets it. Those scripts also read the loss back (`loss.item()`)
  and compute accuracy every step; this loop does neither, which again only flatters the baseline.

`mixtail bench train --baseline classic --workers 0 4 16` times it after our own loader + step, in the same
process, so every speed claim is a ratio measured in one run (benchmarks/bench_train.py).

    from mixtail.benchmarks.classic_baseline import bench_classic
    row = bench_classic(cfg, dataset, num_classes=10, device=device, workers=4, warmup=10, windows=5,
                        window_steps=20)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mixtail.benchmarks.bench_step import time_steps


def classic_transform(image_size: int, mean, std, pad_px: int = 4):
    """The per-image PIL pipeline of the classic repositories (see the module docstring)."""
    from torchvision import transforms as T

    if image_size <= 64:  # the CIFAR recipe, the same threshold as the normalization statistics (config.py)
        crop = [T.RandomCrop(image_size, padding=pad_px)]
    else:
        crop = [T.RandomResizedCrop(image_size)]
    return T.Compose([*crop, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


class ClassicDataset(torch.utils.data.Dataset):
    """(image tensor, label) per index over an ImageFiles (decoded by PIL every time) or ImageArrays dataset."""

    def __init__(self, dataset, transform):
        self.files = getattr(dataset, "files", None)
        self.images = getattr(dataset, "images", None)
        self.sizes = getattr(dataset, "sizes", None) if self.files is None else None
        self.labels = np.asarray(dataset.labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.files is not None:
            with Image.open(self.files[i]) as f:
                img = f.convert("RGB")
        else:
            arr = self.images[i]
            if self.sizes is not None:  # a photo on a canvas: its valid top-left region
                h, w = self.sizes[i]
                arr = arr[:h, :w]
            img = Image.fromarray(arr)
        return self.transform(img), int(self.labels[i])


class ClassicStep:
    """One eager fp32 CE step on one view with torch.optim.SGD (no autocast, no channels_last, no graphs)."""

    def __init__(self, cfg, num_classes: int, device: torch.device):
        from mixtail.trainer.models import build_model

        torch.manual_seed(cfg.train.seed)
        self.device = device
        self.model = build_model(cfg.model, num_classes).to(device).train()
        o = cfg.optim
        self.opt = torch.optim.SGD(self.model.parameters(), lr=o.lr, momentum=o.momentum,
                                   weight_decay=o.weight_decay, nesterov=o.nesterov)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        logits = self.model.classifier(self.model.features(images))
        loss = F.cross_entropy(logits, labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()


def classic_loader(cfg, dataset, *, workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    from mixtail.pipelines.config import normalization

    mean, std = normalization(cfg.data)
    ds = ClassicDataset(dataset, classic_transform(cfg.data.image_size, mean, std, cfg.aug.pad_px))
    return torch.utils.data.DataLoader(ds, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True,
                                       num_workers=workers, pin_memory=device.type == "cuda",
                                       persistent_workers=workers > 0,
                                       generator=torch.Generator().manual_seed(cfg.train.seed))


def _endless(loader):
    while True:
        yield from loader


def bench_classic(cfg, dataset, *, num_classes: int, device: torch.device, workers: int, warmup: int, windows: int,
                  window_steps: int) -> dict[str, Any]:
    """Images/s and the epoch time of the classic loop at steady state (warm-up covers the workers' start)."""
    loader = classic_loader(cfg, dataset, workers=workers, device=device)
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} images do not fill one batch of {cfg.data.batch_size}")
    step = ClassicStep(cfg, num_classes, device)
    batches = _endless(loader)

    def run_step() -> None:
        step(*next(batches))

    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # for this loop only: our own step runs with the default
    try:
        # Each worker fills its first prefetch_factor (2) batches before the loop reaches steady state.
        stats = time_steps(run_step, device=device, images_per_step=cfg.data.batch_size,
                           warmup=max(warmup, 2 * workers), windows=windows, window_steps=window_steps)
    finally:
        torch.backends.cudnn.benchmark = benchmark
        del batches, loader
    return {**stats, "steps_per_epoch": len(dataset) // cfg.data.batch_size}


__all__ = ["classic_transform", "ClassicDataset", "ClassicStep", "classic_loader", "bench_classic"]
