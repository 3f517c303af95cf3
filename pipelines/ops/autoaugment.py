"""AutoAugment's CIFAR-10 policy and Cutout as batched torch ops, and the per-component policy views
(`aug.policy: simclr | autoaugment | cmo_randaug`; docs/method.md, "Augmentation before mixing").

Like augment.py, every random number is drawn on the host with numpy from the per-batch generator
(`sampling.batch_generator`), as fixed-width arrays with one row per image, so a batch is a pure function of
(seed, epoch, rank, batch) and another backend can apply the same numbers. The ops then run on whatever
device the images are on, op type by op type, each on the rows that drew it: no Python loop over images.

    rng = np.random.default_rng(0)
    aa = sample_autoaugment(rng, n=128, height=32, width=32)
    y = apply_autoaugment(x, aa)                   # x: float (128, 3, 32, 32) in [0, 1], any device

    aug, view = sample_view(rng, 128, 32, 32, AugConfig(policy="autoaugment"))
    y = augment_view(images_uint8, aug, view, out_size=32)   # crop + flip -> AutoAugment -> Cutout

The policy and its ops
----------------------
The 25 sub-policies are Cubuk et al.'s CIFAR-10 policy (AutoAugment, 2019), each two (op, probability,
magnitude bin) entries; bins 0..9 map to magnitudes as torchvision's `AutoAugment` does (num_bins=10):
ShearX/Y 0.3·b/9 (the shear factor), TranslateX/Y 150/331·size·b/9 px truncated to whole pixels, Rotate
30·b/9 degrees, Brightness/Color/Contrast/Sharpness an enhancement factor 1 ± 0.9·b/9, Posterize
8 − round(b·4/9) bits, Solarize a threshold of 255 − 255·b/9 levels. The shears, translations, rotation and
the four enhancements are signed: each fired op flips its sign with probability 1/2. An op fires when a
uniform draw is below its probability. Geometric ops sample the nearest source pixel (torchvision's default,
and what the PIL code the peers run uses for translate and rotate). Posterize, Solarize and Equalize are
defined on 8-bit levels, so they read each pixel as round(255·x); the other ops work on the float values.

Which variant, and why. The long-tailed peers this recipe follows (CMO's `util/autoaug.py`, taken from
PaCo's; BCL's public code has no CIFAR pipeline) run a PIL port of the policy with the same table and bins
but: fill 128 (grey) where a geometric op uncovers the image, not torchvision's 0; a bicubic shear;
translations of 150/331·size·b/9 px without truncation; Rotate never negated; a Solarize threshold of
256 − 256·b/9. We keep torchvision's op definitions, so every op is tested against a public reference
(tests/test_autoaugment.py), and take the peers' fill of 128/255 (`FILL`): the fill is the one difference
that changes many pixels (a translation by bin 9 uncovers 14 of 32 columns), and grey is what the 84–88%
CIFAR-10-LT numbers were trained with and close to the dataset-mean fill of the original AutoAugment code.
The other differences move single levels or half pixels.

Geometric ops as matrices. Each fired Shear/Translate/Rotate is also written, on the host, as a 2×3 inverse
map (`AutoAugmentParams.affine`, (n, 2, 2, 3), one per slot, identity elsewhere): source = A·(x, y, 1) for
the destination point (x, y), in pixel units with the origin at the image's top-left corner and pixel
centres at half-integers. That is the destination-to-source matrix DALI's `fn.warp_affine` takes
(inverse_map=True, nearest interpolation, fill_value=128), so a DALI graph can apply the same numbers;
the torch path reads the same matrices. The two slots are applied one after the other, never composed:
with nearest sampling and a fill, one warp by the product is not the same image as two warps.

Cutout (DeVries & Taylor, 2017) follows the reference code the peers use: a centre drawn uniformly over
all pixels, the square [c − L//2, c + L//2) clipped at the border (so it can be smaller near the edge, and
an odd L covers L − 1 rows), pixels set to 0 before normalization.

Policies (docs/method.md, "Augmentation before mixing"): `simclr` is augment.py's crop, flip, colour jitter and
grayscale; `autoaugment` is crop, flip, the CIFAR-10 policy and Cutout (no colour jitter); `cmo_randaug` picks one
of the two per image with probability 1/2 each (`CMO_AUTOAUGMENT_PROB`). The order inside a component view is crop +
flip (augment.py) → AutoAugment → colour jitter (simclr rows only) → Cutout; no row has both AutoAugment and jitter,
so running augment.py's crop + flip + jitter first and then AutoAugment + Cutout (`augment_view`) is that order.

`cmo_randaug` is our reading of CMO. CMO's own CIFAR code (`--use_randaug`: cifar_train.py and
imbalance_data/imbalance_cifar.py) also picks per image, with probability 1/2, but between two whole
pipelines whose crops differ: pad-4 RandomCrop + flip + the policy + Cutout 16, or RandomResizedCrop 32
with scale (0.2, 1) + flip + ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8 + grayscale 0.2 + a Gaussian blur
(σ uniform in [0.1, 2] px) with p 0.5. Here both branches share the configured crop (`aug.crop`), and the
SimCLR branch has no blur.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F

from mixtail.errors import ConfigError
from mixtail.pipelines.ops.augment import (
    AugParams,
    augment,
    box_mask,
    sample_aug_params,
)

OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
OP_ID = {name: i for i, name in enumerate(OPS)}
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
ENHANCE = ("Brightness", "Color", "Contrast", "Sharpness")  # magnitude = enhancement factor 1 ± m
SIGNED = GEOMETRIC + ENHANCE
NUM_BINS = 10
NO_OP = -1  # op id of a slot that does not fire

# The grey the peers' PIL policy fills uncovered pixels with (see the module docstring), as a [0, 1] value.
FILL = 128 / 255
# cmo_randaug: the probability that an image takes the AutoAugment view rather than the SimCLR one.
CMO_AUTOAUGMENT_PROB = 0.5

# Cubuk et al.'s CIFAR-10 policy: 25 sub-policies of two (op, probability, magnitude bin) entries; the bin is
# None for ops without a magnitude.
CIFAR10_POLICY = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)

# The policy as arrays: (25, 2) op ids, probabilities and bins (0 where an op has no magnitude).
_POLICY_OP = np.array([[OP_ID[e[0]] for e in sub] for sub in CIFAR10_POLICY], dtype=np.int8)
_POLICY_PROB = np.array([[e[1] for e in sub] for sub in CIFAR10_POLICY], dtype=np.float64)
_POLICY_BIN = np.array([[e[2] or 0 for e in sub] for sub in CIFAR10_POLICY], dtype=np.int64)
_SIGNED = np.array([name in SIGNED for name in OPS])
_GEOMETRIC_IDS = np.array([OP_ID[name] for name in GEOMETRIC])


def magnitude_bins(height: int, width: int) -> np.ndarray:
    """(14, NUM_BINS) float64: each op's unsigned magnitude per bin, in the op's own units (module docstring),
    for a height×width image. Ops without a magnitude hold 0."""
    t = np.arange(NUM_BINS) / (NUM_BINS - 1)  # 0 .. 1
    table = np.zeros((len(OPS), NUM_BINS))
    table[OP_ID["ShearX"]] = table[OP_ID["ShearY"]] = 0.3 * t
    # Whole pixels, truncated toward zero before the sign is applied (so the two signs are symmetric).
    table[OP_ID["TranslateX"]] = np.trunc(150.0 / 331.0 * width * t)
    table[OP_ID["TranslateY"]] = np.trunc(150.0 / 331.0 * height * t)
    table[OP_ID["Rotate"]] = 30.0 * t
    for name in ENHANCE:
        table[OP_ID[name]] = 0.9 * t  # the factor is 1 ± this
    table[OP_ID["Posterize"]] = 8 - np.round(t * 4)
    table[OP_ID["Solarize"]] = 255.0 * (1 - t)
    return table


@dataclass(frozen=True)
class AutoAugmentParams:
    """Per-image AutoAugment draws (numpy, one row per image, two op slots applied in order)."""

    policy: np.ndarray  # (n,) int8: the sub-policy each image drew, 0..24
    op: np.ndarray  # (n, 2) int8: index into OPS, NO_OP (-1) where the slot does not fire
    # (n, 2) float32, signed, in the op's units: shear factor, pixels, degrees counter-clockwise, the
    # enhancement factor (1 = unchanged), bits kept, solarize threshold in levels; 0 for NO_OP and ops
    # without a magnitude.
    magnitude: np.ndarray
    affine: np.ndarray  # (n, 2, 2, 3) float32: per slot, the destination-to-source map of a geometric op

    def __len__(self) -> int:
        return len(self.op)

    def select(self, idx) -> "AutoAugmentParams":
        return AutoAugmentParams(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


def affine_matrices(op: np.ndarray, magnitude: np.ndarray, height: int, width: int) -> np.ndarray:
    """(..., 2, 3) float32 destination-to-source maps for the geometric ops (identity for every other op),
    in pixel units, origin at the image's top-left corner, pixel centres at half-integers.

    The maps are torchvision's: ShearX/ShearY shear about the top-left corner (source x = x + m·y, or
    source y = y + m·x), a translation by t px reads source x − t, and Rotate by θ degrees turns the image
    counter-clockwise about its centre.
    """
    op = np.asarray(op)
    m = np.asarray(magnitude, dtype=np.float64)
    a = np.zeros(op.shape + (2, 3))
    a[..., 0, 0] = a[..., 1, 1] = 1.0
    shear_x, shear_y = op == OP_ID["ShearX"], op == OP_ID["ShearY"]
    a[..., 0, 1] = np.where(shear_x, m, 0.0)
    a[..., 1, 0] = np.where(shear_y, m, 0.0)
    a[..., 0, 2] = np.where(op == OP_ID["TranslateX"], -m, 0.0)
    a[..., 1, 2] = np.where(op == OP_ID["TranslateY"], -m, 0.0)
    rot = op == OP_ID["Rotate"]
    theta = np.radians(np.where(rot, m, 0.0))
    c, s = np.cos(theta), np.sin(theta)
    cx, cy = width / 2, height / 2
    rotation = np.stack([np.stack([c, -s, cx - c * cx + s * cy], -1),
                         np.stack([s, c, cy - s * cx - c * cy], -1)], -2)
    a = np.where(rot[..., None, None], rotation, a)
    return a.astype(np.float32)


def autoaugment_params(op, magnitude, height: int, width: int, policy=None) -> AutoAugmentParams:
    """Build AutoAugmentParams from explicit (n, 2) op ids and magnitudes (tests, other backends' draws)."""
    op = np.asarray(op, dtype=np.int8)
    magnitude = np.asarray(magnitude, dtype=np.float32)
    if op.ndim != 2 or op.shape[1] != 2 or magnitude.shape != op.shape:
        raise ValueError(f"op and magnitude must both be (n, 2), got {op.shape} and {magnitude.shape}")
    if op.min(initial=0) < NO_OP or op.max(initial=0) >= len(OPS):
        raise ValueError(f"op ids must lie in [{NO_OP}, {len(OPS) - 1}], got {op.min()}..{op.max()}")
    policy = np.full(len(op), -1, np.int8) if policy is None else np.asarray(policy, dtype=np.int8)
    return AutoAugmentParams(policy, op, magnitude, affine_matrices(op, magnitude, height, width))


def sample_autoaugment(rng: np.random.Generator, n: int, height: int, width: int) -> AutoAugmentParams:
    """Draw the CIFAR-10 policy for n images of size height×width.

    Always the same draws in the same order, whatever fires (sub-policy, then two fire uniforms, then two
    sign uniforms per image), so the generator's state afterwards depends only on n.
    """
    policy = rng.integers(0, len(CIFAR10_POLICY), n)
    u_fire = rng.random((n, 2))
    u_sign = rng.random((n, 2))
    op = _POLICY_OP[policy]  # (n, 2)
    fires = u_fire < _POLICY_PROB[policy]
    value = magnitude_bins(height, width)[op, _POLICY_BIN[policy]]
    sign = np.where((u_sign < 0.5) & _SIGNED[op], -1.0, 1.0)
    is_enhance = np.isin(op, [OP_ID[k] for k in ENHANCE])
    magnitude = np.where(is_enhance, 1.0 + sign * value, sign * value)
    op = np.where(fires, op, NO_OP)
    magnitude = np.where(fires, magnitude, 0.0)
    return autoaugment_params(op, magnitude, height, width, policy)


# --------------------------------------------------------------------------------------------------
# The ops, on a float (m, C, H, W) batch in [0, 1] with one magnitude per row (a (m, 1, 1, 1) tensor)
# --------------------------------------------------------------------------------------------------


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(m, 1, H, W) luma with torchvision's weights (rgb_to_grayscale)."""
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * x + (1.0 - factor) * other).clamp(0.0, 1.0)


