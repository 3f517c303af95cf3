"""The manifest of a `mixtail convert` output, its per-split tables, and the output as a training data source
(`data.dataset: converted`, `data.root: PATH`), read without rescanning the source.

A converted output is a folder:

    PATH/manifest.json          what this module reads and writes (schema below); written last
    PATH/train.index.npz        per image, in output order: label, source_index, size (h, w) as stored, stored kind
    PATH/train.beton            --to ffcv: image, label and sample-index fields (pipelines/sources/beton.py)
    PATH/train.txt              --to dali: `images/train/00003/0000123.jpg 3` per line, the output order: the
                                ImageNet-LT list format, which DALI's fn.readers.file(file_root=PATH, file_list=) and
                                `mixtail convert --format filelist` also read
    PATH/images/train/<label>/  --to dali: the image files
    (the same for test)

manifest.json (format_version 1):

    format, format_version      "mixtail-converted", 1
    mixtail_version, created    the writer's version, UTC creation time (ISO 8601)
    target                      "ffcv" | "dali"
    source                      {"format", "path", "image_root", "test_list"}: absolute paths, as read
    options                     every conversion option: split, imbalance_ratio (null: every image), lt_subset,
                                write_mode, max_resolution, jpeg_quality, on_error, smart_threshold (null: dali)
    classes                     class names in label order: the training split's (one class map per dataset)
    splits                      {"train": {num_images, source_images, class_counts, data, index, stored}, ...}:
                                source_images counts the source split before the LT subset and skipping;
                                stored counts images by how they are stored (original, png, jpeg, raw)
    skipped                     [{"split", "path", "reason"}]: bad source files left out (--on-error skip)
    outputs                     {relative path: {"bytes", "sha256"}} for every output file; a dali image folder
                                is one entry {"files", "bytes", "sha256"}, the sha256 of "<name> <sha256>\\n"
                                per file in output order
    checksum                    sha256 of the canonical JSON of `outputs`: one value for the whole content

The train split of a conversion without --imbalance-ratio holds every image in source order, so at training
time `data.imbalance_ratio` takes the same long-tailed subset (datasets.long_tailed_indices) as from the source;
with --imbalance-ratio ρ it holds that subset, and only data.imbalance_ratio = ρ reads it. Outputs of file lists
(ImageNet-LT, iNaturalist) are used as converted, as build_dataset uses the lists themselves.

    mixtail data info PATH     # classes, counts and Many/Medium/Few of a converted output
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mixtail.errors import ConfigError, DataError

MANIFEST_NAME = "manifest.json"
FORMAT = "mixtail-converted"
FORMAT_VERSION = 1
TARGETS = ("ffcv", "dali")
SPLIT_NAMES = ("train", "test")
# How an image is stored. dali: the source file's own bytes, or re-encoded as PNG (lossless) or JPEG;
# ffcv: raw pixels or JPEG inside the .beton.
STORED_KINDS = ("original", "png", "jpeg", "raw")
LISTED_FORMATS = ("filelist", "inat-json")  # sources that are long-tailed already (datasets.LISTED)
_HASH_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> tuple[int, str]:
    """(bytes, sha256 hex) of a file, read in 1 MiB chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def folder_digest(entries: list[tuple[str, str]]) -> str:
    """sha256 over "<relative name> <sha256>\\n" of each file, in the given (output) order."""
    digest = hashlib.sha256()
    for name, sha in entries:
        digest.update(f"{name} {sha}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def outputs_checksum(outputs: dict) -> str:
    return hashlib.sha256(json.dumps(outputs, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitInfo:
    num_images: int
    source_images: int  # images in the source split before the LT subset and skipping
    class_counts: list[int]
    data: str  # relative path: "train.beton" (ffcv) or "train.txt" (dali)
    index: str  # relative path of the per-image table (.index.npz)
    stored: dict[str, int]  # images per stored kind


@dataclass(frozen=True)
class Manifest:
    target: str
    source: dict
    options: dict
    classes: list[str]
    splits: dict[str, SplitInfo]
    skipped: list[dict]
    outputs: dict
    checksum: str
    mixtail_version: str
    created: str
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    path: Path | None = field(default=None, compare=False)  # the folder it was read from; not written

    def to_json(self) -> str:
        record = asdict(self)
        record.pop("path")
        order = ["format", "format_version", "mixtail_version", "created", "target", "source", "options", "classes",
                 "splits", "skipped", "outputs", "checksum"]
        return json.dumps({k: record[k] for k in order}, indent=1) + "\n"

    def class_counts(self, split: str = "train") -> np.ndarray:
        return np.asarray(self.splits[split].class_counts, dtype=np.int64)


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _need(ok: bool, where: str, msg: str) -> None:
    if not ok:
        raise DataError(f"{where}: {msg}")


def read_manifest(root: str | os.PathLike) -> Manifest:
    """The manifest of the converted output at `root`, checked for shape (not against the files: --verify does
    that). A folder without one (an interrupted conversion's temporary folder, or anything else) is a DataError."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        hint = ""
        partial = sorted(root.parent.glob(f".{root.name}.partial-*")) if root.parent.is_dir() else []
        if partial:
            hint = f" (an interrupted conversion left {partial[0]}; run mixtail convert again, which removes it)"
        raise DataError(f"{root}: no converted output here{hint}")
    if ".partial-" in root.name:
        raise DataError(f"{root}: an interrupted conversion's temporary folder, never a complete output; run "
                        f"mixtail convert again (it removes leftovers)")
    if not path.is_file():
        raise DataError(f"{root}: no {MANIFEST_NAME}: not a complete mixtail convert output (the manifest is "
                        f"written last)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    where = str(path)
    _need(isinstance(doc, dict) and doc.get("format") == FORMAT, where,
          f"'format' must be {FORMAT!r}: not a mixtail convert manifest")
    _need(doc.get("format_version") == FORMAT_VERSION, where,
          f"format_version {doc.get('format_version')!r} is not {FORMAT_VERSION}, the one this mixtail reads; "
          f"convert the source again")
    keys = ("mixtail_version", "created", "target", "source", "options", "classes", "splits", "skipped", "outputs",
            "checksum")
    missing = [k for k in keys if k not in doc]
    _need(not missing, where, f"missing key(s) {', '.join(missing)}")
    _need(doc["target"] in TARGETS, where, f"'target' must be one of {', '.join(TARGETS)}, got {doc['target']!r}")
    classes = doc["classes"]
    _need(isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes), where,
          "'classes' must be a non-empty list of names")
    _need(isinstance(doc["splits"], dict) and doc["splits"], where, "'splits' must name at least one split")
    splits = {}
    for name, info in doc["splits"].items():
        _need(name in SPLIT_NAMES, where, f"unknown split {name!r} (train, test)")
        try:
            split = SplitInfo(**info)
        except TypeError as err:
            raise DataError(f"{where}: splits.{name}: {err}") from None
        _need(len(split.class_counts) == len(classes) and sum(split.class_counts) == split.num_images, where,
              f"splits.{name}.class_counts must have {len(classes)} entries summing to num_images")
        splits[name] = split
    _need(outputs_checksum(doc["outputs"]) == doc["checksum"], where,
          "'checksum' does not match 'outputs' (the manifest was edited)")
    return Manifest(**{k: doc[k] for k in keys if k != "splits"}, splits=splits, format=doc["format"],
                    format_version=doc["format_version"], path=root)


# --------------------------------------------------------------------------------------------------
# Per-split tables
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitTable:
    """One split of a converted output, per image in output order."""

    labels: np.ndarray  # (N,) int64
    source_index: np.ndarray  # (N,) int64 position in the source split as read (before the LT subset)
    sizes: np.ndarray  # (N, 2) int32 (height, width) as stored
    kinds: np.ndarray  # (N,) int8 index into STORED_KINDS
    files: list[str] | None  # dali: absolute paths of the stored images; ffcv: None (they are in the .beton)

    def __len__(self) -> int:
        return len(self.labels)


def write_index(path: Path, labels, source_index, sizes, kinds) -> None:
    with open(path, "wb") as f:
        np.savez(f, labels=np.asarray(labels, np.int64), source_index=np.asarray(source_index, np.int64),
                 sizes=np.asarray(sizes, np.int32).reshape(-1, 2), kinds=np.asarray(kinds, np.int8))


def read_list(path: Path) -> tuple[list[str], np.ndarray]:
    """The `relative/path label` lines of a dali output's split list (paths relative to its folder)."""
    files, labels = [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        rel, _, label = line.rpartition(" ")
        if not rel or not label.isdigit():
            raise DataError(f"{path}:{lineno}: expected 'path label', got {line!r}")
        files.append(str(path.parent / rel))
        labels.append(int(label))
    return files, np.asarray(labels, dtype=np.int64)


def split_table(manifest: Manifest, split: str) -> SplitTable:
    """The per-image table of `split` (its .index.npz; for dali also the file list, which must agree)."""
    root = manifest.path
    if split not in manifest.splits:
        raise DataError(f"{root}: the conversion holds no {split} split (it holds "
                        f"{', '.join(manifest.splits)}); convert it with --split {split} or both")
    info = manifest.splits[split]
    index = root / info.index
    try:
        with np.load(index, allow_pickle=False) as npz:
            table = {k: npz[k] for k in ("labels", "source_index", "sizes", "kinds")}
    except FileNotFoundError:
        raise DataError(f"{index}: missing (the manifest lists it): the output is incomplete; convert again") from None
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{index}: not a readable split table ({err})") from None
    n = info.num_images
    shapes_ok = (table["labels"].shape == (n,) and table["source_index"].shape == (n,)
                 and table["sizes"].shape == (n, 2) and table["kinds"].shape == (n,))
    _need(shapes_ok, str(index), f"its arrays do not hold the manifest's {n} images")
    files = None
    if manifest.target == "dali":
        files, labels = read_list(root / info.data)
        _need(len(files) == n, str(root / info.data), f"has {len(files)} lines, the manifest {n} images")
        if not np.array_equal(labels, table["labels"]):
            k = int(np.flatnonzero(labels != table["labels"])[0])
            raise DataError(f"{root / info.data}:{k + 1}: label {labels[k]}, but {index} says {table['labels'][k]} "
                            f"(run mixtail convert --verify {root})")
    return SplitTable(table["labels"].astype(np.int64), table["source_index"].astype(np.int64),
                      table["sizes"].astype(np.int32), table["kinds"].astype(np.int8), files)


# --------------------------------------------------------------------------------------------------
# A converted output as a training data source
# --------------------------------------------------------------------------------------------------


def _train_subset(manifest: Manifest, data, labels: np.ndarray) -> np.ndarray | None:
    """Indices (into the stored train split) of the subset data.imbalance_ratio asks for; None: all of it."""
    from mixtail.pipelines.sources.subsets import long_tailed_indices

    if manifest.source.get("format") in LISTED_FORMATS:
        return None  # the lists are long-tailed already (build_dataset does not subset them either)
    done = manifest.options.get("imbalance_ratio")
    if done is None:
        return long_tailed_indices(labels, data.imbalance_ratio, len(manifest.classes), data.lt_subset)
    rule = manifest.options.get("lt_subset", "ldam")
    if not math.isclose(float(done), data.imbalance_ratio) or rule != data.lt_subset:
        raise ConfigError(f"key 'data.imbalance_ratio': {manifest.path} holds the ρ={done:g} ({rule}) long-tailed "
                          f"subset, converted with --imbalance-ratio; set data.imbalance_ratio={done:g} (and "
                          f"data.lt_subset={rule}), or convert without --imbalance-ratio to train at any ratio")
    return None


def converted_dataset(data, split: str, *, classes: list[str] | None = None, decoded: bool = False):
    """The `split` of the converted output at data.root: ImageFiles (dali outputs; decoded into memory with
    decoded=True) or the FFCV backend's BetonDataset (ffcv outputs). Classes, labels, sizes and counts come from
    the manifest and its tables: nothing is scanned or checked again (`mixtail convert --verify` checks)."""
    from mixtail.pipelines.sources.folders import decode_in_memory
    from mixtail.pipelines.sources.types import ImageFiles

    if not data.root:
        raise ConfigError("key 'data.root': empty; data.dataset=converted reads the folder mixtail convert wrote")
    manifest = read_manifest(data.root)
    if classes is not None and list(classes) != manifest.classes:
        raise DataError(f"{manifest.path}: its {len(manifest.classes)} classes differ from the {len(classes)} "
                        f"classes given")
    stored = "test" if split == "test" else "train"  # a validation split is held out of the training split
    table = split_table(manifest, stored)
    keep = _train_subset(manifest, data, table.labels) if stored == "train" else None
    if stored == "train" and data.val_per_class:
        from mixtail.pipelines.sources.subsets import hold_out_validation

        if manifest.source.get("format") in LISTED_FORMATS:
            raise ConfigError(f"key 'data.val_per_class': {manifest.path} was converted from a list dataset, whose "
                              f"validation split is its own list (data.val_list), not part of this output: train "
                              f"from the lists (data.dataset=imagenet_lt or inat2018, with data.val_list) to hold "
                              f"one out")
        held = hold_out_validation(table.labels, keep, data.val_per_class, data.val_seed, manifest.classes)
        keep = held.val if split == "val" else held.train
    if manifest.target == "ffcv":
        if data.backend != "ffcv":
            raise ConfigError(f"key 'data.backend': {manifest.path} holds .beton files (mixtail convert --to ffcv), "
                              f"which data.backend=ffcv reads, not {data.backend}; or convert with --to dali")
        try:
            from mixtail.pipelines.sources.beton import beton_dataset
        except ImportError as err:
            raise ConfigError(f"key 'data.backend': ffcv needs FFCV and its backend: pip install 'mixtail[ffcv]' "
                              f"({err})") from None
        ds = beton_dataset(manifest.path / manifest.splits[stored].data, classes=manifest.classes)
        if not np.array_equal(ds.labels, table.labels):
            raise DataError(f"{ds.path}: its labels differ from {manifest.splits[stored].index} (run mixtail "
                            f"convert --verify {manifest.path})")
    else:
        ds = ImageFiles(table.files, table.labels, list(manifest.classes), sizes=table.sizes)
    if keep is not None:
        ds = ds.subset(keep)
    if decoded and isinstance(ds, ImageFiles):
        ds = decode_in_memory(ds, data.image_size, desc=f"decoding {split}")
    return ds
