"""One conversion from start to end: `convert(ConvertOptions(...))` checks, writes every split, writes the
manifest last and publishes the output; a full disk or an interruption leaves nothing behind."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from mixtail import __version__
from mixtail.errors import DataError, UsageError, describe_os_error
from mixtail.locks import DirectoryLock
from mixtail.pipelines.convert.encoding import LateBadImage
from mixtail.pipelines.convert.options import ConvertOptions
from mixtail.pipelines.convert.sources import detect_format, prepare, source_splits
from mixtail.pipelines.convert.writers import _check_replaceable, _publish, _write_dali, _write_ffcv, remove_leftovers
from mixtail.pipelines.sources.folders import left_out_line
from mixtail.pipelines.sources.manifest import (
    MANIFEST_NAME,
    STORED_KINDS,
    Manifest,
    SplitInfo,
    file_sha256,
    now_utc,
    outputs_checksum,
    write_index,
)


def convert(opts: ConvertOptions, *, log: Callable[[str], None] = print) -> Manifest:
    """Convert opts.source into opts.out (see the module docstring); returns the manifest written. One conversion
    to a PATH at a time: a second is refused naming the pid holding PATH's lock (mixtail/locks.py)."""
    opts.validate()
    out = Path(os.path.abspath(opts.out))
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]  # the lock's folder, made here
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with DirectoryLock(out.parent / f".{out.name}.lock", what="mixtail convert", where=f"--out {out}",
                           advice="choose another --out", log=log):
            return _convert(opts, out, log)
    except BaseException:
        for folder in created:  # a failed conversion leaves no empty folder (one inside the source would be a class)
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _convert(opts: ConvertOptions, out: Path, log: Callable[[str], None]) -> Manifest:
    """convert() under the output's lock; `out` is opts.out made absolute, its parent already made."""
    fmt = opts.format or detect_format(opts.source)
    source = os.path.abspath(opts.source)
    image_root = os.path.abspath(opts.image_root) if opts.image_root else ""
    test_list = os.path.abspath(opts.test_list) if opts.test_list else ""
    if out.exists():
        _check_replaceable(out, opts.overwrite)
    if fmt == "imagefolder" and (out == Path(source) or Path(source) in out.parents):
        raise UsageError(f"--out {out} is inside the source folder {source}: its files would become a class")
    have = source_splits(fmt, source, test_list)
    splits = have if opts.split == "both" else [opts.split]
    if opts.split == "test" and "test" not in have:
        raise UsageError(f"{source} has no test split (" + ("give --test-list" if fmt in ("filelist", "inat-json")
                         else "an image folder needs SOURCE/train/ and SOURCE/test/") + ")")
    if opts.to == "ffcv":
        try:  # FFCV's import compiles numba code (5 s here): before the clock starts, and failing early
            import mixtail.pipelines.sources.beton
        except ImportError as err:
            raise UsageError(f"--to ffcv needs FFCV: pip install 'mixtail[ffcv]' ({err})") from None
    start = time.perf_counter()
    # Everything is read and checked before anything is written: with --on-error stop a bad file ends the run here.
    classes, prepared = prepare(fmt, source, splits, image_root=image_root, test_list=test_list,
                                imbalance_ratio=opts.imbalance_ratio, lt_subset=opts.lt_subset, on_error=opts.on_error)
    for name in splits:  # files of another extension are never converted: say how many
        if line := left_out_line(prepared[name].data, f"{name} split of {source}", prepared[name].source_images):
            log(line)
    for leftover in remove_leftovers(out):
        log(f"removed {leftover}, left by an interrupted conversion")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{os.urandom(4).hex()}"
    tmp.mkdir()
    writer = _write_ffcv if opts.to == "ffcv" else _write_dali
    try:
        outputs, infos = {}, {}
        for name in splits:
            split = prepared[name]
            while True:
                try:
                    files, sizes, kinds = writer(split, tmp, opts)
                    break
                except LateBadImage as bad:
                    path = split.data.files[bad.index]
                    if opts.on_error == "stop":
                        raise DataError(f"{path}: {bad.reason}: it cannot be converted (--on-error stop; --on-error "
                                        f"skip converts without it); nothing was written") from None
                    log(f"skipping {path}: {bad.reason}; writing the {name} split again without it")
                    split = split.without(bad.index, bad.reason)
            prepared[name] = split
            index = f"{name}.index.npz"
            write_index(tmp / index, split.data.labels, split.source_index, sizes, kinds)
            size, sha = file_sha256(tmp / index)
            outputs.update(files)
            outputs[index] = {"bytes": size, "sha256": sha}
            counts = np.bincount(split.data.labels, minlength=len(classes))
            infos[name] = SplitInfo(num_images=len(split.data), source_images=split.source_images,
                                    class_counts=[int(c) for c in counts],
                                    data=f"{name}.beton" if opts.to == "ffcv" else f"{name}.txt", index=index,
                                    stored={k: int((kinds == i).sum()) for i, k in enumerate(STORED_KINDS)
                                            if (kinds == i).any()})
        skipped = [{"split": name, "path": p, "reason": r} for name in splits for p, r in prepared[name].skipped]
        manifest = Manifest(target=opts.to, source={"format": fmt, "path": source, "image_root": image_root,
                                                     "test_list": test_list},
                            options=opts.recorded(), classes=classes, splits=infos, skipped=skipped, outputs=outputs,
                            checksum=outputs_checksum(outputs), mixtail_version=__version__, created=now_utc())
        with open(tmp / MANIFEST_NAME, "w", encoding="utf-8") as f:
            f.write(manifest.to_json())
        _publish(tmp, out, opts.overwrite)
    except BaseException as err:
        # The OS's ENOSPC from a write() names no file: say which output filled the disk, and how far
        # it got, measured before the partial folder (and its space) goes.
        full = isinstance(err, OSError) and err.errno in _OUT_OF_SPACE
        written = _bytes_under(tmp) + getattr(err, "bytes_written", 0) if full else 0  # + write_beton's removed file
        shutil.rmtree(tmp, ignore_errors=True)
        if not full:
            raise
        raise DataError(f"converting to {out}: {describe_os_error(err)} after {written:,} bytes "
                        f"({written / 2**20:.1f} MiB) were written to {tmp.name} in {out.parent}; the partial output "
                        f"was removed, nothing was written to {out}: free space there, or choose another --out") from None
    elapsed = time.perf_counter() - start
    total = sum(i.num_images for i in infos.values())
    log(f"wrote {out}: " + ", ".join(f"{n} {i.num_images} images" for n, i in infos.items())
        + f" ({len(classes)} classes) in {elapsed:.1f} s, {total / max(elapsed, 1e-9):,.0f} img/s, "
        f"{_mib(outputs):.1f} MiB" + (f"; skipped {len(skipped)} bad file(s), listed in {MANIFEST_NAME}"
                                     if skipped else ""))
    return replace(manifest, path=out)


# The write errors that mean the output's filesystem has no room (or quota) left for it.
_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _bytes_under(folder: Path) -> int:
    """Bytes allocated to the files under `folder` (what a full disk holds of the output so far)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def _mib(outputs: dict) -> float:
    return sum(o["bytes"] for o in outputs.values()) / 2**20
