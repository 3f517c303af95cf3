"""Independent numpy rebuilds of the augmentation and mixing ops, for tests/test_augment.py and
tests/test_mixing.py (DALI's multi_paste test style: the expected image is rebuilt pixel by pixel in
numpy, never with the module's own helpers).

Everything here is float64, one image at a time, written from the definitions:
- bilinear resize with align_corners=False: source = (dst + ½)·in/out − ½, clamped at the edges, the
  same rule as torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=False);
- crop-then-resize for a crop window (zeros where the window leaves the image: pad-and-crop);
- the colour ops applied one after the other (brightness, contrast around 0.5, saturation and hue in
  YIQ, grayscale), clamped to [0, 1] at the end.
"""

from __future__ import annotations

import numpy as np

# ITU-R BT.601 luma and the YIQ transform (the definition, typed in here, not imported).
LUMA = np.array([0.299, 0.587, 0.114])
RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114],
                       [0.596, -0.274, -0.322],
                       [0.211, -0.523, 0.312]])


def grid_tolerance(size: int) -> float:
    """Absolute tolerance on [0, 1] pixels when comparing the torch ops with these rebuilds. grid_sample works
    in float32 normalized coordinates, so a pixel position carries an error of about size·6e-8 px; that is
    below 1e-5 in value up to 32 px and grows linearly beyond. An off-by-one pixel or a wrong interpolation
    weight is ~1e-1 on random images."""
    return 1e-5 * max(1.0, size / 32)


def bilinear_resize(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """(C, H, W) -> (C, out_h, out_w), bilinear, align_corners=False, edge-clamped."""
    _, h, w = img.shape

    def taps(n_in: int, n_out: int):
        src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        src = np.maximum(src, 0.0)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        frac = src - i0
        return i0, i1, frac

    y0, y1, fy = taps(h, out_h)
    x0, x1, fx = taps(w, out_w)
    img = img.astype(np.float64)
    top = img[:, y0][:, :, x0] * (1 - fx) + img[:, y0][:, :, x1] * fx
    bottom = img[:, y1][:, :, x0] * (1 - fx) + img[:, y1][:, :, x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


def crop_window(img: np.ndarray, top: int, left: int, h: int, w: int) -> np.ndarray:
    """img[:, top:top+h, left:left+w] where the window may leave the image; outside pixels are 0."""
    c, height, width = img.shape
    out = np.zeros((c, h, w), dtype=np.float64)
    ys, xs = np.arange(top, top + h), np.arange(left, left + w)
    vy, vx = (ys >= 0) & (ys < height), (xs >= 0) & (xs < width)
    out[np.ix_(np.arange(c), vy, vx)] = img[np.ix_(np.arange(c), ys[vy], xs[vx])]
    return out


def resized_crop(img: np.ndarray, top: int, left: int, h: int, w: int, out: int, flip: bool) -> np.ndarray:
    """Crop the window, resize it to out×out (bilinear), then mirror horizontally if `flip`."""
    x = bilinear_resize(crop_window(img, top, left, h, w), out, out)
    return x[:, :, ::-1] if flip else x


def colour(img: np.ndarray, brightness: float, contrast: float, saturation: float, hue: float,
           grayscale: bool) -> np.ndarray:
    """(3, H, W) in [0, 1]: the colour ops in order, each on the result of the previous, clamped at the end."""
    x = img.astype(np.float64) * brightness
    x = (x - 0.5) * contrast + 0.5
    yiq = np.einsum("ij,jhw->ihw", RGB_TO_YIQ, x)
    theta = 2 * np.pi * hue
    i, q = yiq[1] * saturation, yiq[2] * saturation
    yiq = np.stack([yiq[0], np.cos(theta) * i - np.sin(theta) * q, np.sin(theta) * i + np.cos(theta) * q])
    x = np.einsum("ij,jhw->ihw", np.linalg.inv(RGB_TO_YIQ), yiq)
    if grayscale:
        x = np.repeat(np.einsum("j,jhw->hw", LUMA, x)[None], 3, axis=0)
    return np.clip(x, 0.0, 1.0)


def augment(images: np.ndarray, p, out: int) -> np.ndarray:
    """(n, 3, H, W) uint8 or float in [0, 1] -> (n, 3, out, out) float64, reading an AugParams' numbers."""
    x = images.astype(np.float64) / 255.0 if images.dtype == np.uint8 else images.astype(np.float64)
    result = []
    for k in range(len(x)):
        top, left, h, w = (int(v) for v in p.crop[k])
        assert np.array_equal(p.crop[k], [top, left, h, w]), "this rebuild handles integer windows only"
        y = resized_crop(x[k], top, left, h, w, out, bool(p.flip[k]))
        identity = (p.brightness[k] == 1 and p.contrast[k] == 1 and p.saturation[k] == 1 and p.hue[k] == 0
                    and not p.grayscale[k])
        if not identity:
            y = colour(y, float(p.brightness[k]), float(p.contrast[k]), float(p.saturation[k]), float(p.hue[k]),
                       bool(p.grayscale[k]))
        result.append(y)
    return np.stack(result)


def paste(fg: np.ndarray, bg: np.ndarray, box, mix_op: str) -> np.ndarray:
    """(n, C, H, W) float: each background with its foreground (resized whole, or its own pixels) in the box."""
    out = bg.astype(np.float64).copy()
    for k, (top, left, bh, bw) in enumerate(np.asarray(box, dtype=np.int64)):
        if bh == 0 or bw == 0:
            continue
        if mix_op == "resize":
            region = bilinear_resize(fg[k], bh, bw)
        else:
            region = fg[k, :, top:top + bh, left:left + bw]
        out[k, :, top:top + bh, left:left + bw] = region
    return out


def round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def cutmix_box(share: float, row: int, col: int, height: int, width: int) -> tuple[int, int, int, int]:
    """CutMix's rand_bbox as CMO's cifar_train.py writes it, one box at a time in Python ints: cut = int(side·√share)
    per axis, the centre pixel (row, col), the half-cut on either side, clipped to the image. (top, left, h, w)."""
    cut_h, cut_w = int(height * float(np.sqrt(share))), int(width * float(np.sqrt(share)))
    y1, y2 = min(max(row - cut_h // 2, 0), height), min(max(row + cut_h // 2, 0), height)
    x1, x2 = min(max(col - cut_w // 2, 0), width), min(max(col + cut_w // 2, 0), width)
    return y1, x1, y2 - y1, x2 - x1
