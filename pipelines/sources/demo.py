"""The built-in demo set: 10 shape classes drawn deterministically at any size, no download (`demo_dataset`)."""

from __future__ import annotations

import numpy as np

from mixtail.pipelines.sources.types import ImageArrays

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
    labels = np.concatenate(labels)[order]
    return ImageArrays(np.concatenate(images)[order], labels, list(DEMO_CLASSES), origin=np.arange(len(labels)))
