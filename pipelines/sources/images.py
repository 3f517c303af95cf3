"""Checking and decoding image files: every file is proven readable before training, and every pixel
format becomes the same 8-bit RGB the DALI backend decodes.

- `check_images(files)`: every file exists, is non-empty, parses as an image of a supported pixel format
  and is not truncated; returns each image's (height, width) as decoded (after its EXIF orientation) and
  the bad files with a reason. The cheap "header" level opens the file lazily (PIL parses only the
  header), then requires a JPEG to end with its end-of-image marker (FF D9) and a PNG with its IEND chunk;
  a file that does not, or any other format, is fully decoded to decide. The "decode" level decodes every
  file. Results are cached per file list, keyed by each file's (size, mtime): see `cache_dir`.
- `load_rgb(path)`: one file as an (H, W, 3) uint8 array, converted as below.
- `decode_images(files, size)`: files squashed to size×size (the torch backend's in-memory set).
- `decode_to_canvas(files, short_side=, max_side=)`: files resized on their own aspect ratio onto a
  max_side² canvas, with the valid region of each (the 224 px protocol;
  docs/method.md, "The test-time view").

Pixel formats (tested against known pixel values in tests/test_images.py):
- 16-bit grey (I;16*): v → round(v · 255 / 65535), as DALI 2.4 decodes it (measured on all 65,536 values);
  PIL's convert("RGB") clips every value above 255 to white. 16-bit RGB(A) PNGs are read by PIL as their
  high byte, which may be one level below DALI's rounding.
- Palette (P) without transparency, grey (L), 1-bit (1), CMYK and YCbCr: PIL's conversion; for CMYK
  JPEGs (Adobe-inverted) that is the naive r = 255 − min(255, c + k) DALI also gives.
- Alpha (RGBA, LA, PA, P with a transparent colour): composited onto white. Annotators saw these images on
  web pages, i.e. on white, and a dark subject cut out on a transparent background vanishes on black.
  DALI's decoder instead drops the alpha channel and shows the colour stored under it (arbitrary: often
  black, sometimes white), so the two backends agree on opaque pixels only.
- EXIF orientation is applied (PIL's ImageOps.exif_transpose semantics), as DALI 2.4 does by default.
- Anything else (32-bit integer I outside PNG, float F, LAB, HSV) is refused, naming the file and mode.

    mixtail data check /data/cifar10/train                     # check every image below a folder
    mixtail data check /data/photos --level decode --repeat 3   # time the check
"""

from __future__ import annotations

import errno
import hashlib
import os
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
CHECK_LEVELS = ("header", "decode")
PROGRESS_MIN_FILES = 2000  # below this a check or decode finishes too fast for a progress bar to help
CACHE_MIN_FILES = 1000  # smaller sets are re-checked every time: caching them saves nothing measurable
CACHE_VERSION = 1  # bump when a check's meaning changes, so old results are not trusted

_JPEG_EOI = b"\xff\xd9"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_APPLE_DOUBLE = b"\x00\x05\x16\x07"  # macOS `._name` resource forks (AppleDouble magic)
_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that transpose the image
_MODES_16BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_PLAIN_MODES = ("RGB", "L", "1", "CMYK", "YCbCr", "RGBX")


class BadImage(Exception):
    """A file that cannot be used as an image; the message is the reason (without the path)."""


def is_hidden(name: str) -> bool:
    """Hidden files and folders (`.cache`, `.DS_Store`, macOS `._name` forks) are never images or classes."""
    return name.startswith(".")


# --------------------------------------------------------------------------------------------------
# Decoding one file
# --------------------------------------------------------------------------------------------------


def _orientation(im) -> int:
    """The EXIF orientation tag (1..8) from the header, 1 when absent or unreadable."""
    if "exif" not in im.info:  # parsing EXIF costs; files without an EXIF block skip it
        return 1
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block does not make the pixels unusable (PIL and DALI ignore it)
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _check_mode(im) -> None:
    mode = im.mode
    if mode in _PLAIN_MODES or mode in _ALPHA_MODES or mode in _MODES_16BIT or mode == "P":
        return
    if mode == "I" and im.format == "PNG":  # some PIL versions open 16-bit grey PNGs as I
        return
    raise BadImage(f"pixel mode {mode} is not supported (8/16-bit grey, palette, RGB, RGBA, CMYK are)")


