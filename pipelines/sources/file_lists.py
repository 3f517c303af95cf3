"""Readers for the file lists of the large long-tailed benchmarks: ImageNet-LT and iNaturalist 2018.

Both return `datasets.ImageFiles` (absolute paths joined onto the image root, int64 labels, class names),
the input of loaders that decode themselves (DALI). Nothing here opens an image.

- `read_file_list`: one `relative/path label` per line, as ImageNet-LT ships them
  (`train/n01440764/n01440764_190.JPEG 0`) and as iNaturalist18_val.txt is written. Blank lines and
  lines starting with `#` are skipped; the label is the last whitespace-separated field, so a path
  may contain spaces.
- `read_inat_json`: the COCO-style annotation files of iNaturalist 2018 (train2018.json,
  val2018.json): `images` {id, file_name, ...}, `annotations` {image_id, category_id, ...},
  `categories` {id, name, ...}. Category ids are ints in the official files and strings in some
  excerpts (val-lep.json), and an annotation may spell the id differently from its category
  ("594" vs 594). The label space is the `categories` list; see `category_labels` for the rule.

Either reader defines the classes (the training split) or, given `classes`, reads its file onto them (the
test split): then a label outside them, a class missing from the file, or a categories list that differs
is an error. Every class needs at least one image either way: a gap in a list's labels (a stray label 9
in a 4-class list) or a category without images is an error, not a phantom class.

Malformed or inconsistent input raises DataError naming the file and the line (lists) or the record (JSON).

    mixtail data list ImageNet_LT_val.txt --root /data/imagenet   # what training would read, no image opened
    mixtail data list val-lep.json
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mixtail.errors import DataError
from mixtail.pipelines.sources.types import DataNotFound, ImageFiles


def _join(root: str | Path, rel: str) -> str:
    """An absolute path for `rel` under `root` (root "" means the working directory)."""
    return os.path.abspath(os.path.join(os.fspath(root) or ".", rel))


def _label_ranges(labels: np.ndarray, limit: int = 5) -> str:
    """'4..8, 11' for sorted labels, the first `limit` runs."""
    runs: list[list[int]] = []
    for y in labels.tolist():
        if runs and y == runs[-1][1] + 1:
            runs[-1][1] = y
        else:
            runs.append([y, y])
    text = ", ".join(f"{lo}..{hi}" if hi > lo else f"{lo}" for lo, hi in runs[:limit])
    return text + (" ..." if len(runs) > limit else "")


def read_file_list(list_path: str | Path, root: str | Path = "", classes: list[str] | None = None) -> ImageFiles:
    """Read a `path label` list (ImageNet-LT, iNaturalist18_val.txt) into ImageFiles.

    With classes=None (a training list) the labels must be 0..C-1, every one with an image; class k is
    named after the folder that holds its images when all of them share one parent folder name (the
    WordNet id for ImageNet, the category id for iNaturalist), and "k" otherwise. With `classes` (a test
    list read onto the training classes) every label must be below len(classes), every class needs an
    image, and the names are `classes`.
    """
    list_path = Path(list_path)
    try:
        text = list_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataNotFound(f"file list {list_path} does not exist") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{list_path}: not UTF-8 text ({err})") from None
    files: list[str] = []
    labels: list[int] = []
    linenos: list[int] = []
    parents: dict[int, set[str]] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise DataError(f"{list_path}:{lineno}: expected 'path label', got {line!r}")
        rel, label_text = parts
        try:
            label = int(label_text)
        except ValueError:
            raise DataError(f"{list_path}:{lineno}: the label {label_text!r} is not an integer "
                            f"(expected 'path label', got {line!r})") from None
        if label < 0:
            raise DataError(f"{list_path}:{lineno}: label {label} is out of range (need 0 <= label)")
        if classes is not None and label >= len(classes):
            raise DataError(f"{list_path}:{lineno}: label {label} is not a training class (the training split "
                            f"has {len(classes)} classes, labels 0..{len(classes) - 1}): {line!r}")
        files.append(_join(root, rel))
        labels.append(label)
        linenos.append(lineno)
        parents.setdefault(label, set()).add(Path(rel).parent.name)
    if not files:
        raise DataError(f"{list_path}: the list has no entries (expected 'path label' lines)")
    y = np.asarray(labels, dtype=np.int64)
    n_classes = int(y.max()) + 1 if classes is None else len(classes)
    empty = np.flatnonzero(np.bincount(y, minlength=n_classes) == 0)
    if empty.size and classes is None:
        above = [f"line {ln} (label {lab})" for ln, lab in zip(linenos, labels) if lab > empty[0]]
        raise DataError(f"{list_path}: labels {_label_ranges(empty)} have no images, yet larger labels appear: "
                        f"{', '.join(above[:5])}{' ...' if len(above) > 5 else ''}; a list's labels must be "
                        f"0..C-1 with an image for each (a stray label?)")
    if empty.size:
        raise DataError(f"{list_path}: no images of {empty.size} of the {n_classes} training classes: "
                        + ", ".join(f"{k} ({classes[k]})" for k in empty[:5]) + (" ..." if empty.size > 5 else ""))
    if classes is None:
        classes = []
        for k in range(n_classes):
            names = parents[k]
            classes.append(next(iter(names)) if len(names) == 1 and "" not in names else str(k))
    return ImageFiles(files, y, list(classes))


def _category_key(value: Any, where: str) -> tuple[int, int | str]:
    """A sortable key for a category id: integers (or strings holding one) before other strings."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(f"{where}: a category id must be an integer or a string, got {value!r}")
    if isinstance(value, int):
        return (0, value)
    try:
        return (0, int(value.strip()))
    except ValueError:
        return (1, value)


