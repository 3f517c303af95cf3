"""`verify(PATH)`: a converted output re-read and compared with its source: classes, labels, counts, pixels of a
sample of images, and every file's checksum."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mixtail.errors import DataError
from mixtail.pipelines.convert.encoding import bound, jpeg_round_trip, source_pixels
from mixtail.pipelines.convert.options import JPEG_TOLERANCE_DB, VERIFY_SAMPLE
from mixtail.pipelines.convert.sources import PreparedSplit, prepare
from mixtail.pipelines.convert.writers import _KIND
from mixtail.pipelines.sources.images import load_rgb
from mixtail.pipelines.sources.manifest import (
    STORED_KINDS,
    Manifest,
    SplitInfo,
    file_sha256,
    folder_digest,
    read_manifest,
    split_table,
)
from mixtail.pipelines.sources.types import ImageFiles


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def sample_positions(n: int, sample: int | None) -> np.ndarray:
    """Which images --verify decodes: all (sample None or >= n), else `sample` drawn with a fixed seed plus
    the first and the last."""
    if sample is None or sample >= n:
        return np.arange(n)
    picked = np.random.default_rng(0).choice(n, size=sample, replace=False)
    return np.unique(np.concatenate([picked, [0, n - 1]]))


def _stored_images(manifest: Manifest, name: str, table, positions: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(position, stored pixels) for the given positions, decoded as the backend reads them; for dali outputs
    (position, None): _compare_pixels reads the file, which an original needs only as bytes."""
    if manifest.target == "dali":
        for p in positions:
            yield int(p), None
        return
    from mixtail.pipelines.sources.beton import BetonReader

    canvas = int(table.sizes[positions].max())
    reader = BetonReader(manifest.path / manifest.splits[name].data, batch_size=64, canvas=canvas)
    at = 0
    for batch in reader.epoch(positions):
        for image, (h, w) in zip(batch.images.numpy(), batch.sizes.tolist()):
            yield int(positions[at]), image[:h, :w].copy()
            at += 1


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def verify(path: str | os.PathLike, *, sample: int | None = VERIFY_SAMPLE) -> str:
    """Check the output at `path` against its source (module docstring); return a one-line summary or raise a
    DataError naming the first difference."""
    manifest = read_manifest(path)
    root = manifest.path
    for rel, entry in manifest.outputs.items():
        if not (root / rel).exists():
            raise DataError(f"{root / rel}: missing (the manifest lists it): the output is incomplete")
    src, opts = manifest.source, manifest.options
    if not Path(src["path"]).exists():
        raise DataError(f"{src['path']}: the source of {root} no longer exists (--verify compares against it)")
    classes, expected = prepare(src["format"], src["path"], list(manifest.splits), image_root=src["image_root"],
                                test_list=src["test_list"], imbalance_ratio=opts["imbalance_ratio"],
                                lt_subset=opts["lt_subset"], on_error=None, skipped=manifest.skipped)
    if classes != manifest.classes:
        k = next((k for k, (a, b) in enumerate(zip(classes, manifest.classes)) if a != b),
                 min(len(classes), len(manifest.classes)))
        raise DataError(f"{root}: the class map differs from the source's ({len(manifest.classes)} vs "
                        f"{len(classes)} classes; first difference at label {k})")
    compared, margins = 0, []
    for name, info in manifest.splits.items():
        want = expected[name]
        table = split_table(manifest, name)
        where = f"{root}: {name} image"
        n = len(want.data)
        if len(table) != n:
            raise DataError(f"{root}: the {name} split holds {len(table)} images; its source gives {n}")
        labels, index = table.labels, table.source_index  # dali: split_table checked them against the list
        if manifest.target == "ffcv":  # what the FFCV backend reads is the .beton's own table
            from mixtail.pipelines.sources.beton import beton_info

            beton = beton_info(root / info.data)
            if len(beton) != n:
                raise DataError(f"{beton.path}: {len(beton)} samples; its source gives {n}")
            labels, index = beton.labels, beton.indices
        if not np.array_equal(index, want.source_index):
            k = _first(index != want.source_index)
            raise DataError(f"{where} {k}: source index {index[k]}, expected {want.source_index[k]} "
                            f"({_describe(want, k)})")
        if not np.array_equal(labels, want.data.labels):
            k = _first(labels != want.data.labels)
            raise DataError(f"{where} {k} ({_describe(want, k)}): label {labels[k]} in the output, "
                            f"{want.data.labels[k]} ({classes[want.data.labels[k]]!r}) in the source")
        if manifest.target == "ffcv":
            _same_tables(beton, table, f"{where}", info)
        counts = np.bincount(labels, minlength=len(classes))
        if counts.tolist() != info.class_counts:
            k = _first(counts != np.asarray(info.class_counts))
            raise DataError(f"{root}: {name} class {k} ({classes[k]!r}) has {counts[k]} images; the manifest says "
                            f"{info.class_counts[k]}")
        positions = sample_positions(n, sample)
        for p, stored in _stored_images(manifest, name, table, positions):
            margins.append(_compare_pixels(manifest, want, table, p, stored, f"{where} {p} ({_describe(want, p)})"))
            compared += 1
    _verify_checksums(manifest)
    lowest = min((m for m in margins if m is not None and math.isfinite(m)), default=None)
    return (f"{root}: ok: " + ", ".join(f"{n} {i.num_images} images" for n, i in manifest.splits.items())
            + f"; source indices, labels and counts match {src['path']}; pixels of {compared} images match ("
            + ("exactly" if lowest is None else f"JPEGs within tolerance, the closest {lowest:.1f} dB inside it")
            + "); "
            + f"{len(manifest.outputs)} checksums match")


