"""The loader interface every backend implements, and `build_loader`, which picks the backend.

The trainer only sees `Loader` and `Batch`; it never branches on the backend. A backend module imports
its heavy library (DALI, FFCV) inside itself, so `import mixtail.pipelines` works on any machine.

    loader = build_loader(cfg.data, cfg.aug, cfg.mix, split="train", rank=0, world_size=1,
                          device=torch.device("cpu"), seed=0)
    loader.set_epoch(0)
    for batch in loader:            # Batch(images, y_f, y_b, lam) on the device
        ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch


@dataclass
class Batch:
    """One batch on the training device.

    images: (V·B, 3, H, W) float32, normalized, channels_last; view v of pair b is row v·B + b.
    y_f, y_b: (B,) int64 foreground and background labels; lam: (B,) float32 foreground area ratio.
    Test batches have V = 1, y_f = y_b = the label and lam = 1.
    """

    images: torch.Tensor
    y_f: torch.Tensor
    y_b: torch.Tensor
    lam: torch.Tensor

    @property
    def num_views(self) -> int:
        return self.images.shape[0] // self.y_f.shape[0]

    def soft_targets(self, num_classes: int) -> torch.Tensor:
        """ỹ = λ·onehot(y_f) + (1 − λ)·onehot(y_b), repeated for every view: (V·B, num_classes)."""
        lam = self.lam[:, None].float()
        one_hot = torch.nn.functional.one_hot
        target = lam * one_hot(self.y_f, num_classes) + (1 - lam) * one_hot(self.y_b, num_classes)
        return target.repeat(self.num_views, 1)


class Loader(Protocol):
    batch_size: int  # pairs per batch on this rank
    num_classes: int
    class_counts: np.ndarray  # training images per class (the prior P_Y and the shot groups come from it)

    def __len__(self) -> int: ...  # exact batches per epoch on this rank

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...

    def __iter__(self) -> Iterator[Batch]: ...


def normalize_views(views: list[torch.Tensor], mean, std, channels_last: bool = True) -> torch.Tensor:
    """Stack views into (V·B, 3, H, W), normalize with per-channel mean/std, and lay out channels_last."""
    x = torch.cat(views) if len(views) > 1 else views[0]
    m = torch.tensor(mean, device=x.device, dtype=x.dtype)[None, :, None, None]
    s = torch.tensor(std, device=x.device, dtype=x.dtype)[None, :, None, None]
    x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def rank_batch_size(data, split: str, world_size: int) -> int:
    """Batch size on one rank: data.batch_size (global) split over the ranks for training, else eval's."""
    if split != "train":
        return data.eval_batch_size
    if data.batch_size % world_size:
        raise ValueError(f"data.batch_size={data.batch_size} does not divide over {world_size} ranks")
    return data.batch_size // world_size


def build_loader(data, aug, mix, *, split: str, rank: int, world_size: int, device: torch.device, seed: int) -> Loader:
    """A loader for `split` ("train" or "test") of the dataset in `data` (a DataConfig), on its backend."""
    if data.backend == "torch":
        from mixtail.pipelines.torch_loader import TorchLoader

        return TorchLoader.from_config(data, aug, mix, split=split, rank=rank, world_size=world_size,
                                       device=device, seed=seed)
    if data.backend == "dali":
        try:
            from mixtail.pipelines.dali_loader import DaliLoader
        except ImportError as err:
            raise ImportError(f"data.backend=dali needs NVIDIA DALI: pip install 'mixtail[dali]' ({err})") from None
        return DaliLoader.from_config(data, aug, mix, split=split, rank=rank, world_size=world_size,
                                      device=device, seed=seed)
    raise ValueError(f"data.backend={data.backend!r} is not a known backend")
