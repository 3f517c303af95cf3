"""Per-image augmentation as batched torch ops: the reference every loader backend is tested against.

Random parameters are drawn on the host with numpy (`sample_aug_params`, a few numbers per image) and
applied on whatever device the images are on (`augment`), with no per-image Python:

- geometry: CIFAR pad-and-crop or RandomResizedCrop, plus horizontal flip, as one `grid_sample`
  whose sampling grid is built per image;
- colour: brightness, contrast (around 0.5), saturation and hue (a rotation in YIQ space), composed
  into one 3×3 matrix and offset per image, then optional grayscale. This is the colour-twist
  model DALI's `color_twist` uses, so the DALI backend can apply the same parameters.

    rng = np.random.default_rng(0)
    p = sample_aug_params(rng, n=128, height=32, width=32, cfg=AugConfig())
    x = augment(images_uint8_nchw, p, out_size=32)   # float in [0, 1], (128, 3, 32, 32)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

# Luma weights (ITU-R BT.601), the Y row of RGB->YIQ.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114],
                        [0.596, -0.274, -0.322],
                        [0.211, -0.523, 0.312]], dtype=np.float64)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


@dataclass(frozen=True)
class AugParams:
    """Per-image augmentation parameters (numpy, one row per image)."""

    crop: np.ndarray  # (n, 4) float32: top, left, height, width of the source window (may leave the image)
    flip: np.ndarray  # (n,) bool: mirror horizontally
    brightness: np.ndarray  # (n,) float32, 1 = unchanged
    contrast: np.ndarray  # (n,) float32, 1 = unchanged, around 0.5
    saturation: np.ndarray  # (n,) float32, 1 = unchanged
    hue: np.ndarray  # (n,) float32, fraction of a full turn, 0 = unchanged
    grayscale: np.ndarray  # (n,) bool

    def __len__(self) -> int:
        return len(self.flip)

    def select(self, idx) -> "AugParams":
        return AugParams(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def is_identity_colour(self) -> bool:
        return bool(np.all(self.brightness == 1) and np.all(self.contrast == 1) and np.all(self.saturation == 1)
                    and np.all(self.hue == 0) and not self.grayscale.any())


def identity_aug_params(n: int, height: int, width: int) -> AugParams:
    """Parameters that leave an image as it is (aug_order: none, and test images)."""
    crop = np.tile(np.array([0, 0, height, width], dtype=np.float32), (n, 1))
    ones, zeros = np.ones(n, np.float32), np.zeros(n, np.float32)
    return AugParams(crop, np.zeros(n, bool), ones, ones.copy(), ones.copy(), zeros, np.zeros(n, bool))


def _resized_crop_windows(rng: np.random.Generator, n: int, height, width,
                          scale: tuple[float, float], ratio: tuple[float, float]) -> np.ndarray:
    """RandomResizedCrop windows, vectorized: 10 tries per image, then a centre crop (torchvision's rule).

    height and width are scalars or (n,) arrays: each window is drawn on its own image's size, so the
    aspect-ratio range applies to the photo itself.
    """
    tries = 10
    height = np.broadcast_to(np.asarray(height, dtype=np.float64), (n,))[:, None]
    width = np.broadcast_to(np.asarray(width, dtype=np.float64), (n,))[:, None]
    area = height * width
    target = area * rng.uniform(scale[0], scale[1], (n, tries))
    log_ratio = rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (n, tries))
    aspect = np.exp(log_ratio)
    w = np.floor(np.sqrt(target * aspect) + 0.5)
    h = np.floor(np.sqrt(target / aspect) + 0.5)
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = np.argmax(ok, axis=1)
    rows = np.arange(n)
    h, w, found = h[rows, first], w[rows, first], ok[rows, first]
    height, width = height[:, 0], width[:, 0]
    # Fallback: the largest centre crop within the ratio range.
    in_ratio = width / height
    fw = np.where(in_ratio < ratio[0], width, np.where(in_ratio > ratio[1], np.round(height * ratio[1]), width))
    fh = np.where(in_ratio < ratio[0], np.round(width / ratio[0]), height)
    h = np.where(found, h, fh)
    w = np.where(found, w, fw)
    u_top, u_left = rng.random(n), rng.random(n)
    top = np.where(found, np.floor(u_top * (height - h + 1)), (height - h) // 2)
    left = np.where(found, np.floor(u_left * (width - w + 1)), (width - w) // 2)
    return np.stack([top, left, h, w], axis=1).astype(np.float32)


def sample_aug_params(rng: np.random.Generator, n: int, height, width, cfg, crop: bool = True) -> AugParams:
    """Draw the augmentation of n images under an AugConfig; height and width are scalars or (n,) arrays.

    crop=False (mix.aug_order=none, Table 5's "No cropping") keeps every image whole and still draws the
    flip and the colour transform.
    """
    hw = np.stack(np.broadcast_arrays(np.asarray(height, np.float32), np.asarray(width, np.float32)), -1)
    hw = np.broadcast_to(hw, (n, 2))
    if not crop:
        windows = np.concatenate([np.zeros((n, 2), np.float32), hw], axis=1)
    elif cfg.crop == "pad":
        offsets = rng.integers(-cfg.pad_px, cfg.pad_px + 1, (n, 2)).astype(np.float32)
        windows = np.concatenate([offsets, hw], axis=1)
    else:
        windows = _resized_crop_windows(rng, n, hw[:, 0], hw[:, 1], cfg.scale, cfg.ratio)
    flip = (rng.random(n) < 0.5) if cfg.flip else np.zeros(n, bool)
    s = cfg.color_jitter
    on = rng.random(n) < cfg.color_prob
    jitter = rng.uniform(1 - s, 1 + s, (3, n)) if s > 0 else np.ones((3, n))
    jitter = np.where(on[None], np.maximum(jitter, 0.0), 1.0).astype(np.float32)
    hue = np.where(on, rng.uniform(-cfg.hue, cfg.hue, n), 0.0).astype(np.float32)
    gray = rng.random(n) < cfg.grayscale_prob
    return AugParams(windows.astype(np.float32), flip, jitter[0], jitter[1], jitter[2], hue, gray)


def colour_matrices(p: AugParams) -> tuple[np.ndarray, np.ndarray]:
    """The per-image affine colour map x' = M·x + t (RGB in [0, 1]) that `augment` applies.

    Order: brightness, contrast around 0.5, saturation and hue in YIQ, then grayscale.
    """
    n = len(p)
    theta = 2 * np.pi * p.hue.astype(np.float64)
    yiq = np.zeros((n, 3, 3))
    yiq[:, 0, 0] = 1.0
    yiq[:, 1, 1] = yiq[:, 2, 2] = p.saturation * np.cos(theta)
    yiq[:, 1, 2] = -p.saturation * np.sin(theta)
    yiq[:, 2, 1] = p.saturation * np.sin(theta)
    hue_sat = _YIQ_TO_RGB @ yiq @ _RGB_TO_YIQ  # (n, 3, 3)
    gray = np.repeat(_RGB_TO_YIQ[:1], 3, axis=0)  # every channel becomes the luma
    hue_sat = np.where(p.grayscale[:, None, None], gray @ hue_sat, hue_sat)
    bc = (p.contrast * p.brightness).astype(np.float64)
    m = hue_sat * bc[:, None, None]
    t = hue_sat @ np.full(3, 0.5) * (1 - p.contrast.astype(np.float64))[:, None]
    return m.astype(np.float32), t.astype(np.float32)


def sampling_grid(crop: torch.Tensor, flip: torch.Tensor, src_hw: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
    """grid_sample grid (n, out_h, out_w, 2) that maps each output pixel centre into its source window.

    The semantics are crop-then-resize (torchvision's RandomResizedCrop, F.interpolate bilinear with
    align_corners=False): coordinates are clamped to the window's edge pixels, so an upscaled window
    never blends in pixels outside itself, nor the zero padding where it touches the image border.
    Source pixels outside the image (a pad-and-crop window) read as 0.
    """
    n = crop.shape[0]
    out_h, out_w = out_hw
    src_h, src_w = src_hw
    dev = crop.device
    i = torch.arange(out_h, device=dev, dtype=torch.float32)
    j = torch.arange(out_w, device=dev, dtype=torch.float32)
    top, left, h, w = (crop[:, k, None] for k in range(4))  # (n, 1)
    ys = top + (i[None] + 0.5) * (h / out_h) - 0.5  # (n, out_h), source pixel coordinates
    ys = torch.minimum(torch.maximum(ys, top), top + h - 1)
    jj = torch.where(flip[:, None], out_w - 1 - j[None], j[None].expand(n, -1))
    xs = left + (jj + 0.5) * (w / out_w) - 0.5  # (n, out_w)
    xs = torch.minimum(torch.maximum(xs, left), left + w - 1)
    gy = (2 * ys + 1) / src_h - 1  # align_corners=False normalization
    gx = (2 * xs + 1) / src_w - 1
    return torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)


def params_to_torch(p: AugParams, device: torch.device) -> dict[str, torch.Tensor]:
    m, t = colour_matrices(p)
    return {
        "crop": torch.from_numpy(p.crop).to(device, non_blocking=True),
        "flip": torch.from_numpy(p.flip).to(device, non_blocking=True),
        "colour_m": torch.from_numpy(m).to(device, non_blocking=True),
        "colour_t": torch.from_numpy(t).to(device, non_blocking=True),
        "identity_colour": p.is_identity_colour(),
    }


def augment_tensors(x: torch.Tensor, crop: torch.Tensor, flip: torch.Tensor, colour_m: torch.Tensor | None,
                    colour_t: torch.Tensor | None, out_size: int) -> torch.Tensor:
    """The batched augmentation itself: float (n, 3, H, W) in [0, 1] -> (n, 3, out_size, out_size).

    crop: (n, 4) float windows in pixels of the (H, W) input; flip: (n,) bool or int; colour_m (n, 3, 3) and
    colour_t (n, 3), or None for no colour change.
    """
    n, _, h, w = x.shape
    grid = sampling_grid(crop, flip.bool(), (h, w), (out_size, out_size))
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if colour_m is not None:
        x = torch.einsum("nij,njhw->nihw", colour_m, x) + colour_t[:, :, None, None]
        x = x.clamp_(0.0, 1.0)
    return x


def augment(images: torch.Tensor, p: AugParams | dict, out_size: int) -> torch.Tensor:
    """Augment a batch: uint8 or float (n, 3, H, W) -> float32 (n, 3, out_size, out_size) in [0, 1]."""
    tp = params_to_torch(p, images.device) if isinstance(p, AugParams) else p
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    colour = not tp["identity_colour"]
    return augment_tensors(x, tp["crop"], tp["flip"], tp["colour_m"] if colour else None,
                           tp["colour_t"] if colour else None, out_size)


def box_mask(box: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(n, 1, H, W) bool: True inside each sample's box."""
    i = torch.arange(height, device=box.device)
    j = torch.arange(width, device=box.device)
    top, left, bh, bw = (box[:, k, None] for k in range(4))
    rows = (i[None] >= top) & (i[None] < top + bh)  # (n, H)
    cols = (j[None] >= left) & (j[None] < left + bw)  # (n, W)
    return (rows[:, :, None] & cols[:, None, :])[:, None]
