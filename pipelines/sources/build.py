"""`build_dataset`: a DataConfig turned into the split a run uses, checked before any training step.

One class map per dataset: the training split (or a class list given to `build_dataset`) defines the
classes, and the test split is read onto them. Different class sets, an empty class, a label outside the
map or a class only in the test split is a DataError naming the class, file and line, raised when the
dataset is built, never an accuracy silently computed against shifted labels.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mixtail.errors import ConfigError, DataError
from mixtail.pipelines.sources.cifar import cifar_dataset
from mixtail.pipelines.sources.demo import demo_dataset
from mixtail.pipelines.sources.folders import (
    _class_folders,
    _class_images,
    check_files,
    decode_in_memory,
    left_out_line,
    scan_image_folder,
)
from mixtail.pipelines.sources.subsets import (
    hold_out_validation,
    long_tailed_indices,
    sample_per_class,
)
from mixtail.pipelines.sources.types import LISTED, SPLITS, ImageArrays, ImageFiles

# Training classes of list datasets, keyed by (dataset, list path, size, mtime): the train split fills it,
# so building the test split next does not parse a large training list (train2018.json) again.
_TRAIN_CLASSES: dict[tuple, list[str]] = {}


def _list_key(data) -> tuple:
    path = os.path.abspath(data.train_list)
    try:
        st = os.stat(path)
    except OSError:
        return (data.dataset, path, None, None)
    return (data.dataset, path, st.st_size, st.st_mtime_ns)


def training_classes(data) -> list[str] | None:
    """The class names the training split of `data` defines, which the test split is read onto; None for
    CIFAR and the demo set, whose splits share one class list by construction."""
    if data.dataset in ("demo", "cifar10", "cifar100"):
        return None
    if data.dataset == "converted":  # a mixtail convert output: its manifest's class map
        from mixtail.pipelines.sources.manifest import read_manifest

        return read_manifest(data.root).classes
    if data.dataset == "folder":
        root = Path(data.root) / "train"
        classes = _class_folders(root)
        for name in classes:
            _class_images(root / name)
        return classes
    if data.dataset in LISTED:
        key = _list_key(data)
        if key not in _TRAIN_CLASSES:
            from mixtail.pipelines.sources.file_lists import read_listed_dataset

            _TRAIN_CLASSES[key] = read_listed_dataset(data.dataset, data.train_list, data.root,
                                                      "data.train_list").classes
        return list(_TRAIN_CLASSES[key])
    raise ValueError(f"data.dataset={data.dataset!r} has no reader in this version")


def need_two_classes(classes: list[str], where: str) -> None:
    """A dataset of one class trains to 100% accuracy and learns nothing: refuse it, naming where it was read."""
    if len(classes) < 2:
        names = ", ".join(repr(c) for c in classes[:1])
        raise DataError(f"{where} has {len(classes)} class{'' if len(classes) == 1 else 'es'}"
                        f"{' (' + names + ')' if names else ''}: a classifier needs at least two")


def _same_classes(found: list[str], classes: list[str], where: str) -> None:
    if found != list(classes):
        diff = next((k for k, (a, b) in enumerate(zip(found, classes)) if a != b), min(len(found), len(classes)))
        first = (f"label {diff}: {found[diff]!r} here, {classes[diff]!r} given" if diff < min(len(found), len(classes))
                 else f"label {diff} is on one side only")
        raise DataError(f"{where} has {len(found)} classes, which differ from the {len(classes)} classes given "
                        f"(first difference at {first})")


def build_dataset(data, split: str, *, decoded: bool = True,
                  classes: list[str] | None = None) -> ImageArrays | ImageFiles:
    """The `split` ("train", "val" or "test") of the dataset named by a DataConfig, checked.

    Classes: `classes` (e.g. a manifest's class names) defines the labels of both splits when given;
    otherwise the training split defines them and the test split is read onto them (training_classes).
    The train split is reduced to its long-tailed subset with data.imbalance_ratio (CIFAR, demo and
    folder datasets are balanced on disk); test splits are kept whole. Every image file is checked
    (data.image_check) and bad ones stop the run or are skipped (data.on_error). With decoded=False,
    file-based datasets come back as ImageFiles (with sizes) for loaders that decode themselves; with
    decoded=True they are decoded into memory (decode_in_memory). data.dataset=converted reads a `mixtail
    convert` output (pipelines/manifest.converted_dataset): ImageFiles, or the FFCV backend's BetonDataset.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "val" and not data.val_per_class:
        raise ConfigError("key 'data.val_per_class': 0 means no validation split; set it to k > 0 images per class")
    if classes is None and (split == "test" or (split == "val" and data.dataset in LISTED)):
        classes = training_classes(data)
    if data.dataset == "converted":
        # A mixtail convert output: classes, labels, sizes and counts come from its manifest and
        # tables, already checked when converted; the train split's LT subset follows pipelines/sources/manifest.py.
        from mixtail.pipelines.sources.manifest import converted_dataset

        ds = converted_dataset(data, split, classes=classes, decoded=decoded)
        need_two_classes(ds.classes, f"the converted data in data.root={data.root}")
        return ds
    what = f"{split} images"
    read = "test" if split == "test" else "train"  # a validation split is held out of the training split
    where = f"data.dataset={data.dataset}"
    if data.dataset == "demo":
        ds = demo_dataset(read, size=data.image_size)
    elif data.dataset in ("cifar10", "cifar100"):
        ds = cifar_dataset(data.dataset, data.root, read, data.download)
    elif data.dataset == "folder":
        folder = Path(data.root) / ("train" if read == "train" else data.test_dir)
        ds = scan_image_folder(folder, classes)
        where = f"image folder {folder}"
        what = f"{split} images under {folder}"
        line = left_out_line(ds, f"{read} split under {folder}", len(ds))
        # Once per split read (val comes out of the train folder, already reported) and on one rank only.
        if line and split != "val" and os.environ.get("RANK", "0") == "0":
            print(line, flush=True)
    elif data.dataset in LISTED:
        from mixtail.pipelines.sources.file_lists import outside_root, read_listed_dataset

        key = f"data.{split}_list"
        path = getattr(data, f"{split}_list")
        ds = read_listed_dataset(data.dataset, path, data.root, key, classes=classes)
        line = outside_root(ds, data.root, f"{key}={path}", data.strict_root)
        if line and os.environ.get("RANK", "0") == "0":
            print(line, flush=True)
        if split == "train" and classes is None:
            _TRAIN_CLASSES[_list_key(data)] = list(ds.classes)
        what = f"{split} images of {key}={path}"
        where = f"{key}={path} (data.root={data.root})"
    else:
        raise ValueError(f"data.dataset={data.dataset!r} has no reader in this version")
    need_two_classes(ds.classes, where)
    if classes is not None and data.dataset in ("demo", "cifar10", "cifar100"):
        _same_classes(ds.classes, classes, f"data.dataset={data.dataset}")
    if split != "test" and data.dataset not in LISTED:  # those lists are long-tailed already
        keep = long_tailed_indices(ds.labels, data.imbalance_ratio, len(ds.classes), data.lt_subset)
        counts = np.bincount(ds.labels[keep], minlength=len(ds.classes))
        if (counts == 0).any():
            k = int(np.flatnonzero(counts == 0)[0])
            raise DataError(f"data.imbalance_ratio={data.imbalance_ratio} leaves {int((counts == 0).sum())} "
                            f"class(es) without a training image (first: {ds.classes[k]!r}, label {k}; the "
                            f"largest class has {counts.max()}): lower the ratio")
        if data.val_per_class:
            held = hold_out_validation(ds.labels, keep, data.val_per_class, data.val_seed, ds.classes)
            keep = held.val if split == "val" else held.train
        ds = ds.subset(keep)
    elif split == "val":  # ImageNet-LT / iNaturalist: k per class of data.val_list
        ds = ds.subset(sample_per_class(ds.labels, data.val_per_class, data.val_seed, len(ds.classes)))
    if isinstance(ds, ImageFiles):
        ds = check_files(ds, data.on_error, what=what, level=data.image_check)
        if decoded:
            ds = decode_in_memory(ds, data.image_size, desc=f"decoding {split}")
    return ds