def category_labels(categories: list[dict], where: str) -> tuple[dict[tuple[int, int | str], int], list[str]]:
    """Contiguous labels for a COCO-style `categories` list, and the class names in label order.

    The rule: an id that is an integer, or a string holding one ("594"), counts as that integer;
    label = the rank of the id among all category ids sorted ascending (integer ids first, then any
    other strings in lexicographic order). It depends only on the set of ids, never on file order,
    so train and val files that list the same categories get the same labels. For the official
    iNaturalist 2018 files (ids 0..8141) the label equals the id, as in iNaturalist18_val.txt.
    """
    keys: dict[tuple[int, int | str], str] = {}
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or "id" not in cat:
            raise DataError(f"{where}: categories[{i}] has no 'id' (got {cat!r:.120})")
        key = _category_key(cat["id"], f"{where}: categories[{i}]")
        if key in keys:
            raise DataError(f"{where}: categories[{i}] repeats the category id {cat['id']!r}")
        keys[key] = str(cat.get("name", cat["id"]))
    order = sorted(keys)
    return {k: label for label, k in enumerate(order)}, [keys[k] for k in order]


def read_inat_json(json_path: str | Path, root: str | Path = "", classes: list[str] | None = None) -> ImageFiles:
    """Read an iNaturalist 2018 COCO-style annotation file into ImageFiles (in `images` order).

    Every image needs exactly one annotation, every annotation an image of this file and a category listed
    in `categories`, and every category an image; labels follow `category_labels`. With `classes` (a test
    file read onto the training classes) the file's categories, in label order, must be named exactly
    `classes` (train2018.json and val2018.json list the same categories). file_name is joined onto root
    (for the official files, the folder that holds train_val2018/).
    """
    json_path = Path(json_path)
    where = str(json_path)
    try:
        with open(json_path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise DataNotFound(f"annotation file {json_path} does not exist") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON: {err}") from None
    if not isinstance(doc, dict):
        raise DataError(f"{where}: the top level must be an object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise DataError(f"{where}: missing or non-list key '{key}' (COCO-style iNaturalist files have "
                            f"images, annotations and categories; got keys {sorted(doc)})")
    label_of, names = category_labels(doc["categories"], where)
    if not label_of:
        raise DataError(f"{where}: 'categories' is empty")
    if classes is not None and names != list(classes):
        extra = sorted(set(names) - set(classes))[:3]
        missing = sorted(set(classes) - set(names))[:3]
        raise DataError(f"{where}: its {len(names)} categories differ from the {len(classes)} training classes "
                        f"(here only: {extra or 'none'}; in training only: {missing or 'none'}; or a different "
                        f"order of ids)")

    image_ids = set()
    for i, img in enumerate(doc["images"]):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise DataError(f"{where}: images[{i}] needs 'id' and a string 'file_name' (got {img!r:.120})")
        image_ids.add(img["id"])
    image_label: dict[Any, int] = {}
    for i, ann in enumerate(doc["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "category_id" not in ann:
            raise DataError(f"{where}: annotations[{i}] needs 'image_id' and 'category_id' (got {ann!r:.120})")
        key = _category_key(ann["category_id"], f"{where}: annotations[{i}]")
        if key not in label_of:
            raise DataError(f"{where}: annotations[{i}]: category_id {ann['category_id']!r} is not among the "
                            f"{len(label_of)} categories")
        image_id = ann["image_id"]
        if image_id not in image_ids:
            raise DataError(f"{where}: annotations[{i}]: image_id {image_id!r} is not among the "
                            f"{len(image_ids)} images of this file")
        if image_id in image_label:
            raise DataError(f"{where}: annotations[{i}]: image {image_id!r} has a second annotation "
                            f"(one label per image is expected)")
        image_label[image_id] = label_of[key]

    files: list[str] = []
    labels: list[int] = []
    for i, img in enumerate(doc["images"]):
        if img["id"] not in image_label:
            raise DataError(f"{where}: images[{i}] (id {img['id']!r}, {img['file_name']}) has no annotation "
                            f"(test2018.json is unlabelled and cannot be used for training or evaluation)")
        files.append(_join(root, img["file_name"]))
        labels.append(image_label[img["id"]])
    if not files:
        raise DataError(f"{where}: 'images' is empty")
    y = np.asarray(labels, dtype=np.int64)
    empty = np.flatnonzero(np.bincount(y, minlength=len(names)) == 0)
    if empty.size:
        ids = {label: key[1] for key, label in label_of.items()}
        raise DataError(f"{where}: {empty.size} of the {len(names)} categories have no images: "
                        + ", ".join(f"id {ids[k]!r} ({names[k]})" for k in empty[:5])
                        + (" ..." if empty.size > 5 else "") + "; every category is a class and needs an image")
    return ImageFiles(files, y, names)


def outside_root(ds: ImageFiles, root: str, where: str, strict: bool) -> str | None:
    """The entries of a list that lie outside `root` (through `../` or an absolute path): a line that counts
    them and names the first, or with `strict` a DataError saying the same. Usually a mistake (a wrong root, a
    list for another layout), so it is said before any file is read. root "" (the working directory: lists of
    absolute paths) has no outside. Paths are compared as written (absolute, `..` folded), not through links."""
    if not root:
        return None
    base = os.path.abspath(root)
    prefix = base.rstrip(os.sep) + os.sep
    outside = [i for i, f in enumerate(ds.files) if not f.startswith(prefix)]
    if not outside:
        return None
    first = ds.files[outside[0]]
    line = (f"{len(outside)} of the {len(ds)} entries of {where} lie outside data.root={root} "
            f"(the first, entry {outside[0] + 1}: {first})")
    if strict:
        raise DataError(f"{line}; data.strict_root=true refuses them: fix data.root or the list")
    return f"{line}; they are read all the same (data.strict_root=true refuses them)"


def read_listed_dataset(kind: str, list_path: str, root: str, key: str,
                        classes: list[str] | None = None) -> ImageFiles:
    """The dataset named by a DataConfig list key (`key` is its name, for errors), read onto `classes`
    when given (see the readers).

    imagenet_lt reads a `path label` list; inat2018 reads a COCO-style .json, or a `path label` list
    (iNaturalist18_val.txt style) for any other extension.
    """
    if not list_path:
        raise DataNotFound(f"{key} is empty: give the {kind} "
                           f"{'annotation .json or ' if kind == 'inat2018' else ''}file list")
    if kind == "inat2018" and list_path.lower().endswith(".json"):
        return read_inat_json(list_path, root, classes)
    if kind in ("imagenet_lt", "inat2018"):
        return read_file_list(list_path, root, classes)
    raise ValueError(f"data.dataset={kind!r} is not a listed dataset (imagenet_lt | inat2018)")
