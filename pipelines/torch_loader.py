"""The in-memory torch loader: small datasets (CIFAR scale) as uint8 tensors on the training device.

Sampling indices are drawn once per epoch (`sampling.sample_order`), each batch's random parameters on
the host from a generator seeded by (seed, epoch, rank, batch), and everything else (gathering images,
per-component augmentation, resize-and-paste, normalization) runs batched on the device. No worker
processes and no per-image Python.

    python -m mixtail.pipelines.torch_loader            # time the demo set on this machine's device
"""

from __future__ import annotations


import torch

from mixtail.pipelines.base import Batch, normalize_views, rank_batch_size
from mixtail.pipelines.datasets import ImageArrays, build_dataset
from mixtail.pipelines.mixing import mix_views, mixing_active, sample_batch_params
from mixtail.pipelines.sampling import (batch_generator, batches_per_epoch, class_counts, foreground_weights,
                                        sample_order, samples_per_rank)


class TorchLoader:
    def __init__(self, dataset: ImageArrays, *, train: bool, batch_size: int, aug, mix, num_views: int,
                 fg_sampling: str, fg_gamma: float, mean, std, rank: int, world_size: int,
                 device: torch.device, seed: int, channels_last: bool = True):
        n, h, w, c = dataset.images.shape
        if h != w or c != 3:
            raise ValueError(f"the torch loader needs square RGB images, got (N, H, W, C) = {dataset.images.shape}")
        self.size = h
        self.train = train
        self.batch_size = batch_size
        self.aug, self.mix, self.num_views = aug, mix, num_views
        self.mean, self.std, self.channels_last = mean, std, channels_last
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device = torch.device(device)
        self.num_classes = len(dataset.classes)
        self.classes = dataset.classes
        self.class_counts = class_counts(dataset.labels, self.num_classes)
        self.num_samples = n
        # (N, 3, H, W) uint8 on the device: 50k CIFAR images are 150 MB.
        self.images = torch.from_numpy(dataset.images).to(self.device).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.from_numpy(dataset.labels).to(self.device)
        self.fg_weights = foreground_weights(dataset.labels, self.num_classes, fg_sampling, fg_gamma)
        if train and samples_per_rank(n, world_size) < batch_size:
            raise ValueError(f"{n} training images over {world_size} ranks do not fill one batch of {batch_size}")
        self.epoch, self.start_batch = 0, 0

    @classmethod
    def from_config(cls, data, aug, mix, *, split: str, rank: int, world_size: int, device, seed: int):
        from mixtail.pipelines.config import normalization

        dataset = build_dataset(data, split)
        if dataset.images.shape[1] != data.image_size:
            raise ValueError(f"{data.dataset} images are {dataset.images.shape[1]} px but data.image_size is "
                             f"{data.image_size}; the torch loader trains at the stored size")
        mean, std = normalization(data)
        train = split == "train"
        return cls(dataset, train=train, batch_size=rank_batch_size(data, split, world_size),
                   aug=aug, mix=mix, num_views=data.num_views, fg_sampling=data.fg_sampling,
                   fg_gamma=data.fg_gamma, mean=mean, std=std, rank=rank, world_size=world_size,
                   device=device, seed=seed)

    def __len__(self) -> int:
        return batches_per_epoch(self.num_samples, self.batch_size, rank=self.rank, world_size=self.world_size,
                                 train=self.train)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        return self._train_batches() if self.train else self._test_batches()

    def _train_batches(self):
        kw = dict(epoch=self.epoch, seed=self.seed, rank=self.rank, world_size=self.world_size,
                  num_samples=self.num_samples)
        bg_order = torch.from_numpy(sample_order(None, **kw)).to(self.device)
        fg_order = torch.from_numpy(sample_order(self.fg_weights, **kw)).to(self.device)
        mixing_on = mixing_active(self.mix, self.epoch, None)
        bs = self.batch_size
        for b in range(self.start_batch, len(self)):
            rng = batch_generator(self.seed, self.epoch, self.rank, b)
            params = sample_batch_params(rng, bs, self.size, self.aug, self.mix, mixing_on, self.num_views)
            fg_idx, bg_idx = fg_order[b * bs:(b + 1) * bs], bg_order[b * bs:(b + 1) * bs]
            views = mix_views(self.images[fg_idx], self.images[bg_idx], params, self.size)
            mixed = torch.from_numpy(params.mix.mixed).to(self.device, non_blocking=True)
            y_b = self.labels[bg_idx]
            y_f = torch.where(mixed, self.labels[fg_idx], y_b)  # an unmixed sample is its background
            lam = torch.from_numpy(params.mix.lam).to(self.device, non_blocking=True)
            yield Batch(normalize_views(views, self.mean, self.std, self.channels_last), y_f, y_b, lam)
        self.start_batch = 0

    def _test_batches(self):
        idx_all = torch.arange(self.rank, self.num_samples, self.world_size, device=self.device)
        for b in range(self.start_batch, len(self)):
            idx = idx_all[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.images[idx].float() / 255.0
            y = self.labels[idx]
            yield Batch(normalize_views([x], self.mean, self.std, self.channels_last), y, y,
                        torch.ones(len(idx), device=self.device))
        self.start_batch = 0


def main() -> None:
    import time

    from mixtail.trainer.config import load_config

    cfg = load_config("demo")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = TorchLoader.from_config(cfg.data, cfg.aug, cfg.mix, split="train", rank=0, world_size=1,
                                     device=device, seed=0)
    for epoch in range(3):
        loader.set_epoch(epoch)
        t0, n = time.perf_counter(), 0
        for batch in loader:
            n += batch.y_f.numel()
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"epoch {epoch}: {n / (time.perf_counter() - t0):,.0f} mixed pairs/s on {device}")


if __name__ == "__main__":
    main()
