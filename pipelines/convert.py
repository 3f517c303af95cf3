"""`mixtail convert`: a dataset converted once into what a loader backend reads fastest, with a manifest, and
`mixtail convert --verify` to prove an output matches its source (issue 9 §3).

    mixtail convert SOURCE --to ffcv|dali --out PATH [--format imagefolder|cifar|filelist|inat-json]
                   [--image-root DIR] [--test-list FILE] [--split train|test|both] [--imbalance-ratio R]
                   [--write-mode raw|jpg|smart|proportion] [--max-resolution N] [--jpeg-quality Q]
                   [--on-error stop|skip] [--jobs N] [--overwrite]
    mixtail convert --verify PATH [--sample N|all]

Sources (--format, detected when omitted: a .json file is inat-json, another file a filelist, a folder holding
cifar-10-batches-py/ or cifar-100-python/ cifar, any other folder an imagefolder):
- imagefolder: SOURCE/train/<class>/<file> and SOURCE/test/<class>/<file>, or SOURCE/<class>/<file> (a train
  split only); the file order is datasets.scan_image_folder's.
- cifar: torchvision's on-disk CIFAR-10/100 (SOURCE is its root, or the cifar-10-batches-py folder itself).
- filelist: an ImageNet-LT `path label` list (SOURCE: the training list, --test-list the test list), paths
  relative to --image-root.
- inat-json: iNaturalist 2018's COCO-style train2018.json (SOURCE) and val2018.json (--test-list), file names
  relative to --image-root.
One class map per dataset: the training split's (pipelines/sources/), also when only --split test is written.
--imbalance-ratio ρ writes the canonical long-tailed subset of the training split (datasets.long_tailed_indices,
LDAM-DRW's rule), in the order build_dataset gives it; without it every training image is written in source
order and `mixtail train` takes the subset at any ratio (pipelines/sources/manifest.py). Test splits are written whole.

Targets:
- `--to ffcv`: PATH/<split>.beton (image, label and source-index fields; pipelines/ffcv_io.write_beton) in
  FFCV's write modes: raw pixels, jpg, smart (JPEG above 128×128×3 bytes of pixels) or proportion (half as
  JPEG, drawn from a fixed seed). The FFCV backend reads it (data.backend=ffcv).
- `--to dali`: PATH/<split>.txt, a `path label` list of image files under PATH/images/<split>/<label>/, which
  the DALI backend reads through fn.io.file.read (and the torch backend decodes into memory). What is stored:
  raw keeps a source file's own bytes when it is a plain 8-bit RGB or grey JPEG/PNG that needs no resize, and
  writes PNG (lossless) otherwise; jpg re-encodes every image as JPEG at --jpeg-quality; smart keeps the
  plain files that need no resize and re-encodes the rest as JPEG (proportion is FFCV's only). Other pixel
  formats (16-bit, CMYK, palette, alpha) are stored as images.load_rgb decodes them, so every backend reads
  the same RGB.
- --max-resolution N shrinks every image whose longer side exceeds N to N (aspect ratio kept; PIL bilinear,
  antialiased, as datasets.decode_in_memory resizes), for both targets; smaller images are never enlarged.
Both write manifest.json (schema: pipelines/sources/manifest.py) and a per-split table of labels, source indices and
stored sizes, so the samplers and the Many/Medium/Few split read classes and counts without rescanning.

Why these files for DALI: measured with the DALI executor on the 2-core CPU development machine (shared, so
runs vary by about 10%), through bench_loader.make_loader: training pairs with two views and every batch mixed,
batch 64, 2 threads, median of 3 windows of 10 batches; `mixtail bench convert --dali-read`, results in
benchmarks/results/convert_dali_read_*_cpu_20261201.json. Mixed pairs per second:

    source                          stored as                          file list   packed blob   MiB
    334 photos (100-2400 px), S=64  the original JPEGs                    302          305       33.9
                                    JPEG copies <= 256 px (smart)         720          765        5.0
                                    PNG copies <= 256 px (raw)            453          472       25.4
                                    JPEG copies <= 96 px (smart)        1,257        1,418        1.1
                                    PNG copies <= 96 px (raw)           1,069        1,060        4.1
    2,000 CIFAR-10 JPEGs, S=32      the original files                  2,774        3,153        1.9
                                    JPEG copies (jpg)                   2,832        3,405        2.1

The decode is the cost: bounded JPEG copies read 2.4× (256 px) to 4.2× (96 px) faster than the originals, so
--max-resolution is where the speed is (for 224 px training, 384 keeps the torch backend's in-memory scale:
the shorter side at 256, the longer at most 3/2 of it). PNG copies are lossless but 4-5× larger and 15-40%
slower to read than JPEG ones, hence smart's JPEG. Packing the same bytes into one blob with an offset
index, fed through external_source instead of read by fn.io.file.read, changed photos by -1 to +13% and
32 px images by +14 to +29% (3 runs of each): not enough for a second source path through every executor,
while plain files stay readable by the torch backend, PIL, DALI's own fn.readers.file and `--format
filelist`; and CIFAR-size data needs no decode at all in the torch backend's in-memory arrays. Not measured:
DALI's GPU decode (no GPU with DALI was lent to this work), where per-file reads weigh more next to a faster
decode.

Failure behaviour:
- Every source file is checked first (images.check_images: zero-byte, truncated, not an image, unsupported
  pixel format): with --on-error stop (the default) a bad file ends the run, named by path in one line,
  before anything is written; with --on-error skip it is left out, counted, listed in the manifest
  (`skipped`) and the run says how many. A file that passes the header check and then fails to decode is
  handled the same way when it is reached (stop: nothing is left behind; skip: the split is written again
  without it).
- All work happens in PATH's parent under `.<name>.partial-<pid>-<random>` and is renamed to PATH only when
  complete, manifest last; a killed run leaves only that hidden folder, which no reader accepts. The next
  run removes such leftovers of dead processes and starts clean (no resume). A second conversion to the same PATH
  while one runs is refused, naming the pid (a lock on `.<name>.lock` beside PATH, mixtail/locks.py). An existing PATH is replaced
  only with --overwrite, and only if it is an earlier conversion or empty.

`--verify PATH` re-reads the output and the source it names: the class map; the number of images, every
source index and every label (against the source's own, the first difference named); the class counts; the
pixels of a sample of images per split (--sample, default 256 plus the first and last; `all` for all):
original bytes must equal the source file, raw and PNG pixels must equal the source's decoded (and
resized) pixels exactly, and a JPEG must come within JPEG_TOLERANCE_DB (1 dB) of the PSNR that the target's own
encoder and decoder give the source pixels at the same quality (`jpeg_round_trip`; with the libraries that
wrote it, that is the same image); and last every output file's sha256. Any difference exits 2 with
one line naming it; an interrupted or partial output is refused. The source must still be there.

"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import math
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mixtail import __version__
from mixtail.errors import DataError, UsageError, describe_os_error
from mixtail.locks import DirectoryLock, pid_alive
from mixtail.pipelines.sources.types import DataNotFound, ImageArrays, ImageFiles
from mixtail.pipelines.sources.folders import check_files, left_out_line, scan_image_folder
from mixtail.pipelines.sources.cifar import cifar_dataset
from mixtail.pipelines.sources.subsets import long_tailed_indices
from mixtail.pipelines.sources.images import load_rgb
from mixtail.pipelines.sources.manifest import (
    MANIFEST_NAME, STORED_KINDS, Manifest, SplitInfo, file_sha256, folder_digest, now_utc, outputs_checksum,
    read_manifest, split_table, write_index)

FORMATS = ("imagefolder", "cifar", "filelist", "inat-json")
TARGETS = ("ffcv", "dali")
WRITE_MODES = ("raw", "jpg", "smart", "proportion")
SMART_THRESHOLD = 128 * 128 * 3  # bytes of pixels; the same as ffcv_io.DEFAULT_SMART_THRESHOLD (FFCV-free import)
# A stored JPEG may come this far below the PSNR that the target's own JPEG round trip gives the source pixels
# (`jpeg_round_trip`): room for another libjpeg version than the one that wrote it. Measured on 60 photos and
# 100 CIFAR-10 images at qualities 10..95, a JPEG keeps 18-47 dB, and a different image of the set scores 16-21.
JPEG_TOLERANCE_DB = 1.0
VERIFY_SAMPLE = 256
_CIFAR_FOLDERS = {"cifar-10-batches-py": "cifar10", "cifar-100-python": "cifar100"}
_KIND = {k: i for i, k in enumerate(STORED_KINDS)}


@dataclass(frozen=True, kw_only=True)
class ConvertOptions:
    source: str
    to: str
    out: str
    format: str | None = None  # None: detect from SOURCE
    image_root: str = ""
    test_list: str = ""
    split: str = "both"
    imbalance_ratio: float | None = None
    lt_subset: str = "ldam"
    write_mode: str = "smart"
    max_resolution: int | None = None
    jpeg_quality: int = 90
    on_error: str = "stop"
    jobs: int = os.cpu_count() or 1
    overwrite: bool = False

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UsageError(msg)
        need(self.to in TARGETS, f"--to must be one of {' | '.join(TARGETS)}, got {self.to!r}")
        need(self.format is None or self.format in FORMATS, f"--format must be one of {' | '.join(FORMATS)}, "
             f"got {self.format!r}")
        need(self.split in ("train", "test", "both"), f"--split must be train, test or both, got {self.split!r}")
        need(self.imbalance_ratio is None or self.imbalance_ratio >= 1,
             f"--imbalance-ratio must be >= 1, got {self.imbalance_ratio}")
        need(self.write_mode in WRITE_MODES, f"--write-mode must be one of {' | '.join(WRITE_MODES)}, "
             f"got {self.write_mode!r}")
        need(self.to == "ffcv" or self.write_mode != "proportion",
             "--write-mode proportion is FFCV's (a random half as JPEG); for --to dali use raw, jpg or smart")
        need(self.max_resolution is None or 1 <= self.max_resolution <= 65535,
             f"--max-resolution must be in 1..65535, got {self.max_resolution}")
        need(1 <= self.jpeg_quality <= 100, f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")
        need(self.on_error in ("stop", "skip"), f"--on-error must be stop or skip, got {self.on_error!r}")
        need(self.jobs >= 1, f"--jobs must be at least 1, got {self.jobs}")

    def recorded(self) -> dict:
        """The options the manifest records (every one that changes what is written)."""
        return {"split": self.split, "imbalance_ratio": self.imbalance_ratio, "lt_subset": self.lt_subset,
                "write_mode": self.write_mode, "max_resolution": self.max_resolution,
                "jpeg_quality": self.jpeg_quality, "on_error": self.on_error,
                "smart_threshold": SMART_THRESHOLD if self.to == "ffcv" else None}  # dali's smart has none


# --------------------------------------------------------------------------------------------------
# Reading the source
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Pixels, resizing and encoding
# --------------------------------------------------------------------------------------------------


def bounded_size(height: int, width: int, max_resolution: int | None) -> tuple[int, int]:
    """(h, w) with the longer side shrunk to max_resolution when it is longer (aspect kept, at least 1 px)."""
    longer = max(height, width)
    if max_resolution is None or longer <= max_resolution:
        return height, width
    scale = max_resolution / longer
    h = max_resolution if height == longer else max(1, round(height * scale))
    w = max_resolution if width == longer else max(1, round(width * scale))
    return h, w


def bound(rgb: np.ndarray, max_resolution: int | None) -> np.ndarray:
    """The image shrunk to bounded_size (PIL bilinear, antialiased when shrinking), or itself."""
    h, w = bounded_size(rgb.shape[0], rgb.shape[1], max_resolution)
    if (h, w) == rgb.shape[:2]:
        return np.ascontiguousarray(rgb)
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((w, h), Image.BILINEAR))


class LateBadImage(Exception):
    """A source image that passed the header check but could not be decoded; position and reason."""

    def __init__(self, index: int, reason: str):
        super().__init__(reason)
        self.index, self.reason = index, reason


def source_pixels(ds: ImageFiles | ImageArrays, i: int) -> np.ndarray:
    """Image i of a source as (H, W, 3) uint8 RGB (images.load_rgb for files)."""
    if isinstance(ds, ImageArrays):
        img = ds.images[i]
        return img if ds.sizes is None else img[:ds.sizes[i][0], :ds.sizes[i][1]]
    try:
        return load_rgb(ds.files[i])
    except DataError as err:
        raise LateBadImage(i, str(err).removeprefix(f"cannot decode image {ds.files[i]}: ")) from None


def encode(rgb: np.ndarray, kind: str, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    if kind == "jpeg":
        Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    else:
        Image.fromarray(rgb).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def decode_bytes(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def jpeg_round_trip(rgb: np.ndarray, quality: int, target: str) -> np.ndarray:
    """`rgb` encoded as JPEG and decoded again by the target's own codecs: PIL for dali outputs (what convert
    writes and load_rgb reads), FFCV's encoder (OpenCV) and its libjpeg-turbo decoder for .beton files. The two
    decoders differ: on the same FFCV-written bytes at quality 90, FFCV's decode is 1.4 dB (CIFAR-10, mean of 50)
    and 0.8 dB (30 photos) further from the source than PIL's, more than the tolerance."""
    if target == "dali":
        return decode_bytes(encode(rgb, "jpeg", quality))
    from ffcv.fields.rgb_image import encode_jpeg
    from ffcv.libffcv import imdecode

    data = encode_jpeg(np.ascontiguousarray(rgb), quality)
    h, w = rgb.shape[:2]
    out = np.empty((h, w, 3), np.uint8)
    imdecode(data, out, h, w, h, w, 0, 0, 1, 1, False, False)
    return out


