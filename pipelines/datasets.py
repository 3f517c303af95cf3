"""Dataset readers, the long-tailed subset construction, and `build_dataset`, which checks a dataset
before any training step.

Two kinds of dataset come out of here:

- `ImageArrays`: decoded uint8 images in memory, (N, H, W, 3). CIFAR-10/100, the built-in demo set, and
  any small image-folder tree. The torch loader keeps these on the training device.
- `ImageFiles`: paths and labels of encoded images, for loaders that decode (DALI), with each image's
  true (height, width) once checked.

One class map per dataset: the training split (or a class list given to `build_dataset`) defines the
classes, and the test split is read onto them. Different class sets, an empty class, a label outside the
map or a class only in the test split is a DataError naming the class, file and line, raised when the
dataset is built, never an accuracy silently computed against shifted labels. Hidden files and folders
(`.*`, macOS `._*` forks) are never images or classes; other files of a class folder whose extension is not an
image's (a .gif, a .txt) are left out, counted by extension and reported in one line per split (`left_out`).
Every image file is checked when the dataset is
built (pipelines/images.py); `data.on_error` says whether a bad one stops the run (all of them named in
one error) or is skipped (counted and listed in `skipped`).

`long_tailed_indices` builds the standard LT subset; `build_dataset` turns a `DataConfig` into the
split a run uses.

    python -m mixtail.pipelines.datasets demo          # print the class counts of a dataset
    python -m mixtail.pipelines.datasets folder --root /data/cifar10 --imbalance-ratio 100
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mixtail.errors import ConfigError, DataError
from mixtail.pipelines.images import (IMAGE_EXTENSIONS, bad_files_message, check_images, decode_images,
                                      decode_to_canvas, is_hidden)


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
# The validation split (data.val_per_class, issue 13 §2)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldOut:
    """A validation split of a training split: indices into the training split as read (before the LT subset)."""

    val: np.ndarray  # (C·k,) int64, class by class, ascending within a class
    train: np.ndarray  # the LT subset's indices, in its order, without the ones val took from it
    from_subset: np.ndarray  # (C,) int64: how many of class k's validation images came out of its LT subset


def hold_out_validation(labels: np.ndarray, kept: np.ndarray | None, per_class: int, seed: int,
                        classes: list[str]) -> HeldOut:
    """k = per_class images of every class held out for validation, never trained on.

    A class's validation images are drawn (seeded, numpy's PCG64 from `seed`, class by class in label order)
    from the training images the long-tailed subset `kept` left out; a class with fewer than k left out (the
    head class keeps all of its images) takes the rest from its own subset, which then loses them. kept=None
    means the subset is the whole split (a balanced dataset, or one long-tailed on disk): every class then
    draws from its own images. A class left with no training image is an error naming it.
    """
    labels = np.asarray(labels)
    kept = np.arange(len(labels), dtype=np.int64) if kept is None else np.asarray(kept, dtype=np.int64)
    in_subset = np.zeros(len(labels), bool)
    in_subset[kept] = True
    rng = np.random.default_rng(seed)
    val, taken_from_subset, from_subset = [], [], np.zeros(len(classes), np.int64)
    for k, name in enumerate(classes):
        left_out = np.flatnonzero((labels == k) & ~in_subset)
        own = kept[labels[kept] == k]
        out_part = rng.permutation(left_out)[:per_class]
        need = per_class - len(out_part)
        own_part = rng.permutation(own)[:need] if need > 0 else own[:0]
        if len(own) - len(own_part) < 1:
            raise DataError(f"class {name!r} (label {k}) has {len(own)} training image(s) and "
                            f"{len(left_out)} left out by the long-tailed subset: holding out "
                            f"data.val_per_class={per_class} for validation leaves it none to train on; "
                            f"lower data.val_per_class")
        val.append(np.sort(np.concatenate([out_part, own_part])))
        taken_from_subset.append(own_part)
        from_subset[k] = len(own_part)
    drop = np.zeros(len(labels), bool)
    drop[np.concatenate(taken_from_subset)] = True
    return HeldOut(np.concatenate(val).astype(np.int64), kept[~drop[kept]], from_subset)


VAL_RECORD = "val_split.json"  # in the run directory: which images a run held out


def validation_record(data, ds) -> dict:
    """What names a validation split so that anyone can rebuild it: the keys that draw it, its class counts,
    and each image (its file, its .beton position, or its position in the training split as read)."""
    if getattr(ds, "files", None) is not None:
        images = {"files": list(ds.files)}
    elif getattr(ds, "positions", None) is not None:
        images = {"beton": str(ds.path), "positions": np.asarray(ds.positions).tolist()}
    else:
        images = {"train_split_index": None if ds.origin is None else np.asarray(ds.origin).tolist()}
    return {"dataset": data.dataset, "val_per_class": data.val_per_class, "val_seed": data.val_seed,
            "val_list": data.val_list or None, "imbalance_ratio": data.imbalance_ratio, "lt_subset": data.lt_subset,
            "classes": list(ds.classes), "counts": np.bincount(ds.labels, minlength=len(ds.classes)).tolist(),
            "labels": np.asarray(ds.labels).tolist(), **images}


def sample_per_class(labels: np.ndarray, per_class: int, seed: int, num_classes: int) -> np.ndarray:
    """Up to `per_class` indices of every class, drawn seeded (a validation list with more than k per class)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([np.sort(rng.permutation(np.flatnonzero(labels == k))[:per_class])
                           for k in range(num_classes)]).astype(np.int64)


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
    labels = np.concatenate(labels)[order]
    return ImageArrays(np.concatenate(images)[order], labels, list(DEMO_CLASSES), origin=np.arange(len(labels)))


