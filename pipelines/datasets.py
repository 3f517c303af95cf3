"""Dataset readers and the long-tailed subset construction.

Two kinds of dataset come out of here:

- `ImageArrays`: decoded uint8 images in memory, (N, H, W, 3). CIFAR-10/100, the built-in demo set, and
  any small image-folder tree. The torch loader keeps these on the training device.
- `ImageFiles`: paths and labels of encoded images, for loaders that decode (DALI).

`long_tailed_indices` builds the standard LT subset; `build_dataset` turns a `DataConfig` into the
(train, test) pair a run uses.

    python -m mixtail.pipelines.datasets demo          # print the class counts of a dataset
    python -m mixtail.pipelines.datasets folder --root /data/cifar10 --imbalance-ratio 100
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageArrays:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> "ImageArrays":
        return replace(self, images=self.images[indices], labels=self.labels[indices])


@dataclass(frozen=True)
class ImageFiles:
    files: list[str]  # absolute paths
    labels: np.ndarray  # (N,) int64
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> "ImageFiles":
        return replace(self, files=[self.files[i] for i in indices], labels=self.labels[indices])


# --------------------------------------------------------------------------------------------------
# Long-tailed subsets and shot groups
# --------------------------------------------------------------------------------------------------


def long_tailed_counts(n_max: int, num_classes: int, imbalance_ratio: float) -> np.ndarray:
    """n_k = int(n_max · (1/ρ)^(k/(C−1))), the profile of CIFAR-LT (Cao et al., LDAM)."""
    if num_classes == 1:
        return np.array([n_max], dtype=np.int64)
    # The same float expression as the reference implementation, so int() truncates identically.
    return np.array([int(n_max * (1.0 / imbalance_ratio) ** (k / (num_classes - 1.0)))
                     for k in range(num_classes)], dtype=np.int64)


LT_SUBSET_RULES = ("ldam", "first")


def long_tailed_indices(labels: np.ndarray, imbalance_ratio: float, num_classes: int | None = None,
                        rule: str = "ldam") -> np.ndarray:
    """Indices of the standard long-tailed subset, grouped by class (class 0 first).

    n_max is the size of the largest class and n_k = long_tailed_counts(n_max, C, ρ). Which n_k images of
    class k are kept depends on `rule`:

    - "ldam" (the default): the protocol of LDAM-DRW's `imbalance_cifar.py`, which CMO, BCL and RIDE reuse
      and every published CIFAR-LT number was trained on: seed numpy's legacy generator with 0 once, then
      for each class in order shuffle the positions of that class's images and keep the first n_k, in
      the shuffled order. For CIFAR-100 at ρ = 100, 50, 10 these are exactly the canonical subsets.
    - "first": the first n_k images of class k in dataset order (an older rule, kept only by name).
    """
    labels = np.asarray(labels)
    if imbalance_ratio < 1:
        raise ValueError(f"imbalance_ratio must be >= 1, got {imbalance_ratio}")
    if rule not in LT_SUBSET_RULES:
        raise ValueError(f"long-tailed subset rule must be one of {', '.join(LT_SUBSET_RULES)}, got {rule!r}")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    n_max = int(np.bincount(labels, minlength=num_classes).max())
    keep = long_tailed_counts(n_max, num_classes, imbalance_ratio)
    # RandomState(0) is the legacy global generator right after np.random.seed(0), without touching it.
    rng = np.random.RandomState(0) if rule == "ldam" else None
    parts = []
    for k in range(num_classes):
        idx = np.flatnonzero(labels == k)
        if rng is not None:
            rng.shuffle(idx)
        parts.append(idx[: keep[k]])
    return np.concatenate(parts).astype(np.int64)


MANY_MIN = 101  # Many: more than 100 training images
FEW_MAX = 19  # Few: fewer than 20


def shot_groups(train_counts: np.ndarray) -> dict[str, np.ndarray]:
    """Class indices of the Many (>100), Medium (20..100) and Few (<20) groups."""
    counts = np.asarray(train_counts)
    return {
        "many": np.flatnonzero(counts >= MANY_MIN),
        "medium": np.flatnonzero((counts > FEW_MAX) & (counts < MANY_MIN)),
        "few": np.flatnonzero(counts <= FEW_MAX),
    }


# --------------------------------------------------------------------------------------------------
# The built-in demo set
# --------------------------------------------------------------------------------------------------

DEMO_CLASSES = ["disk", "square", "triangle", "ring", "plus", "hstripes", "vstripes", "diagonal",
                "checker", "cross"]
DEMO_TRAIN_PER_CLASS = 300
DEMO_TEST_PER_CLASS = 100


def _demo_shapes(kind: int, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean masks (n, size, size) of one shape class at random centre, scale and phase."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy, xx = yy[None], xx[None]
    c = size / 2
    cy = rng.uniform(c - size * 0.18, c + size * 0.18, (n, 1, 1)).astype(np.float32)
    cx = rng.uniform(c - size * 0.18, c + size * 0.18, (n, 1, 1)).astype(np.float32)
    r = rng.uniform(size * 0.2, size * 0.34, (n, 1, 1)).astype(np.float32)
    period = rng.uniform(size * 0.12, size * 0.2, (n, 1, 1)).astype(np.float32)
    dy, dx = yy - cy, xx - cx
    inside_box = (np.abs(dy) <= r) & (np.abs(dx) <= r)
    width = r * 0.35
    if kind == 0:  # disk
        return dy**2 + dx**2 <= r**2
    if kind == 1:  # square
        return inside_box
    if kind == 2:  # triangle, apex up
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    if kind == 3:  # ring
        d2 = dy**2 + dx**2
        return (d2 <= r**2) & (d2 >= (0.6 * r) ** 2)
    if kind == 4:  # plus
        return inside_box & ((np.abs(dy) <= width / 2) | (np.abs(dx) <= width / 2))
    if kind == 5:  # horizontal stripes
        return inside_box & ((dy // (period / 2)) % 2 == 0)
    if kind == 6:  # vertical stripes
        return inside_box & ((dx // (period / 2)) % 2 == 0)
    if kind == 7:  # diagonal stripes
        return inside_box & (((dy + dx) // (period / 2)) % 2 == 0)
    if kind == 8:  # checkerboard
        return inside_box & (((dy // (period / 2)) + (dx // (period / 2))) % 2 == 0)
    if kind == 9:  # X
        return inside_box & ((np.abs(dy - dx) <= width / 1.5) | (np.abs(dy + dx) <= width / 1.5))
    raise ValueError(kind)


def demo_dataset(split: str, size: int = 32, seed: int = 1234) -> ImageArrays:
    """The built-in demo set: 10 shape classes, random colours and noise, deterministic for a seed.

    The train split is balanced (300 per class) before the long-tailed subset is taken, like CIFAR;
    the test split has 100 per class. The class is the shape; colours, position and scale vary.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    per_class = DEMO_TRAIN_PER_CLASS if split == "train" else DEMO_TEST_PER_CLASS
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    images, labels = [], []
    for k in range(len(DEMO_CLASSES)):
        mask = _demo_shapes(k, per_class, size, rng)[..., None]  # (n, S, S, 1)
        fg = rng.uniform(0, 255, (per_class, 1, 1, 3))
        # Backgrounds are the complementary colour, jittered, so the shape always stands out.
        bg = np.clip(255 - fg + rng.normal(0, 40, (per_class, 1, 1, 3)), 0, 255)
        img = np.where(mask, fg, bg) + rng.normal(0, 18, (per_class, size, size, 3))
        images.append(np.clip(np.rint(img), 0, 255).astype(np.uint8))
        labels.append(np.full(per_class, k, dtype=np.int64))
    # Interleave classes (as CIFAR's order is) so that "first n_k of class k" is well defined either way.
    order = np.argsort(np.tile(np.arange(per_class), len(DEMO_CLASSES)), kind="stable")
    return ImageArrays(np.concatenate(images)[order], np.concatenate(labels)[order], list(DEMO_CLASSES))