def _plain(path: str) -> bool:
    """Whether a file is an 8-bit RGB or grey JPEG/PNG without transparency: one that DALI, PIL and load_rgb all
    decode to the same RGB (up to the JPEG decoder), so its own bytes can be kept."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.format in ("JPEG", "PNG") and im.mode in ("RGB", "L") and "transparency" not in im.info
    except Exception:  # noqa: BLE001 - anything PIL cannot open lazily is re-encoded (and fails there if bad)
        return False


def _ordered(work: Callable[[int], object], n: int, jobs: int) -> Iterator[object]:
    """work(0), ..., work(n − 1) on `jobs` threads (PIL's decoders, resizers and encoders release the GIL),
    yielded in order with a bounded lookahead; an exception is raised at its position."""
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="mixtail-convert")
    ahead: deque = deque()
    try:
        for i in range(n):
            ahead.append(pool.submit(work, i))
            if len(ahead) >= 4 * jobs:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _progress(n: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=n, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True, leave=False,
                disable=None)  # None: shown on a terminal only


# --------------------------------------------------------------------------------------------------
# Writers: one split into the temporary folder; each returns (files written, stored sizes, kinds)
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# The temporary folder and the final rename
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Convert
# --------------------------------------------------------------------------------------------------


def convert(opts: ConvertOptions, *, log: Callable[[str], None] = print) -> Manifest:
    """Convert opts.source into opts.out (see the module docstring); returns the manifest written. One conversion
    to a PATH at a time: a second is refused naming the pid holding PATH's lock (mixtail/locks.py; issue 16)."""
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
    for name in splits:  # files of another extension are never converted: say how many (issue 16)
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
        # The OS's ENOSPC from a write() names no file (issue 16): say which output filled the disk, and how far
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


# --------------------------------------------------------------------------------------------------
# Verify
# --------------------------------------------------------------------------------------------------


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
