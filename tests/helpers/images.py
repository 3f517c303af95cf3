"""Generated image data for the tests, so that a fresh clone anywhere runs them without the real datasets.

- `photo_pixels`: natural-looking content (1/f noise over several octaves, with hard-edged shapes on top), which
  JPEG codes and resamplers treat the way they treat photographs; pure noise would make any codec or resize
  error large, flat colour would hide a wrong one.
- `write_photos`: a folder of such JPEGs at the sizes, aspect ratios and encodings photo collections hold
  (ImageNet's: 68 to 2400 px, 1:2.4 to 3.4:1, chroma subsampling 4:4:4, 4:2:2 and 4:2:0, progressive, grayscale,
  an EXIF rotation).
- `cifar_like_jpeg`, `write_cifar_like_tree`: 32×32 JPEGs and a CIFAR-10-style folder tree
  (train/<class>/NNNN.jpg, test/<class>/NNNN.jpg) of them.

Everything is drawn from seeded generators: the same call gives the same bytes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROLL_OFF = 1.4  # per octave, coarse over fine: about the 1/f amplitude spectrum of photographs
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def photo_pixels(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8: 1/f noise (a pyramid: noise at 1/2^k of the size for each k, each octave's amplitude
    1/ROLL_OFF of the next coarser one's, upsampled bilinearly and summed) with a few filled ellipses and triangles
    drawn over it. As in photographs, colour varies at coarse scales and fine detail is mostly brightness."""
    levels = [(height, width)]
    while min(levels[-1]) > 4:
        levels.append((max(2, (levels[-1][0] + 1) // 2), max(2, (levels[-1][1] + 1) // 2)))
    img = np.zeros((*levels[-1], 3), np.float32)
    for k, (h, w) in enumerate(reversed(levels)):
        if img.shape[:2] != (h, w):
            img = np.stack([np.asarray(Image.fromarray(img[..., c], "F").resize((w, h), Image.BILINEAR))
                            for c in range(3)], -1)
        octaves_from_finest = len(levels) - 1 - k
        chroma = 0.8 if octaves_from_finest >= 3 else 0.15
        brightness = rng.standard_normal((h, w, 1), dtype=np.float32)
        colour = rng.standard_normal((h, w, 3), dtype=np.float32)
        img += (brightness + chroma * colour) * np.float32(ROLL_OFF ** octaves_from_finest)
    img -= img.mean((0, 1))
    img = 128 + img * (50 / max(float(img.std()), 1e-6)) + rng.normal(0, 30, 3).astype(np.float32)
    canvas = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 6))):
        x0, x1 = sorted(rng.integers(0, width, 2).tolist())
        y0, y1 = sorted(rng.integers(0, height, 2).tolist())
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1 + 1, y1 + 1), fill=colour)
        else:
            draw.polygon([(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(3)], fill=colour)
    return np.asarray(canvas)


def jpeg_bytes(pixels: np.ndarray, *, quality: int = 90, subsampling: int = 2, progressive: bool = False,
               grey: bool = False, orientation: int | None = None) -> bytes:
    """The pixels as a JPEG: `subsampling` in PIL's numbering (0 is 4:4:4, 1 is 4:2:2, 2 is 4:2:0); `grey`
    stores one channel; `orientation` writes that EXIF orientation tag (the pixels are stored as given)."""
    image = Image.fromarray(pixels)
    if grey:
        image = image.convert("L")
    kw = {}
    if orientation is not None:
        exif = image.getexif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality, subsampling=-1 if grey else subsampling, progressive=progressive, **kw)
    return buf.getvalue()


# (width, height, encoding) of the photos `write_photos` writes, in name order. The first six are the extremes
# tests pick by position: tall 1:2.4, wide 3.4:1, a small one, the largest (2400×1600), a wide grayscale one and
# the typical 500×375; then progressive, the smallest (68×100), an EXIF-rotated one (orientation 6: stored 500×333,
# seen 333×500), 4:4:4, 4:2:2 and a lower quality.
PHOTO_SPECS: list[tuple[int, int, dict]] = [
    (220, 530, dict(subsampling=0)),
    (411, 120, dict(subsampling=2)),
    (135, 97, dict(subsampling=1)),
    (2400, 1600, dict(subsampling=2)),
    (800, 286, dict(grey=True)),
    (500, 375, dict(subsampling=2)),
    (375, 500, dict(subsampling=2, progressive=True)),
    (68, 100, dict(subsampling=0)),
    (500, 333, dict(subsampling=0, orientation=6)),
    (640, 480, dict(subsampling=0, progressive=True)),
    (300, 159, dict(subsampling=2)),
    (845, 563, dict(subsampling=1)),
    (500, 375, dict(subsampling=0)),
    (333, 500, dict(subsampling=2)),
    (250, 204, dict(subsampling=2, quality=75)),
    (1024, 683, dict(subsampling=2, progressive=True)),
]
# Typical sizes for photos beyond the listed ones.
_MORE_SIZES = [(500, 375), (375, 500), (500, 333), (400, 300), (500, 400)]


def write_photos(folder: Path, count: int = len(PHOTO_SPECS), seed: int = 0) -> list[Path]:
    """`count` photo-like JPEGs, folder/pNNN_WxH.JPEG (the upper-case extension ImageNet uses), sorted by name in
    the order of PHOTO_SPECS, then typical sizes; their paths in name order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        w, h, enc = PHOTO_SPECS[i] if i < len(PHOTO_SPECS) else (*_MORE_SIZES[i % len(_MORE_SIZES)], {})
        path = folder / f"p{i:03d}_{w}x{h}.JPEG"
        path.write_bytes(jpeg_bytes(photo_pixels(rng, h, w), **enc))
        paths.append(path)
    return paths


def cifar_like_jpeg(label: int, index: int, seed: int = 0) -> bytes:
    """A 32×32 RGB JPEG of photo-like content, the same bytes for the same (label, index, seed)."""
    rng = np.random.default_rng([seed, label, index])
    return jpeg_bytes(photo_pixels(rng, 32, 32), quality=95)


def write_cifar_like_tree(root: Path, classes: list[str], train_per_class: int, test_per_class: int,
                          seed: int = 0) -> Path:
    """root/train/<class>/NNNN.jpg and root/test/<class>/NNNN.jpg, as the CIFAR-10 JPEG archive lays them out."""
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                (folder / f"{k:04d}.jpg").write_bytes(
                    cifar_like_jpeg(label, k if split == "train" else 100_000 + k, seed))
    return root
