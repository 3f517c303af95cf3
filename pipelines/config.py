"""The configs of the data side: what to read (`DataConfig`), how each component image is augmented
(`AugConfig`) and how pairs are mixed (`MixConfig`). They live beside the code that reads them; the run
config (trainer/config.py) composes them with the model, loss, optimizer and loop configs, and loads
all of them strictly from YAML.

Defaults are the paper's CIFAR-LT recipe with CMO's training strategy (docs/method.md, "Foreground sampling"
and "Mixing"): instance-weighted foregrounds, a whole batch mixed with probability 0.5, only inside the epoch
window [4, E − 3).

    from mixtail.pipelines.config import DataConfig, AugConfig, MixConfig
    DataConfig(dataset="demo").validate()
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from mixtail.errors import ConfigError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_IMAGE_SIZE = 1024  # data.image_size's upper bound (DataConfig.validate says why)

# The mixing choices a batch plan's layout records (pipelines/plan.py), so the executors read them there.
MixOp = Literal["resize", "crop"]
AugOrder = Literal["before_mix", "after_mix", "none"]


def need(ok: bool, key: str, msg: str) -> None:
    """Raise a ConfigError naming `key` unless `ok`."""
    if not ok:
        raise ConfigError(f"key '{key}': {msg}")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """What to read and how it is batched: dataset, backend (torch, dali, ffcv), batch sizes, image size,
    foreground sampling and views. Building one checks its values (`validate()`): a ConfigError names the
    first bad key.

    >>> import mixtail
    >>> data = mixtail.DataConfig(dataset="demo", backend="torch", batch_size=64, imbalance_ratio=20.0)
    >>> data.validate()
    >>> data.num_views, data.fg_sampling, data.image_size
    (2, 'instance', 32)
    """

    # converted: the folder `mixtail convert` wrote (data.root), read through its manifest (pipelines/sources/manifest.py)
    dataset: Literal["demo", "cifar10", "cifar100", "folder", "imagenet_lt", "inat2018", "converted"] = "cifar100"
    # torchvision root (cifar*), tree with <test_dir>/ and train/ (folder), image root (lists), output (converted)
    root: str = ""
    download: bool = False  # cifar*: let torchvision download into `root` (needs internet)
    test_dir: str = "test"  # folder: name of the held-out split next to train/
    train_list: str = ""  # imagenet_lt: `path label` text file; inat2018: COCO-style JSON
    test_list: str = ""  # imagenet_lt / inat2018: the test list, in the format of train_list
    # A list entry outside data.root (`../`, an absolute path) is usually a wrong root or a list for another
    # layout: false counts them and names the first at the start, true refuses them.
    strict_root: bool = False
    # A validation split, so that nothing is chosen on the test set: k images of every class held
    # out, never trained on. CIFAR, demo, folder and converted data: from the training images the long-tailed
    # subset left out (a class with fewer left out, the head class, completes them from its own subset);
    # imagenet_lt / inat2018: k per class of data.val_list. 0: no validation split.
    val_per_class: int = 0
    val_seed: int = 0  # draws the split; apart from train.seed, so runs of every seed share one validation set
    val_list: str = ""  # imagenet_lt / inat2018: the validation list (ImageNet_LT_val.txt), never the test list
    imbalance_ratio: float = 100.0  # ρ = n_max / n_min of the long-tailed subset; 1 keeps every image
    # Which n_k images of each class the subset keeps: LDAM-DRW's seeded shuffle (every published CIFAR-LT
    # number) or, asked for by name only, the first n_k in dataset order (datasets.long_tailed_indices).
    lt_subset: Literal["ldam", "first"] = "ldam"
    backend: Literal["torch", "dali", "ffcv"] = "torch"  # the executor of the batch plan: torch, DALI or FFCV
    batch_size: int = 128  # global mixed pairs per step; each rank gets batch_size / world_size
    eval_batch_size: int = 2000  # per rank: evaluation in a few large batches (CIFAR: 5 for the 10k test images)
    image_size: int = 32  # side S of the square training and test images
    # How foregrounds are drawn (docs/method.md, "Foreground sampling"): `instance` weighs each image by n_y^-γ
    # (CMO's code, class-balanced at γ = 1: the default); `class` draws the class with q(k) ∝ n_k^-γ (the
    # paper's Eq. 2 read literally, a reversed long tail).
    fg_sampling: Literal["class", "instance"] = "instance"
    fg_gamma: float = 1.0  # γ of the foreground sampler (the paper's Eq. 2)
    num_views: int = 2  # views of each pair per step: 2, the two views SMC contrasts; 1, a single view
    num_threads: int = 4  # CPU threads for the DALI and FFCV backends
    # A bad image file (missing, zero-byte, truncated, not an image) found when the dataset is built: `stop`
    # names every one in a single error before training; `skip` drops them and lists them (dataset.skipped).
    on_error: Literal["stop", "skip"] = "stop"
    # How files are checked: `header` parses each header and needs JPEG/PNG end markers (~60 us a file);
    # `decode` decodes every file (~3 ms for a 500x375 photo), catching corrupt data inside a complete file.
    image_check: Literal["header", "decode"] = "header"
    # Per-channel mean for normalization; null: CIFAR's statistics for 32 px data, ImageNet's otherwise.
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None  # per-channel std for normalization; null: as for mean
    # Training epochs end with the last full batch of every rank (true), or also run the partial batch that
    # is left (false: torch's DataLoader default, so LDAM-DRW's and CMO's cifar_train.py take 97 steps of
    # 128 over CIFAR-10-LT ρ = 100 where true takes 96). Either way every rank sees the same count.
    drop_last: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        need(isinstance(self.drop_last, bool), "data.drop_last", f"must be true or false, got {self.drop_last!r}")
        need(self.batch_size > 0, "data.batch_size", f"must be positive, got {self.batch_size}")
        need(self.eval_batch_size > 0, "data.eval_batch_size", f"must be positive, got {self.eval_batch_size}")
        # The paper's largest images are 224 px (ImageNet-LT, iNaturalist); 1024 leaves room for fine-tuning at
        # high resolution, while a slip of the keyboard (100000) would ask for terabytes of batch memory.
        need(8 <= self.image_size <= MAX_IMAGE_SIZE, "data.image_size",
             f"must be in [8, {MAX_IMAGE_SIZE}], got {self.image_size}")
        need(self.imbalance_ratio >= 1, "data.imbalance_ratio", f"must be >= 1, got {self.imbalance_ratio}")
        need(self.num_views in (1, 2), "data.num_views", f"must be 1 or 2, got {self.num_views}")
        need(self.fg_gamma >= 0, "data.fg_gamma", f"must be >= 0, got {self.fg_gamma}")
        need(self.num_threads > 0, "data.num_threads", f"must be positive, got {self.num_threads}")
        need(self.std is None or min(self.std) > 0, "data.std", f"must be positive, got {self.std}")
        need(self.on_error in ("stop", "skip"), "data.on_error", f"must be stop or skip, got {self.on_error!r}")
        need(self.image_check in ("header", "decode"), "data.image_check",
             f"must be header or decode, got {self.image_check!r}")
        need(self.dataset != "converted" or bool(self.root), "data.root",
             "data.dataset=converted needs data.root: the folder mixtail convert wrote")
        need(self.val_per_class >= 0, "data.val_per_class", f"must be >= 0, got {self.val_per_class}")
        listed = self.dataset in ("imagenet_lt", "inat2018")
        need(not (listed and self.val_per_class and not self.val_list), "data.val_list",
             f"data.dataset={self.dataset} takes its validation split from a validation list: give data.val_list "
             f"(e.g. ImageNet_LT_val.txt), or set data.val_per_class=0")
        need(not (self.val_list and os.path.realpath(self.val_list) == os.path.realpath(self.test_list)), "data.val_list",
             f"is the test list {self.test_list!r}: choosing on it is choosing on the test set")


@dataclass(frozen=True, kw_only=True)
class AugConfig:
    """Per-component augmentation: each component image is augmented before mixing (the paper's Eq. 3).

    >>> import mixtail
    >>> aug = mixtail.AugConfig(policy="autoaugment", cutout_px=8)
    >>> aug.validate()
    >>> aug.crop, aug.flip
    ('pad', True)
    """

    # simclr: crop, flip, colour jitter, grayscale (SupCon's recipe); autoaugment: crop, flip, the CIFAR-10
    # AutoAugment policy and Cutout (the 84-88% CIFAR-10-LT peers); cmo_randaug: CMO's per-image choice.
    policy: Literal["simclr", "autoaugment", "cmo_randaug"] = "simclr"
    crop: Literal["pad", "resized"] = "pad"  # pad: CIFAR pad-and-crop; resized: RandomResizedCrop
    pad_px: int = 4  # pad crop: pixels of padding on each side before the random crop back to size
    scale: tuple[float, float] = (0.08, 1.0)  # resized crop: area range
    ratio: tuple[float, float] = (0.75, 4.0 / 3.0)  # resized crop: aspect range
    flip: bool = True  # random horizontal flip with probability 0.5
    color_jitter: float = 0.4  # brightness/contrast/saturation strength; 0 turns those off (hue is separate)
    hue: float = 0.1  # colour jitter's hue strength; 0 turns hue jitter off
    color_prob: float = 0.8  # probability that an image gets the colour jitter
    grayscale_prob: float = 0.2  # probability that an image is turned grayscale
    cutout_px: int = 16  # autoaugment: side of the Cutout square (DeVries & Taylor); 0 turns it off

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        need(self.pad_px >= 0, "aug.pad_px", f"must be >= 0, got {self.pad_px}")
        need(0 < self.scale[0] <= self.scale[1] <= 1, "aug.scale",
             f"needs 0 < low <= high <= 1, got {list(self.scale)}")
        need(0 < self.ratio[0] <= self.ratio[1], "aug.ratio", f"needs 0 < low <= high, got {list(self.ratio)}")
        need(0 <= self.hue <= 0.5, "aug.hue", f"must be in [0, 0.5], got {self.hue}")
        need(self.color_jitter >= 0, "aug.color_jitter", f"must be >= 0, got {self.color_jitter}")
        for key in ("color_prob", "grayscale_prob"):
            need(0 <= getattr(self, key) <= 1, f"aug.{key}", f"must be in [0, 1], got {getattr(self, key)}")
        need(self.cutout_px >= 0, "aug.cutout_px", f"must be >= 0, got {self.cutout_px}")


@dataclass(frozen=True, kw_only=True)
class MixConfig:
    """ResizeMix with a normalized ratio, CMO's mixing schedule, and the Table 5 ablation switches.

    >>> import mixtail
    >>> mix = mixtail.MixConfig(mix_prob=1.0, start_epoch=0)
    >>> mix.validate()
    >>> mix.active(0, num_epochs=10), mix.active(7, num_epochs=10)  # the last 3 epochs are unmixed
    (True, False)
    """

    alpha: float = 1.0  # λ ~ Beta(α, α) before normalization
    ratio_range: tuple[float, float] = (0.2, 0.8)  # λ' = low + (high − low)·λ; [0, 1] is Table 5's ablation
    mix_op: MixOp = "resize"  # resize: ResizeMix (the paper); crop: CutMix (Table 5)
    # Where the views' crops happen (Table 5, "augmentation method for positives"): before_mix crops each
    # component (the paper), after_mix crops the mixed image, none crops nothing (flip and colour stay).
    aug_order: AugOrder = "before_mix"
    # CMO's code mixes a whole batch with probability 0.5, one draw per batch; `sample` draws per pair.
    mix_prob: float = 0.5
    mix_per: Literal["batch", "sample"] = "batch"  # one mix_prob draw per global batch, or one per pair
    # Mixing happens for start_epoch <= epoch < E − unmixed_last_epochs (0-indexed epochs, E = train.epochs):
    # CMO's 3 < epoch < E − 3. Outside the window the foreground stream is not drawn at all.
    start_epoch: int = 4
    unmixed_last_epochs: int = 3  # the last epochs of the run, which are not mixed (see start_epoch)
    # Where the box lies. `inside`: side √λ'·(H, W) rounded, placed uniformly inside the image (SMC's
    # ResizeMix, whose pasted whole image must fit). `clipped`: CutMix's and CMO's rand_bbox: side
    # int(√λ'·H), a uniform centre pixel, the half-side ⌊side/2⌋ on each side of it, clipped at the border,
    # λ from the clipped area (so a mean foreground share of about 0.30 at λ' ~ U(0, 1), against 0.50 inside).
    box: Literal["inside", "clipped"] = "inside"
    # One λ' and box per pair, or one for the whole global batch (CutMix's and CMO's code draw one per batch).
    box_per: Literal["pair", "batch"] = "pair"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        need(self.box in ("inside", "clipped"), "mix.box", f"must be inside or clipped, got {str(self.box)[:40]!r}")
        need(self.box_per in ("pair", "batch"), "mix.box_per",
             f"must be pair or batch, got {str(self.box_per)[:40]!r}")
        lo, hi = self.ratio_range
        need(0.0 <= lo <= hi <= 1.0, "mix.ratio_range", f"needs 0 <= low <= high <= 1, got {list(self.ratio_range)}")
        need(self.alpha > 0, "mix.alpha", f"must be positive, got {self.alpha}")
        need(0.0 <= self.mix_prob <= 1.0, "mix.mix_prob", f"must be in [0, 1], got {self.mix_prob}")
        need(self.start_epoch >= 0, "mix.start_epoch", f"must be >= 0, got {self.start_epoch}")
        need(self.unmixed_last_epochs >= 0, "mix.unmixed_last_epochs", f"must be >= 0, got {self.unmixed_last_epochs}")

    def active(self, epoch: int, num_epochs: int) -> bool:
        """Whether `epoch` (0-indexed) of a num_epochs run lies in the mixing window."""
        return self.start_epoch <= epoch < num_epochs - self.unmixed_last_epochs


def normalization(data: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std for this data: explicit values, else CIFAR stats at 32 px and ImageNet stats above."""
    small = data.image_size <= 64
    mean = data.mean or (CIFAR_MEAN if small else IMAGENET_MEAN)
    std = data.std or (CIFAR_STD if small else IMAGENET_STD)
    return mean, std