def _same_tables(beton, table, where: str, info: SplitInfo) -> None:
    """The .beton's metadata and the .index.npz beside it (which mixtail train reads first) must agree."""
    sizes = np.stack([beton.heights, beton.widths], 1)
    for what, mine, theirs in (("label", table.labels, beton.labels), ("source index", table.source_index,
                                                                          beton.indices),
                               ("size", table.sizes, sizes), ("JPEG flag", table.kinds == _KIND["jpeg"], beton.jpeg)):
        differs = (mine != theirs).reshape(len(mine), -1).any(1)
        if differs.any():
            k = _first(differs)
            raise DataError(f"{where} {k}: {info.index} gives {what} {mine[k]}, {info.data} {theirs[k]}")


def _describe(split: PreparedSplit, k: int) -> str:
    if isinstance(split.data, ImageFiles):
        return split.data.files[k]
    return f"source image {split.source_index[k]}"


def _compare_pixels(manifest: Manifest, want: PreparedSplit, table, p: int, stored: np.ndarray,
                    where: str) -> float | None:
    """Compare one stored image with its source; returns the JPEG margin in dB (None for exact kinds)."""
    kind = STORED_KINDS[table.kinds[p]]
    if stored is None:  # a dali output's file
        path = table.files[p]
        if not os.path.isfile(path):
            raise DataError(f"{where}: its stored file {path} does not exist")
        if kind == "original":
            if Path(path).read_bytes() != Path(want.data.files[p]).read_bytes():
                raise DataError(f"{where}: {path} should hold the source file's bytes, and does not")
            return None
        try:
            stored = load_rgb(path)
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
    expected = bound(source_pixels(want.data, p), manifest.options["max_resolution"])
    if stored.shape != expected.shape:
        raise DataError(f"{where}: stored {stored.shape[0]}×{stored.shape[1]}, the source resized "
                        f"{expected.shape[0]}×{expected.shape[1]}")
    if kind != "jpeg":
        if not np.array_equal(stored, expected):
            y, x, c = (int(v) for v in np.argwhere(stored != expected)[0])
            raise DataError(f"{where}: pixel (y={y}, x={x}, channel {c}) is {stored[y, x, c]} in the output, "
                            f"{expected[y, x, c]} in the source ({kind} is stored exactly)")
        return None
    reference = psnr(expected, jpeg_round_trip(expected, manifest.options["jpeg_quality"], manifest.target))
    got = psnr(expected, stored)
    if got == math.inf:
        return None
    margin = got - (reference - JPEG_TOLERANCE_DB)
    if not margin >= 0:
        raise DataError(f"{where}: PSNR {got:.1f} dB against the source; a JPEG at quality "
                        f"{manifest.options['jpeg_quality']} gives {reference:.1f} dB (tolerance "
                        f"{JPEG_TOLERANCE_DB} dB)")
    return margin


def _verify_checksums(manifest: Manifest) -> None:
    root = manifest.path
    for rel, entry in manifest.outputs.items():
        if "files" in entry:  # a dali image folder: every file of the split's list, in order
            split = rel.rsplit("/", 1)[-1]
            names = [str(Path(f).relative_to(root)) for f in split_table(manifest, split).files]
            digests = []
            for name in names:
                size, sha = file_sha256(root / name)
                digests.append((name, sha))
            if folder_digest(digests) != entry["sha256"] or len(names) != entry["files"]:
                raise DataError(f"{root / rel}: its files' checksum differs from the manifest (a file changed after "
                                f"the conversion)")
            continue
        size, sha = file_sha256(root / rel)
        if size != entry["bytes"] or sha != entry["sha256"]:
            raise DataError(f"{root / rel}: {size} bytes, sha256 {sha[:16]}...: differs from the manifest "
                            f"({entry['bytes']} bytes, {entry['sha256'][:16]}...): the file changed after the "
                            f"conversion")