# --------------------------------------------------------------------------------------------------
# CIFAR and image folders
# --------------------------------------------------------------------------------------------------


def cifar_dataset(name: str, root: str, split: str, download: bool) -> ImageArrays:
    """CIFAR-10/100 in torchvision's on-disk format (downloaded by torchvision when `download`)."""
    from urllib.error import URLError

    from torchvision import datasets as tvd

    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
    if not root:
        raise DataNotFound(f"data.root is empty: give the folder that holds (or will hold) {name}")
    try:
        ds = cls(root=root, train=split == "train", download=download)
    except RuntimeError as err:
        hint = "" if download else " Set --data.download=true to let torchvision fetch it (needs internet)."
        raise DataNotFound(f"{name} not found under data.root={root!r}: {err}.{hint}") from None
    except (URLError, OSError) as err:  # offline, DNS, proxy, or a refused connection
        reason = getattr(err, "reason", None) or err
        raise DataError(f"cannot download {name} from {cls.url} ({reason}): without internet, fetch that file "
                        f"on a machine that has it and put {cls.filename} (or its extracted {cls.base_folder}/) "
                        f"in data.root={root!r}, then run with --data.download=false; or train on an "
                        f"image-folder tree (root/train/<class>/*.jpg, root/test/...) with --data.dataset=folder"
                        ) from None
    labels = np.asarray(ds.targets, dtype=np.int64)
    return ImageArrays(np.ascontiguousarray(ds.data), labels, list(ds.classes), origin=np.arange(len(labels)))


