"""Image-folder trees (root/<class>/<image>) and the checks every file list goes through.

Hidden files and folders (`.*`, macOS `._*` forks) are never images or classes; other files of a class folder
whose extension is not an image's (a .gif, a .txt) are left out, counted by extension and reported in one line
per split (`left_out_line`). Every image file is checked when the dataset is built (sources/images.py):
`data.on_error` says whether a bad one stops the run (all of them named in one error) or is skipped (counted
and listed in `skipped`). `decode_in_memory` turns checked files into `ImageArrays` for the torch executor.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from mixtail.errors import DataError
from mixtail.pipelines.sources.images import (
    IMAGE_EXTENSIONS,
    bad_files_message,
    check_images,
    decode_images,
    decode_to_canvas,
    is_hidden,
)
from mixtail.pipelines.sources.types import DataNotFound, ImageArrays, ImageFiles


def _is_folder(entry: os.DirEntry) -> bool:
    """entry.is_dir(), False where the OS cannot say: a symlink loop (ELOOP) or an entry gone since the
    listing. Such a name is then kept as a file when it looks like an image, so the file check reports it
    (named with data.on_error=stop, skipped and counted with skip) instead of the scan aborting."""
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
