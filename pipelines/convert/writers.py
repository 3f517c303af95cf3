"""Writing one split into the temporary folder (a .beton for FFCV, image files and a list for DALI), and
publishing the finished folder under its final name in one rename."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np

from mixtail.errors import DataError, UsageError
from mixtail.locks import pid_alive
from mixtail.pipelines.convert.encoding import _ordered, _plain, _progress, bound, bounded_size, encode, source_pixels
from mixtail.pipelines.convert.options import SMART_THRESHOLD, ConvertOptions
from mixtail.pipelines.convert.sources import PreparedSplit
from mixtail.pipelines.sources.manifest import (
    MANIFEST_NAME,
    STORED_KINDS,
    file_sha256,
    folder_digest,
)
from mixtail.pipelines.sources.types import ImageArrays, ImageFiles

_KIND = {k: i for i, k in enumerate(STORED_KINDS)}


def _largest_side(ds: ImageFiles | ImageArrays, max_resolution: int | None) -> int:
    """The longest side any image of `ds` is stored at: its own (from the check, or the arrays) bounded by
    max_resolution."""
    if isinstance(ds, ImageArrays):
        largest = int(max(ds.images.shape[1:3]) if ds.sizes is None else np.max(ds.sizes))
    else:
        largest = int(np.max(ds.sizes))
    return largest if max_resolution is None else min(largest, max_resolution)


def _write_ffcv(split: PreparedSplit, tmp: Path, opts: ConvertOptions) -> tuple[dict, np.ndarray, np.ndarray]:
    from mixtail.pipelines.sources.beton import beton_info, write_beton

    ds = split.data

    def work(i: int) -> np.ndarray:
        return bound(source_pixels(ds, i), opts.max_resolution)

    name = f"{split.name}.beton"
    with _progress(len(ds), f"{split.name} -> {name}") as bar:
        def samples():
            for i, rgb in enumerate(_ordered(work, len(ds), opts.jobs)):
                bar.update()
                yield rgb, int(ds.labels[i]), int(split.source_index[i])

        # The largest stored side, not None, even without --max-resolution: FFCV's page size follows it
        # (ffcv_io.page_size), and an unbounded 8 MiB page makes a file of 30 CIFAR images 16 MiB.
        write_beton(tmp / name, samples(), num_samples=len(ds), write_mode=opts.write_mode,
                    max_resolution=_largest_side(ds, opts.max_resolution), jpeg_quality=opts.jpeg_quality,
                    smart_threshold=SMART_THRESHOLD)
    info = beton_info(tmp / name)
    sizes = np.stack([info.heights, info.widths], 1)
    kinds = np.where(info.jpeg, _KIND["jpeg"], _KIND["raw"])
    size, sha = file_sha256(tmp / name)
    return {name: {"bytes": size, "sha256": sha}}, sizes, kinds


def _write_dali(split: PreparedSplit, tmp: Path, opts: ConvertOptions) -> tuple[dict, np.ndarray, np.ndarray]:
    ds = split.data
    folder = f"images/{split.name}"
    for k in np.unique(ds.labels):
        (tmp / folder / f"{k:05d}").mkdir(parents=True, exist_ok=True)
    mode, quality = opts.write_mode, opts.jpeg_quality

    def work(i: int) -> tuple[str, str, tuple[int, int], str, int]:
        if isinstance(ds, ImageFiles) and mode != "jpg":
            h, w = (int(v) for v in ds.sizes[i])
            keep = bounded_size(h, w, opts.max_resolution) == (h, w) and _plain(ds.files[i])
        else:
            keep = False
        if keep:
            data = Path(ds.files[i]).read_bytes()
            kind, ext, size = "original", Path(ds.files[i]).suffix.lower(), (h, w)
        else:
            rgb = bound(source_pixels(ds, i), opts.max_resolution)
            # smart re-encodes as JPEG at any size: DALI decodes PNG, unlike FFCV's raw pixels, and reads it slower
            # than JPEG (module docstring), so FFCV's small-images-lossless threshold would cost speed here.
            jpeg = mode in ("jpg", "smart")
            kind, ext, size = ("jpeg", ".jpg", rgb.shape[:2]) if jpeg else ("png", ".png", rgb.shape[:2])
            data = encode(rgb, kind, quality)
        rel = f"{folder}/{int(ds.labels[i]):05d}/{int(split.source_index[i]):07d}{ext}"
        with open(tmp / rel, "wb") as f:
            f.write(data)
        return rel, kind, size, hashlib.sha256(data).hexdigest(), len(data)

    rows = []
    with _progress(len(ds), f"{split.name} -> {folder}/") as bar:
        for row in _ordered(work, len(ds), opts.jobs):
            rows.append(row)
            bar.update()
    list_name = f"{split.name}.txt"
    (tmp / list_name).write_text("".join(f"{rel} {int(y)}\n" for (rel, *_), y in zip(rows, ds.labels)),
                                 encoding="utf-8")
    size, sha = file_sha256(tmp / list_name)
    outputs = {list_name: {"bytes": size, "sha256": sha},
               folder: {"files": len(rows), "bytes": sum(r[4] for r in rows),
                        "sha256": folder_digest([(r[0], r[3]) for r in rows])}}
    sizes = np.array([r[2] for r in rows], dtype=np.int32).reshape(-1, 2)
    kinds = np.array([_KIND[r[1]] for r in rows], dtype=np.int8)
    return outputs, sizes, kinds


def remove_leftovers(out: Path) -> list[Path]:
    """Remove the temporary folders that killed conversions to `out` left (`.<name>.partial-<pid>-*`,
    `.<name>.old-<pid>-*`); a live process's folder is an error (two conversions to one PATH)."""
    removed = []
    for pattern in (f".{out.name}.partial-*", f".{out.name}.old-*"):
        for leftover in sorted(out.parent.glob(pattern)):
            try:
                pid = int(leftover.name.rsplit("-", 2)[-2])
            except (ValueError, IndexError):
                pid = -1
            if pid != os.getpid() and pid > 0 and pid_alive(pid):
                raise DataError(f"{leftover}: another mixtail convert (pid {pid}) is writing {out}; wait for it or "
                                f"choose another --out")
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
    return removed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished temporary folder to `out` (replacing an earlier conversion with overwrite)."""
    os.sync()  # every file's data on disk before the rename makes the output visible
    old = None
    if out.exists():
        _check_replaceable(out, overwrite)
        old = out.parent / f".{out.name}.old-{os.getpid()}-{tmp.name.rsplit('-', 1)[-1]}"
        os.replace(out, old)
    os.replace(tmp, out)
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _check_replaceable(out: Path, overwrite: bool) -> None:
    if not overwrite:
        raise UsageError(f"{out} exists; choose another --out, or --overwrite to replace it")
    if not out.is_dir() or not ((out / MANIFEST_NAME).is_file() or not any(out.iterdir())):
        raise UsageError(f"{out} exists and is not a mixtail convert output: --overwrite replaces only those; "
                         f"choose another --out")