def _is_folder(entry: os.DirEntry) -> bool:
    """entry.is_dir(), False where the OS cannot say: a symlink loop (ELOOP) or an entry gone since the
    listing. Such a name is then kept as a file when it looks like an image, so the file check reports it
    (named with data.on_error=stop, skipped and counted with skip) instead of the scan aborting (issue 16)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _class_folders(root: Path) -> list[str]:
    """The sorted names of the class folders of an image-folder split (hidden folders are not classes)."""
    if not root.is_dir():
        raise DataNotFound(f"image folder {root} does not exist")
    classes = sorted(e.name for e in os.scandir(root) if _is_folder(e) and not is_hidden(e.name))
    if not classes:
        raise DataNotFound(f"image folder {root} has no class sub-folders (expected root/<class>/<file>)")
    return classes


def _image_names(folder: Path) -> tuple[list[str], list[str]]:
    """The image files directly inside a class folder, sorted, and the extensions of the other files there:
    hidden files (`._x.jpg`) are neither; other extensions are not images but are counted, so a run can say
    what it left out. A broken symlink named like an image is kept, so that the check reports it."""
    names, others = [], []
    for e in os.scandir(folder):
        if is_hidden(e.name) or _is_folder(e):
            continue
        if e.name.lower().endswith(IMAGE_EXTENSIONS):
            names.append(e.name)
        else:
            others.append(os.path.splitext(e.name)[1].lower() or "(no extension)")
    return sorted(names), others


def left_out_line(ds: "ImageFiles | ImageArrays", where: str, images: int) -> str | None:
    """One line saying which files of `where` were not read for their extension (None if none): `images`
    is how many were read, so the user sees e.g. that 1 of 8 files was left out."""
    left_out = getattr(ds, "left_out", ())
    if not left_out:
        return None
    n = sum(count for _, count in left_out)
    kinds = ", ".join(f"{count} {ext}" for ext, count in left_out)
    return (f"{where}: {n} of {images + n} files left out for their extension ({kinds}); images are "
            f"{' '.join(IMAGE_EXTENSIONS)}")


def _class_images(folder: Path) -> tuple[list[str], list[str]]:
    """`_image_names(folder)`, whose images must not be empty: an empty class is an error, never a silent label."""
    names, others = _image_names(folder)
    if not names:
        raise DataError(f"class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}; hidden files do "
                        f"not count): remove it or add its images"
                        + (f"; it holds {len(others)} file(s) of other extensions ({', '.join(sorted(set(others)))})"
                           if others else ""))
    return names, others


def _compare_class_sets(found: list[str], classes: list[str], root: Path) -> None:
    extra = sorted(set(found) - set(classes))
    missing = sorted(set(classes) - set(found))
    if extra or missing:
        parts = []
        if extra:
            parts.append(f"{len(extra)} class folder(s) not among the training classes: "
                         + ", ".join(str(root / c) for c in extra[:5]) + (" ..." if len(extra) > 5 else ""))
        if missing:
            parts.append(f"no folder for {len(missing)} training class(es): "
                         + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
        raise DataError(f"image folder {root} has a different class set from the training split "
                        f"({len(classes)} classes): " + "; ".join(parts))


def scan_image_folder(root: str | Path, classes: list[str] | None = None) -> ImageFiles:
    """`root/<class>/<file>`, files sorted by name within a class.

    With classes=None the sorted folder names are the classes (the training split); otherwise the folders
    must be exactly `classes` (the test split, read onto the training classes). A class folder without an
    image is an error either way.
    """
    root = Path(root)
    found = _class_folders(root)
    if classes is None:
        classes = found
    else:
        _compare_class_sets(found, classes, root)
    files, labels, others = [], [], []
    for k, name in enumerate(classes):
        names, other = _class_images(root / name)
        files += [str(root / name / f) for f in names]
        labels += [k] * len(names)
        others += other
    left_out = tuple(sorted(Counter(others).items()))
    return ImageFiles(files, np.asarray(labels, dtype=np.int64), list(classes), left_out=left_out)


STOP_HINT = "they cannot be used (data.on_error=stop; --data.on_error=skip trains without them)"


def check_files(ds: ImageFiles, on_error: str = "stop", *, what: str = "images", level: str = "header",
                stop_hint: str = STOP_HINT) -> ImageFiles:
    """Check every file of `ds` (images.check_images) and record its size.

    on_error="stop": a DataError names every bad file with its reason (a long list is written to a file the
    message names), after `stop_hint` (what to do about them). on_error="skip": bad files are dropped and
    listed in the result's `skipped`.
    """
    if on_error not in ("stop", "skip"):
        raise ValueError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
    result = check_images(ds.files, level=level, desc=f"checking {what}")
    if not result.bad:
        return replace(ds, sizes=result.sizes)
    lines = [f"{ds.files[i]}: {reason}" for i, reason in result.bad]
    if len(result.bad) == len(ds) and all(reason == "does not exist" for _, reason in result.bad):
        raise DataNotFound(f"none of the {len(ds)} {what} exists (the first is {ds.files[0]}): check data.root")
    if on_error == "stop":
        raise DataError(bad_files_message(lines, len(ds), what, stop_hint))
    bad = np.zeros(len(ds), bool)
    bad[[i for i, _ in result.bad]] = True
    kept = replace(ds, sizes=result.sizes).subset(np.flatnonzero(~bad))
    empty = [ds.classes[k] for k in np.flatnonzero(np.bincount(kept.labels, minlength=len(ds.classes)) == 0)]
    if empty:
        raise DataError(f"skipping the {len(result.bad)} bad {what} leaves class(es) {', '.join(empty[:5])} with "
                        f"no images: " + bad_files_message(lines, len(ds), what, "bad files"))
    return replace(kept, skipped=ds.skipped + tuple((ds.files[i], reason) for i, reason in result.bad))


SKIPPED_FILES = "skipped_files.txt"  # in a run directory: every file data.on_error=skip left out
SKIPPED_IN_LINE = 3


def report_skipped(skipped: dict[str, tuple[tuple[str, str], ...]], out_dir: Path) -> str | None:
    """Write every file data.on_error=skip left out, per split (`split<TAB>path<TAB>reason` lines), to
    out_dir/skipped_files.txt, and return one line that counts them and names the first few; with none skipped,
    remove a listing an earlier start left and return None."""
    listing = Path(out_dir) / SKIPPED_FILES
    rows = [(split, path, reason) for split, files in skipped.items() for path, reason in files]
    if not rows:
        listing.unlink(missing_ok=True)
        return None
    listing.write_text("".join(f"{split}\t{path}\t{reason}\n" for split, path, reason in rows), encoding="utf-8")
    per_split = ", ".join(f"{split} {len(files)}" for split, files in skipped.items() if files)
    first = "; ".join(f"{path} ({reason})" for _, path, reason in rows[:SKIPPED_IN_LINE])
    more = f"; ... and {len(rows) - SKIPPED_IN_LINE} more" if len(rows) > SKIPPED_IN_LINE else ""
    return (f"data.on_error=skip left out {len(rows)} bad file(s) ({per_split}): {first}{more}; "
            f"all are listed in {listing}")


# --------------------------------------------------------------------------------------------------
# From a config
# --------------------------------------------------------------------------------------------------

LISTED = ("imagenet_lt", "inat2018")
SPLITS = ("train", "val", "test")
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
    if data.dataset == "converted":  # a mixtail convert output: its manifest's class map (issue 9 §3)
        from mixtail.pipelines.manifest import read_manifest

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
            from mixtail.pipelines.file_lists import read_listed_dataset

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
        # A mixtail convert output (issue 9 §3): classes, labels, sizes and counts come from its manifest and
        # tables, already checked when converted; the train split's LT subset follows pipelines/manifest.py.
        from mixtail.pipelines.manifest import converted_dataset

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
        from mixtail.pipelines.file_lists import outside_root, read_listed_dataset

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


def decode_in_memory(ds: ImageFiles, image_size: int, desc: str = "decoding") -> ImageArrays:
    """The images of `ds` decoded into memory for the torch backend.

    Files that all are S×S (the CIFAR JPEG tree) are stored as they are. Others go onto a canvas that keeps
    each photo's aspect ratio (images.decode_to_canvas): the shorter side at S, or at round(S·8/7) above
    64 px (the test protocol's resize, so a centre crop or a small RandomResizedCrop window reads real
    pixels), the longer side at most 3/2 of that (3:2 is the common camera aspect; only wider photos shrink
    below that scale, and lose detail DALI's crops of the original keep). Crop windows are relative to
    each image, so they land on the same part of the photo as DALI's crops of the original file.
    """
    if ds.sizes is not None and (np.asarray(ds.sizes) == image_size).all():
        return ImageArrays(decode_images(ds.files, image_size, desc=desc), ds.labels, ds.classes, skipped=ds.skipped)
    short = image_size if image_size <= 64 else round(image_size * 8 / 7)
    pixels, sizes = decode_to_canvas(ds.files, short_side=short, max_side=round(short * 3 / 2), desc=desc)
    return ImageArrays(pixels, ds.labels, ds.classes, sizes=sizes, skipped=ds.skipped)


def main(argv: list[str] | None = None) -> None:
    from mixtail.pipelines.config import DataConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=["demo", "cifar10", "cifar100", "folder"])
    p.add_argument("--root", default="")
    p.add_argument("--imbalance-ratio", type=float, default=100.0)
    p.add_argument("--on-error", choices=["stop", "skip"], default="stop")
    args = p.parse_args(argv)
    data = DataConfig(dataset=args.dataset, root=args.root, imbalance_ratio=args.imbalance_ratio,
                      on_error=args.on_error)
    ds = build_dataset(data, "train", decoded=False)
    counts = np.bincount(ds.labels, minlength=len(ds.classes))
    groups = shot_groups(counts)
    print(f"{len(ds)} train images, {len(ds.classes)} classes, counts {counts.max()}..{counts.min()}; "
          + ", ".join(f"{g} {len(v)}" for g, v in groups.items())
          + (f"; {len(ds.skipped)} bad files skipped" if ds.skipped else ""))


if __name__ == "__main__":
    main()