def to_rgb(im) -> np.ndarray:
    """An opened PIL image as (H, W, 3) uint8 RGB, converted as the module docstring says (no orientation)."""
    _check_mode(im)
    mode = im.mode
    if mode in _MODES_16BIT or mode == "I":
        grey = np.asarray(im).astype(np.int64)
        if grey.min(initial=0) < 0 or grey.max(initial=0) > 65535:
            raise BadImage(f"mode {mode} values {grey.min()}..{grey.max()} are outside 16 bits")
        grey8 = ((grey * 255 + 32767) // 65535).astype(np.uint8)  # round(v·255/65535), DALI's mapping
        return np.repeat(grey8[:, :, None], 3, axis=2)
    if mode == "P":
        has_alpha = "transparency" in im.info or im.palette is not None and im.palette.mode == "RGBA"
        mode = "PA" if has_alpha else "RGB"
        im = im.convert("RGBA" if has_alpha else "RGB")
    if mode in _ALPHA_MODES:
        rgba = np.asarray(im.convert("RGBA")).astype(np.int32)
        alpha = rgba[:, :, 3:]
        # Exact rounding of c·a + 255·(1 − a) on the 0..255 scale: white behind every transparent pixel.
        return ((rgba[:, :, :3] * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)


_TRANSPOSE = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
              7: "TRANSVERSE", 8: "ROTATE_90"}


def _orient(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation to an (H, W, 3) array, as PIL's ImageOps.exif_transpose does."""
    if orientation == 1:
        return rgb
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).transpose(getattr(Image.Transpose, _TRANSPOSE[orientation])))