def _levels(x: torch.Tensor) -> torch.Tensor:
    """The 8-bit level of each pixel, as float."""
    return (x * 255.0).round().clamp(0.0, 255.0)


def warp(x: torch.Tensor, affine: torch.Tensor, fill: float | tuple[float, ...] = FILL) -> torch.Tensor:
    """Nearest-pixel warp of each row by its (m, 2, 3) destination-to-source map; uncovered pixels get fill.

    A channel of ones goes through the same grid_sample, so a pixel counts as uncovered exactly when
    grid_sample's own rounding reads outside the image (torchvision decides it the same way).
    """
    m, c, h, w = x.shape
    dev = x.device
    xs = torch.arange(w, device=dev, dtype=torch.float32) + 0.5
    ys = torch.arange(h, device=dev, dtype=torch.float32) + 0.5
    a = affine.to(dev, torch.float32)
    a = a[:, :, None, None, :]  # (m, 2, 1, 1, 3)
    src = a[..., 0] * xs[None, None, None, :] + a[..., 1] * ys[None, None, :, None] + a[..., 2]  # (m, 2, H, W)
    grid = torch.stack([src[:, 0] * (2.0 / w) - 1.0, src[:, 1] * (2.0 / h) - 1.0], dim=-1)  # align_corners=False
    ones = torch.ones((m, 1, h, w), dtype=x.dtype, device=dev)
    out = F.grid_sample(torch.cat([x, ones], 1), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    fill_t = torch.as_tensor(fill, dtype=x.dtype, device=dev).reshape(1, -1, 1, 1)
    return torch.where(out[:, c:] < 0.5, fill_t, out[:, :c])


def brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * x).clamp(0.0, 1.0)


