"""The two kinds of dataset every source produces, and the data-not-found error.

- `ImageArrays`: decoded uint8 images in memory, (N, H, W, 3): CIFAR-10/100, the built-in demo set, and any
  small image-folder tree. The torch executor keeps these on the training device.
- `ImageFiles`: paths and labels of encoded images, for executors that decode (DALI, FFCV), with each image's
  true (height, width) once checked.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from mixtail.errors import DataError


class DataNotFound(DataError, FileNotFoundError):
    """A dataset path that does not exist (also a FileNotFoundError, which callers have long caught)."""


Skipped = tuple[tuple[str, str], ...]  # (path, reason) of each file that data.on_error=skip dropped


LeftOut = tuple[tuple[str, int], ...]  # (extension, files) of a folder's files not read for their extension


@dataclass(frozen=True)
class ImageArrays:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64
    classes: list[str]
    # (N, 2) int32 (height, width) of the valid top-left region of each image on its canvas
    # (images.decode_to_canvas); None when every image fills it (CIFAR, demo, squashed files).
    sizes: np.ndarray | None = None
    skipped: Skipped = ()
    # (N,) int64 position of each image in the split it was read from (CIFAR's order, the demo's), kept through
    # subsets: what names a held-out image in val_split.json. None where unknown (decoded files: their path is).
    origin: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> "ImageArrays":
        sizes = None if self.sizes is None else self.sizes[indices]
        origin = None if self.origin is None else self.origin[indices]
        return replace(self, images=self.images[indices], labels=self.labels[indices], sizes=sizes, origin=origin)


@dataclass(frozen=True)
class ImageFiles:
    files: list[str]  # absolute paths
    labels: np.ndarray  # (N,) int64
    classes: list[str]
    # (N, 2) int32 (height, width) of each image as decoded (after its EXIF orientation), recorded by
    # check_files; None for files not checked yet.
    sizes: np.ndarray | None = None
    skipped: Skipped = ()
    left_out: LeftOut = ()  # files of the scanned class folders that are not images by their extension

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> "ImageFiles":
        sizes = None if self.sizes is None else self.sizes[indices]
        return replace(self, files=[self.files[i] for i in indices], labels=self.labels[indices], sizes=sizes)


LISTED = ("imagenet_lt", "inat2018")


SPLITS = ("train", "val", "test")