# --------------------------------------------------------------------------------------------------
# CIFAR and image folders
# --------------------------------------------------------------------------------------------------


def cifar_dataset(name: str, root: str, split: str, download: bool) -> ImageArrays:
    """CIFAR-10/100 in torchvision's on-disk format (downloaded by torchvision when `download`)."""
    from torchvision import datasets as tvd

    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
    if not root:
        raise FileNotFoundError(f"data.root is empty: give the folder that holds (or will hold) {name}")
    try:
        ds = cls(root=root, train=split == "train", download=download)
    except RuntimeError as err:
        hint = "" if download else " Set --data.download=true to let torchvision fetch it (needs internet)."
        raise FileNotFoundError(f"{name} not found under data.root={root!r}: {err}.{hint}") from None
    return ImageArrays(np.ascontiguousarray(ds.data), np.asarray(ds.targets, dtype=np.int64), list(ds.classes))


def scan_image_folder(root: str | Path) -> ImageFiles:
    """`root/<class>/<file>`: classes are the sorted folder names, files sorted by name within a class."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    # Hidden folders (.ipynb_checkpoints, .cache) are not classes.
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"image folder {root} has no class sub-folders (expected root/<class>/<file>)")
    files, labels = [], []
    for k, name in enumerate(classes):
        names = sorted(e.name for e in os.scandir(root / name)
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        files += [str(root / name / f) for f in names]
        labels += [k] * len(names)
    if not files:
        raise FileNotFoundError(f"image folder {root} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
    return ImageFiles(files, np.asarray(labels, dtype=np.int64), classes)


def decode_images(files: list[str], size: int, desc: str = "decoding") -> np.ndarray:
    """Decode files into one (N, size, size, 3) uint8 array; images of another size are resized."""
    from PIL import Image
    from tqdm import tqdm

    out = np.empty((len(files), size, size, 3), dtype=np.uint8)

    def load(i: int) -> None:
        try:
            with Image.open(files[i]) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                out[i] = np.asarray(im)
        except OSError as err:
            raise OSError(f"cannot decode image {files[i]}: {err}") from None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(tqdm(pool.map(load, range(len(files))), total=len(files), desc=desc, unit="img",
                  disable=len(files) < 2000, leave=False))
    return out


# --------------------------------------------------------------------------------------------------
# From a config
# --------------------------------------------------------------------------------------------------


def build_dataset(data, split: str, *, decoded: bool = True) -> ImageArrays | ImageFiles:
    """The `split` ("train" or "test") of the dataset named by a DataConfig.

    The train split is reduced to its long-tailed subset with data.imbalance_ratio (CIFAR, demo and
    folder datasets are balanced on disk); test splits are kept whole. With decoded=False, file-based
    datasets come back as ImageFiles for loaders that decode themselves.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if data.dataset == "demo":
        ds = demo_dataset(split, size=data.image_size)
    elif data.dataset in ("cifar10", "cifar100"):
        ds = cifar_dataset(data.dataset, data.root, split, data.download)
    elif data.dataset == "folder":
        ds = scan_image_folder(Path(data.root) / ("train" if split == "train" else data.test_dir))
    elif data.dataset in ("imagenet_lt", "inat2018"):
        from mixtail.pipelines.file_lists import read_listed_dataset

        key = "data.train_list" if split == "train" else "data.test_list"
        ds = read_listed_dataset(data.dataset, data.train_list if split == "train" else data.test_list,
                                 data.root, key)
    else:
        raise ValueError(f"data.dataset={data.dataset!r} has no reader in this version")
    if split == "train" and data.dataset not in ("imagenet_lt", "inat2018"):  # those lists are long-tailed already
        ds = ds.subset(long_tailed_indices(ds.labels, data.imbalance_ratio, len(ds.classes), data.lt_subset))
    if decoded and isinstance(ds, ImageFiles):
        ds = ImageArrays(decode_images(ds.files, data.image_size, desc=f"decoding {split}"), ds.labels, ds.classes)
    return ds


def main(argv: list[str] | None = None) -> None:
    from mixtail.pipelines.config import DataConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=["demo", "cifar10", "cifar100", "folder"])
    p.add_argument("--root", default="")
    p.add_argument("--imbalance-ratio", type=float, default=100.0)
    args = p.parse_args(argv)
    data = DataConfig(dataset=args.dataset, root=args.root, imbalance_ratio=args.imbalance_ratio)
    ds = build_dataset(data, "train", decoded=False)
    counts = np.bincount(ds.labels, minlength=len(ds.classes))
    groups = shot_groups(counts)
    print(f"{len(ds)} train images, {len(ds.classes)} classes, counts {counts.max()}..{counts.min()}; "
          + ", ".join(f"{g} {len(v)}" for g, v in groups.items()))


if __name__ == "__main__":
    main()