def _decode(path: str) -> np.ndarray:
    """Decode one file to (H, W, 3) uint8, oriented; raises BadImage with the reason."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            orientation = _orientation(im)
            im.load()
            rgb = to_rgb(im)
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage("does not exist") from None
    except UnidentifiedImageError:
        raise BadImage(_not_an_image(path)) from None
    except OSError as err:
        if err.errno is not None:  # the OS refused (permission, I/O error); PIL's own OSErrors carry no errno
            raise BadImage(f"unreadable ({err.strerror})") from None
        raise BadImage(_decode_failure(err)) from None
    except Exception as err:  # PIL raises SyntaxError, ValueError, struct.error... on corrupt files
        raise BadImage(_decode_failure(err)) from None
    return np.ascontiguousarray(_orient(rgb, orientation))


def load_rgb(path: str) -> np.ndarray:
    """One image file as (H, W, 3) uint8 RGB; a DataError naming the file if it cannot be decoded."""
    from mixtail.errors import DataError

    try:
        return _decode(path)
    except BadImage as err:
        raise DataError(f"cannot decode image {path}: {err}") from None


# What a file that is not an image most often is, by its first bytes: named in the error in its place (the
# bytes themselves may be anything, /etc/passwd included, and never go into a message).
_KINDS = ((b"%PDF", "a PDF document"), (b"PK\x03\x04", "a zip archive"), (b"\x1f\x8b", "gzip data"),
          (b"\x7fELF", "an executable (ELF)"), (b"<?xml", "an XML file"), (b"<svg", "an SVG drawing"),
          (b"\x00\x00\x00 ftyp", "a video or HEIF file"), (b"RIFF", "a RIFF file (WAV, AVI or WebP)"))


def _not_an_image(path: str) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as err:
        return f"unreadable ({err.strerror})"
    if not head:
        return "zero-byte file"
    if head.startswith(_APPLE_DOUBLE):
        return "a macOS AppleDouble resource fork (._ file), not an image"
    for magic, kind in _KINDS:
        if head.startswith(magic):
            return f"not an image file ({kind})"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:  # a multi-byte character cut at the end of the 512 bytes is still text
        text = head[:err.start].decode("utf-8") if err.start >= len(head) - 3 else ""
    if text and all(c.isprintable() or c in "\t\n\r\f" for c in text):
        return "not an image file (it is text)"
    return "not an image file (binary data of no image format PIL reads)"


def _decode_failure(err: Exception) -> str:
    text = str(err) or type(err).__name__
    if "truncated" in text.lower() or isinstance(err, EOFError):
        return f"truncated: {text}"
    return f"cannot be decoded ({type(err).__name__}: {text})"


# --------------------------------------------------------------------------------------------------
# Checking many files
# --------------------------------------------------------------------------------------------------


def check_image(path: str, level: str = "header") -> tuple[int, int]:
    """(height, width) of one image as decoded, or BadImage with the reason (see the module docstring)."""
    from PIL import Image, UnidentifiedImageError

    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise BadImage("does not exist") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise BadImage("a symbolic link loop (ELOOP), not an image file") from None
        raise BadImage(f"unreadable ({err.strerror})") from None
    if size == 0:
        raise BadImage("zero-byte file")
    if level == "decode":
        rgb = _decode(path)
        return rgb.shape[0], rgb.shape[1]
    try:
        with open(path, "rb") as f:
            try:
                im = Image.open(f)
            except UnidentifiedImageError:
                raise BadImage(_not_an_image(path)) from None
            fmt, (w, h) = im.format, im.size
            _check_mode(im)
            orientation = _orientation(im)
            tail_len = len(_PNG_IEND) if fmt == "PNG" else 2
            f.seek(max(0, size - tail_len))
            tail = f.read(tail_len)
    except BadImage:
        raise
    except IsADirectoryError:
        raise BadImage("is a directory, not an image file") from None
    except OSError as err:
        if err.errno is not None:  # the OS refused (permission, I/O); PIL's own OSErrors carry no errno
            raise BadImage(f"unreadable ({err.strerror})") from None
        raise BadImage(_decode_failure(err)) from None
    except Exception as err:  # a header PIL cannot parse
        raise BadImage(_decode_failure(err)) from None
    if w < 1 or h < 1:
        raise BadImage(f"has an empty size {w}x{h}")
    complete = (fmt == "JPEG" and tail == _JPEG_EOI) or (fmt == "PNG" and tail == _PNG_IEND)
    if not complete:
        # No end marker (a truncated file, or bytes appended after the image), or a format without one:
        # only a full decode can tell. Rare on real datasets, so the cheap path stays cheap.
        try:
            rgb = _decode(path)
        except BadImage as err:
            marker = {"JPEG": "the JPEG end-of-image marker FF D9", "PNG": "the PNG IEND chunk"}.get(fmt)
            raise BadImage(f"{err}" + (f"; the file ends without {marker}" if marker else "")) from None
        return rgb.shape[0], rgb.shape[1]
    return (w, h) if orientation in _SWAPS_AXES else (h, w)


@dataclass(frozen=True)
class ImageCheck:
    """The result of `check_images`: sizes[i] = (height, width) of files[i] ((0, 0) where bad)."""

    sizes: np.ndarray  # (N, 2) int32
    bad: tuple[tuple[int, str], ...]  # (index into files, reason), in file order
    cached: int = 0  # how many results came from the cache


def cache_dir() -> Path:
    """Where check results are cached: $MIXTAIL_CACHE_DIR, else $XDG_CACHE_HOME/mixtail, else ~/.cache/mixtail;
    each file list's results live in <that>/image_checks/<sha256 of the list and level>.npz."""
    if os.environ.get("MIXTAIL_CACHE_DIR"):
        return Path(os.environ["MIXTAIL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mixtail"


def _cache_path(files: list[str]) -> Path:
    digest = hashlib.sha256(f"v{CACHE_VERSION}\n".encode())
    for f in files:
        digest.update(f.encode("utf-8", "surrogateescape") + b"\n")
    return cache_dir() / "image_checks" / f"{digest.hexdigest()[:32]}.npz"


# Status codes stored in the cache, one per file.
_UNCHECKED, _GOOD_HEADER, _GOOD_DECODE, _BAD = 0, 1, 2, 3


def _load_cache(path: Path, n: int) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            cache = {k: npz[k] for k in ("stat", "sizes", "status", "bad_index", "bad_reasons")}
    except (OSError, ValueError, KeyError):
        return None  # absent, or written by another version: check again
    if len(cache["status"]) != n:
        return None
    return cache


def _save_cache(path: Path, stat: np.ndarray, sizes: np.ndarray, status: np.ndarray, reasons: list[str]) -> None:
    bad_index = np.flatnonzero(status == _BAD)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            # Reasons only for the bad files: a fixed-width string column for 437k files would be ~250 MB.
            np.savez(f, stat=stat, sizes=sizes, status=status, bad_index=bad_index,
                     bad_reasons=np.array([reasons[i] for i in bad_index], dtype=str))
        os.replace(tmp, path)  # atomic: concurrent ranks each write a whole file, the last one wins
    except OSError as err:
        warnings.warn(f"could not cache image checks in {path.parent} ({err.strerror or err}); "
                      f"set MIXTAIL_CACHE_DIR to a writable folder to skip re-checking next time", stacklevel=3)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def default_threads() -> int:
    # Checks mostly wait on file I/O (a network file system more so), which releases the GIL.
    return min(32, 4 * (os.cpu_count() or 1))


def _blocks(n: int, block: int = 256) -> list[range]:
    return [range(s, min(s + block, n)) for s in range(0, n, block)]


def check_images(files: list[str], *, level: str = "header", threads: int | None = None, desc: str = "checking",
                 cache: bool = True) -> ImageCheck:
    """Check every file (see `check_image`) on a thread pool, with a progress bar for large sets.

    With cache=True and at least CACHE_MIN_FILES files, results are kept in `cache_dir()` and reused for a
    file whose size and mtime (ns) are unchanged; a "decode" result also answers a "header" check.
    """
    if level not in CHECK_LEVELS:
        raise ValueError(f"level must be one of {', '.join(CHECK_LEVELS)}, got {level!r}")
    from tqdm import tqdm

    n = len(files)
    stat = np.full((n, 2), -1, np.int64)  # (size, mtime_ns); -1 where stat failed
    sizes = np.zeros((n, 2), np.int32)
    status = np.full(n, _UNCHECKED, np.int8)
    reasons = [""] * n
    good = _GOOD_DECODE if level == "decode" else _GOOD_HEADER
    use_cache = cache and n >= CACHE_MIN_FILES
    path = _cache_path(files) if use_cache else None
    old = _load_cache(path, n) if use_cache else None
    reused = np.zeros(n, bool)
    pool = ThreadPoolExecutor(max_workers=threads or default_threads())
    with pool, tqdm(total=n, desc=desc, unit="img", disable=n < PROGRESS_MIN_FILES, leave=False,
                    file=sys.stderr) as bar:
        def stat_one(i: int) -> None:
            # Taken before the file is checked: a file changed during its check looks changed next time.
            try:
                st = os.stat(files[i])
                stat[i] = (st.st_size, st.st_mtime_ns)
            except OSError:
                pass  # stays -1, never matches the cache; check_image names the reason

        if old is not None:
            list(pool.map(lambda block: [stat_one(i) for i in block], _blocks(n)))
            was = old["status"]
            reused = (stat[:, 0] >= 0) & (stat == old["stat"]).all(axis=1) & ((was == _BAD) | (was >= good))
            status[reused], sizes[reused] = was[reused], old["sizes"][reused]
            for i, reason in zip(old["bad_index"].tolist(), old["bad_reasons"].tolist()):
                if reused[i]:
                    reasons[i] = reason
            bar.update(int(reused.sum()))

        def work(block: np.ndarray) -> int:
            for i in block:
                if old is None:
                    stat_one(i)
                try:
                    sizes[i] = check_image(files[i], level)
                    status[i] = good
                except BadImage as err:
                    status[i], reasons[i] = _BAD, str(err)
            return len(block)

        todo = np.flatnonzero(~reused)
        for done in pool.map(work, [todo[b.start:b.stop] for b in _blocks(len(todo))]):
            bar.update(done)
    if use_cache and not reused.all():
        _save_cache(path, stat, sizes, status, reasons)
    bad = tuple((i, reasons[i]) for i in np.flatnonzero(status == _BAD).tolist())
    return ImageCheck(sizes, bad, int(reused.sum()))


# --------------------------------------------------------------------------------------------------
# Decoding many files
# --------------------------------------------------------------------------------------------------


def _decode_all(files: list[str], out: np.ndarray, one, desc: str) -> None:
    """Run one(i, rgb) for every decoded file on a thread pool; a DataError names every file that fails."""
    from tqdm import tqdm

    from mixtail.errors import DataError

    failures: list[tuple[str, str]] = []

    def load(i: int) -> None:
        try:
            one(i, _decode(files[i]))
        except BadImage as err:
            failures.append((files[i], str(err)))

    # PIL's decoders and resamplers release the GIL, so threads scale with cores.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(tqdm(pool.map(load, range(len(files))), total=len(files), desc=desc, unit="img",
                  disable=len(files) < PROGRESS_MIN_FILES, leave=False, file=sys.stderr))
    if failures:
        failures.sort()
        raise DataError(bad_files_message([f"{p}: {r}" for p, r in failures], len(files), "images to decode",
                                          "they could not be decoded"))


