"""The bytes a converted image is stored as: bounded in size, kept as the source file or encoded as PNG or
JPEG, and decoded back the way each target's reader does."""

from __future__ import annotations

import io
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mixtail.errors import DataError
from mixtail.pipelines.sources.images import load_rgb
from mixtail.pipelines.sources.types import ImageArrays, ImageFiles


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