def color(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Saturation: blend with the per-pixel luma."""
    return _blend(x, _gray(x), factor)


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean luma."""
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with a 3×3 smoothing of the interior ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13; border pixels
    stay), torchvision's and PIL's SMOOTH kernel. Images of side ≤ 2 are left as they are."""
    m, c, h, w = x.shape
    if h <= 2 or w <= 2:
        return x
    kernel = torch.ones((3, 3), dtype=x.dtype, device=x.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / kernel.sum()).expand(c, 1, 3, 3)
    smooth = x.clone()
    smooth[:, :, 1:-1, 1:-1] = F.conv2d(x, kernel, groups=c)
    return _blend(x, smooth, factor)


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top `bits` bits of each 8-bit level."""
    step = torch.exp2(8.0 - bits)
    return torch.floor(_levels(x) / step) * step / 255.0


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert the pixels whose 8-bit level is at least `threshold`."""
    return torch.where(_levels(x) >= threshold, 1.0 - x, x)


def autocontrast(x: torch.Tensor, _unused=None) -> torch.Tensor:
    """Stretch each channel of each image to [0, 1]; a constant channel stays as it is."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    scale = 1.0 / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, ((x - lo) * scale).clamp(0.0, 1.0), x)


def equalize(x: torch.Tensor, _unused=None) -> torch.Tensor:
    """Histogram equalization of each channel of each image on 8-bit levels (PIL's and torchvision's rule).

    One histogram per (image, channel) by scatter_add (no host sync); step = (pixels − count of the top
    level present) // 255; level v maps to (cumulative count below v + step // 2) // step; step 0 leaves
    the channel as it is.
    """
    m, c, h, w = x.shape
    q = _levels(x).long().reshape(m * c, h * w)
    hist = torch.zeros((m * c, 256), dtype=torch.long, device=x.device).scatter_add_(1, q, torch.ones_like(q))
    top = hist.gather(1, q.amax(dim=1, keepdim=True))  # (m·c, 1) count of the highest level present
    step = (h * w - top) // 255
    safe = step.clamp(min=1)
    below = hist.cumsum(1) - hist  # pixels strictly below each level
    lut = ((below + safe // 2) // safe).clamp(0, 255)
    out = torch.where(step > 0, lut.gather(1, q), q)
    return out.reshape(m, c, h, w).to(x.dtype) / 255.0


def invert(x: torch.Tensor, _unused=None) -> torch.Tensor:
    return 1.0 - x


_COLOUR_OPS = {"Brightness": brightness, "Color": color, "Contrast": contrast, "Sharpness": sharpness,
               "Posterize": posterize, "Solarize": solarize, "AutoContrast": autocontrast,
               "Equalize": equalize, "Invert": invert}


def apply_autoaugment(x: torch.Tensor, params: AutoAugmentParams,
                      fill: float | tuple[float, ...] = FILL) -> torch.Tensor:
    """Apply each image's two drawn ops, slot 0 then slot 1: float (n, 3, H, W) in [0, 1] -> the same shape.

    Per slot: one warp over every row whose op is geometric (each row has its own matrix), then each colour
    op over the rows that drew it. The row subsets are found on the host from the numpy params and copied
    to the device in one transfer, so nothing waits on the device.
    """
    n = x.shape[0]
    if len(params) != n:
        raise ValueError(f"{len(params)} parameter rows for {n} images")
    groups: list[tuple[int, str, np.ndarray]] = []  # (slot, op name or "warp", rows)
    for slot in (0, 1):
        ops = params.op[:, slot]
        rows = np.flatnonzero(np.isin(ops, _GEOMETRIC_IDS))
        if rows.size:
            groups.append((slot, "warp", rows))
        for name in _COLOUR_OPS:
            rows = np.flatnonzero(ops == OP_ID[name])
            if rows.size:
                groups.append((slot, name, rows))
    if not groups:
        return x
    dev = x.device
    rows_all = np.concatenate([rows for _, _, rows in groups]).astype(np.int64)
    mag_all = np.concatenate([params.magnitude[rows, slot] for slot, _, rows in groups])
    rows_all = torch.from_numpy(rows_all).to(dev, non_blocking=True)
    mag_all = torch.from_numpy(mag_all).to(dev, non_blocking=True)
    x = x.clone()  # the caller's images stay as they were; the row subsets are then written in place
    start = 0
    for slot, name, rows in groups:
        stop = start + rows.size
        idx, mag = rows_all[start:stop], mag_all[start:stop].to(x.dtype).view(-1, 1, 1, 1)
        start = stop
        sub = x if rows.size == n else x.index_select(0, idx)
        if name == "warp":
            out = warp(sub, torch.from_numpy(params.affine[rows, slot]).to(dev, non_blocking=True), fill)
        else:
            out = _COLOUR_OPS[name](sub, mag)
        if rows.size == n:
            x = out
        else:
            x.index_copy_(0, idx, out)
    return x


# --------------------------------------------------------------------------------------------------
# Cutout
# --------------------------------------------------------------------------------------------------


def sample_cutout(rng: np.random.Generator, n: int, height: int, width: int, size_px: int) -> np.ndarray:
    """(n, 2) int32 Cutout centres (row, column), uniform over every pixel as the reference code draws them.
    Always one draw of n pairs, whatever `size_px` is (0 draws the same and cuts nothing)."""
    if size_px < 0:
        raise ValueError(f"size_px must be >= 0, got {size_px}")
    return rng.integers(0, np.array([height, width]), size=(n, 2)).astype(np.int32)


def cutout_boxes(centres: np.ndarray, size_px, height: int, width: int) -> np.ndarray:
    """(n, 4) int32 top, left, height, width of each Cutout square after clipping at the border (zero size
    where size_px is 0): rows [cy − L//2, cy + L//2) and columns likewise. DALI's fn.erase can take these."""
    c = np.asarray(centres, dtype=np.int64)
    half = np.broadcast_to(np.asarray(size_px, dtype=np.int64) // 2, (len(c),))
    top, bottom = np.clip(c[:, 0] - half, 0, height), np.clip(c[:, 0] + half, 0, height)
    left, right = np.clip(c[:, 1] - half, 0, width), np.clip(c[:, 1] + half, 0, width)
    return np.stack([top, left, bottom - top, right - left], axis=1).astype(np.int32)


def apply_cutout(x: torch.Tensor, centres: np.ndarray, size_px) -> torch.Tensor:
    """Set each image's Cutout square to 0 (x is float (n, C, H, W) in [0, 1], before normalization).
    `size_px` is one side for every row or an (n,) array (0: no Cutout for that row)."""
    h, w = x.shape[-2:]
    box = torch.from_numpy(cutout_boxes(centres, size_px, h, w)).to(x.device, non_blocking=True)
    inside = box_mask(box, h, w)  # (n, 1, H, W)
    return torch.where(inside, torch.zeros((), dtype=x.dtype, device=x.device), x)


# --------------------------------------------------------------------------------------------------
# The policy view of one component
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyParams:
    """What `aug.policy` adds to augment.py's crop, flip and jitter, per image (numpy, fixed width)."""

    autoaugment: np.ndarray  # (n,) bool: the row takes the AutoAugment view (crop, flip, policy, Cutout)
    aa: AutoAugmentParams  # NO_OP in both slots of the other rows
    cutout_centre: np.ndarray  # (n, 2) int32 (row, column)
    cutout_px: np.ndarray  # (n,) int32 side of the Cutout square; 0 = none

    def __len__(self) -> int:
        return len(self.autoaugment)

    def select(self, idx) -> "PolicyParams":
        return PolicyParams(self.autoaugment[idx], self.aa.select(idx), self.cutout_centre[idx], self.cutout_px[idx])


def identity_policy_params(n: int, height: int, width: int) -> PolicyParams:
    """No AutoAugment and no Cutout on any row (the simclr policy, and test images)."""
    aa = autoaugment_params(np.full((n, 2), NO_OP), np.zeros((n, 2)), height, width)
    return PolicyParams(np.zeros(n, bool), aa, np.zeros((n, 2), np.int32), np.zeros(n, np.int32))


def sample_policy_params(rng: np.random.Generator, n: int, height: int, width: int, cfg) -> PolicyParams:
    """Draw what `cfg.policy` (an AugConfig) adds for n images of size height×width (the output size).

    simclr draws nothing, so its batches are the same numbers as before this module existed;
    autoaugment and cmo_randaug draw, in this order: the per-image choice (cmo_randaug only), the policy for
    every row, the Cutout centres for every row; rows that take the SimCLR view are then switched off.
    """
    if cfg.policy == "simclr":
        return identity_policy_params(n, height, width)
    if cfg.policy == "autoaugment":
        chosen = np.ones(n, bool)
    elif cfg.policy == "cmo_randaug":
        chosen = rng.random(n) < CMO_AUTOAUGMENT_PROB
    else:
        raise ConfigError(f"key 'aug.policy': must be simclr, autoaugment or cmo_randaug, got {cfg.policy!r}")
    aa = sample_autoaugment(rng, n, height, width)
    centre = sample_cutout(rng, n, height, width, cfg.cutout_px)
    op = np.where(chosen[:, None], aa.op, NO_OP)
    aa = autoaugment_params(op, np.where(op == NO_OP, 0.0, aa.magnitude), height, width, aa.policy)
    cut = np.where(chosen, cfg.cutout_px, 0).astype(np.int32)
    return PolicyParams(chosen, aa, centre, cut)


def without_colour(aug: AugParams, rows: np.ndarray) -> AugParams:
    """augment.py's params with the colour jitter and grayscale switched off on `rows` (a bool mask)."""
    return replace(aug,
                   brightness=np.where(rows, 1.0, aug.brightness).astype(np.float32),
                   contrast=np.where(rows, 1.0, aug.contrast).astype(np.float32),
                   saturation=np.where(rows, 1.0, aug.saturation).astype(np.float32),
                   hue=np.where(rows, 0.0, aug.hue).astype(np.float32),
                   grayscale=aug.grayscale & ~rows)


def sample_view(rng: np.random.Generator, n: int, height: int, width: int, cfg,
                out_size: int | None = None) -> tuple[AugParams, PolicyParams]:
    """One component view's draws: augment.py's (crop, flip, jitter on a height×width source), then the
    policy's on the out_size canvas (default: height×width), with the jitter off on AutoAugment rows."""
    aug = sample_aug_params(rng, n, height, width, cfg)
    side_h, side_w = (height, width) if out_size is None else (out_size, out_size)
    policy = sample_policy_params(rng, n, side_h, side_w, cfg)
    return without_colour(aug, policy.autoaugment), policy


def apply_policy_view(x: torch.Tensor, p: PolicyParams, fill: float | tuple[float, ...] = FILL) -> torch.Tensor:
    """AutoAugment then Cutout on already cropped and flipped float (n, 3, H, W) images in [0, 1]."""
    x = apply_autoaugment(x, p.aa, fill)
    if p.cutout_px.any():
        x = apply_cutout(x, p.cutout_centre, p.cutout_px)
    return x


def augment_view(images: torch.Tensor, aug: AugParams, p: PolicyParams, out_size: int,
                 fill: float | tuple[float, ...] = FILL) -> torch.Tensor:
    """A whole component view: uint8 or float (n, 3, H, W) -> float32 (n, 3, out_size, out_size) in [0, 1]."""
    return apply_policy_view(augment(images, aug, out_size), p, fill)
