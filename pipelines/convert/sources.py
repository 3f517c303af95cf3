"""Reading a conversion's source: its format detected, its splits read onto one class map, the long-tailed
subset of the training split taken (`prepare`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mixtail.errors import DataError, UsageError
from mixtail.pipelines.sources.cifar import cifar_dataset
from mixtail.pipelines.sources.folders import check_files, scan_image_folder
from mixtail.pipelines.sources.subsets import long_tailed_indices
from mixtail.pipelines.sources.types import DataNotFound, ImageArrays, ImageFiles

_CIFAR_FOLDERS = {"cifar-10-batches-py": "cifar10", "cifar-100-python": "cifar100"}


def detect_format(source: str) -> str:
    path = Path(source)
    if path.is_file():
        return "inat-json" if path.suffix.lower() == ".json" else "filelist"
    if path.is_dir():
        if path.name in _CIFAR_FOLDERS or any((path / name).is_dir() for name in _CIFAR_FOLDERS):
            return "cifar"
        return "imagefolder"
    raise DataNotFound(f"{source}: no such file or folder (SOURCE is an image folder, a CIFAR root, a file list "
                       f"or an iNaturalist .json)")


def _cifar_root(source: str) -> tuple[str, str]:
    """(torchvision name, root) of a CIFAR source: its root folder, or the batches folder itself."""
    path = Path(source)
    if path.name in _CIFAR_FOLDERS:
        return _CIFAR_FOLDERS[path.name], str(path.parent)
    found = [name for name in _CIFAR_FOLDERS if (path / name).is_dir()]
    if not found:
        raise DataNotFound(f"{source}: holds neither {' nor '.join(_CIFAR_FOLDERS)} (torchvision's CIFAR layout)")
    if len(found) > 1:
        raise UsageError(f"{source} holds both CIFAR-10 and CIFAR-100: give SOURCE as {path / found[0]} or "
                         f"{path / found[1]}")
    return _CIFAR_FOLDERS[found[0]], str(path)


def source_splits(fmt: str, source: str, test_list: str) -> list[str]:
    """The splits a source holds."""
    if fmt == "imagefolder":
        root = Path(source)
        return ["train", "test"] if (root / "train").is_dir() and (root / "test").is_dir() else ["train"]
    if fmt == "cifar":
        return ["train", "test"]
    return ["train", "test"] if test_list else ["train"]


def read_split(fmt: str, source: str, split: str, *, image_root: str = "", test_list: str = "",
               classes: list[str] | None = None) -> ImageFiles | ImageArrays:
    """Split `split` of a source as its reader gives it (every image, source order), on `classes` if given."""
    if fmt == "imagefolder":
        root = Path(source)
        folder = root / split if (root / "train").is_dir() else root
        return scan_image_folder(folder, classes)
    if fmt == "cifar":
        name, root = _cifar_root(source)
        ds = cifar_dataset(name, root, split, download=False)
        if classes is not None and ds.classes != classes:
            raise DataError(f"{source}: the {split} split's classes differ from the training split's")
        return ds
    from mixtail.pipelines.sources.file_lists import read_listed_dataset

    path = source if split == "train" else test_list
    key = "SOURCE" if split == "train" else "--test-list"
    return read_listed_dataset("imagenet_lt" if fmt == "filelist" else "inat2018", path, image_root, key, classes)


@dataclass(frozen=True)
class PreparedSplit:
    """The images of one split to write, in output order."""

    name: str
    data: ImageFiles | ImageArrays
    source_index: np.ndarray  # (N,) int64 position of each image in the source split as read
    source_images: int  # images in the source split as read
    skipped: tuple[tuple[str, str], ...] = ()

    def without(self, i: int, reason: str) -> "PreparedSplit":
        """This split without image i, recorded as skipped (a file found bad only when it was decoded)."""
        keep = np.flatnonzero(np.arange(len(self.data)) != i)
        path = self.data.files[i]
        data = self.data.subset(keep)
        counts = np.bincount(data.labels, minlength=len(data.classes))
        if (counts == 0).any():
            raise DataError(f"{path}: {reason}; skipping it leaves class {data.classes[int(np.argmax(counts == 0))]!r} "
                            f"of the {self.name} split with no images")
        return replace(self, data=data, source_index=self.source_index[keep], skipped=self.skipped + ((path, reason),))


def _subset(ds, name: str, imbalance_ratio: float | None, rule: str) -> tuple[object, np.ndarray]:
    if name != "train" or imbalance_ratio is None:
        return ds, np.arange(len(ds), dtype=np.int64)
    idx = long_tailed_indices(ds.labels, imbalance_ratio, len(ds.classes), rule)
    counts = np.bincount(ds.labels[idx], minlength=len(ds.classes))
    if (counts == 0).any():
        k = int(np.argmax(counts == 0))
        raise DataError(f"--imbalance-ratio {imbalance_ratio:g} leaves class {ds.classes[k]!r} (label {k}) without "
                        f"a training image (the largest class has {counts.max()}): lower the ratio")
    return ds.subset(idx), idx


def prepare(fmt: str, source: str, splits: list[str], *, image_root: str, test_list: str,
            imbalance_ratio: float | None, lt_subset: str, on_error: str | None,
            skipped: list[dict] | None = None) -> tuple[list[str], dict[str, PreparedSplit]]:
    """(classes, {split: PreparedSplit}) of a source: read, the LT subset of the training split, then either every
    file checked (on_error, for a conversion) or the files of `skipped` left out (a manifest's, for --verify)."""
    train = read_split(fmt, source, "train", image_root=image_root, test_list=test_list)
    classes = list(train.classes)
    out = {}
    for name in splits:
        ds = train if name == "train" else read_split(fmt, source, name, image_root=image_root, test_list=test_list,
                                                      classes=classes)
        total = len(ds)
        ds, index = _subset(ds, name, imbalance_ratio, lt_subset)
        bad: tuple[tuple[str, str], ...] = ()
        if isinstance(ds, ImageFiles):
            if skipped is None:  # check every file; the kept ones come back with their sizes
                checked = check_files(ds, on_error, what=f"{name} images of {source}",
                                      stop_hint="they cannot be converted (--on-error stop; --on-error skip "
                                                "converts without them); nothing was written")
                bad = checked.skipped
            else:
                bad = tuple((s["path"], s["reason"]) for s in skipped if s["split"] == name)
            gone = {path for path, _ in bad}
            keep = np.flatnonzero([f not in gone for f in ds.files])
            ds = replace(checked, skipped=()) if skipped is None else ds.subset(keep)
            index = index[keep]
        out[name] = PreparedSplit(name, ds, index, total, bad)
    return classes, out