def decode_images(files: list[str], size: int, desc: str = "decoding") -> np.ndarray:
    """Decode files into one (N, size, size, 3) uint8 array; images of another size are squashed to it
    (PIL bilinear, antialiased when shrinking)."""
    from PIL import Image

    out = np.empty((len(files), size, size, 3), dtype=np.uint8)

    def one(i: int, rgb: np.ndarray) -> None:
        if rgb.shape[:2] != (size, size):
            rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))
        out[i] = rgb

    _decode_all(files, out, one, desc)
    return out


def canvas_shape(height: int, width: int, short_side: int, max_side: int) -> tuple[int, int]:
    """(h, w) of an image resized on its own aspect ratio: the shorter side becomes short_side unless the
    longer would then exceed max_side, in which case the longer side becomes max_side. Small images are
    upscaled too, so that every image is seen at the same scale relative to the crops drawn on it."""
    if not 1 <= short_side <= max_side:
        raise ValueError(f"need 1 <= short_side <= max_side, got short_side={short_side}, max_side={max_side}")
    short, long = min(height, width), max(height, width)
    new_long = round(long * short_side / short)
    if new_long <= max_side:
        new_short = short_side
    else:
        new_long, new_short = max_side, max(1, min(max_side, round(short * max_side / long)))
    return (new_short, new_long) if height <= width else (new_long, new_short)


def decode_to_canvas(files: list[str], *, short_side: int, max_side: int,
                     desc: str = "decoding") -> tuple[np.ndarray, np.ndarray]:
    """Decode files onto (N, max_side, max_side, 3) uint8 canvases and return them with sizes (N, 2) int32.

    Each image is resized (PIL bilinear, antialiased when shrinking) to `canvas_shape(h, w, short_side,
    max_side)`, never squashed, and placed at the top-left of its canvas; sizes[i] = (h, w) is that valid
    region, and every pixel outside it is 0.
    """
    from PIL import Image

    canvas_shape(1, 1, short_side, max_side)  # validates the sides before any work
    out = np.zeros((len(files), max_side, max_side, 3), dtype=np.uint8)
    sizes = np.zeros((len(files), 2), dtype=np.int32)

    def one(i: int, rgb: np.ndarray) -> None:
        h, w = canvas_shape(rgb.shape[0], rgb.shape[1], short_side, max_side)
        if (h, w) != rgb.shape[:2]:
            rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
        out[i, :h, :w] = rgb
        sizes[i] = (h, w)

    _decode_all(files, out, one, desc)
    return out, sizes


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------

LIST_IN_MESSAGE = 10  # bad files named in the one-line error; the rest go to a file the message names


def bad_files_message(lines: list[str], total: int, what: str, hint: str) -> str:
    """One line naming every bad file ("path: reason"), or the first LIST_IN_MESSAGE and a file with all."""
    head = f"{len(lines)} of {total} {what}: {hint}: " + "; ".join(lines[:LIST_IN_MESSAGE])
    if len(lines) <= LIST_IN_MESSAGE:
        return head
    listing = cache_dir() / "bad_images" / f"{hashlib.sha256(''.join(lines).encode()).hexdigest()[:16]}.txt"
    try:
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        where = f"; all {len(lines)} are listed in {listing}"
    except OSError as err:
        where = f" (the full list could not be written to {listing}: {err.strerror or err})"
    return f"{head}; ... and {len(lines) - LIST_IN_MESSAGE} more{where}"


def files_under(paths: list[str]) -> list[str]:
    files = []
    for p in paths:
        if os.path.isdir(p):
            for folder, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not is_hidden(d))
                files += [os.path.join(folder, n) for n in sorted(names)
                          if not is_hidden(n) and n.lower().endswith(IMAGE_EXTENSIONS)]
        else:
            files.append(p)
    return files
