"""Tests of pipelines/ops/augment.py against independent numpy rebuilds (tests/helpers/numpy_reference.py): pad-crop,
flip, RandomResizedCrop, the colour matrices and the whole `augment` op, plus the parameter sampler.

    python -m pytest tests/test_augment.py -q
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from helpers import numpy_reference as ref
from mixtail.pipelines.ops.augment import AugParams, augment, colour_matrices, identity_aug_params, sample_aug_params
from mixtail.trainer.config import AugConfig

NO_COLOUR = dict(color_prob=0.0, grayscale_prob=0.0)


tol = ref.grid_tolerance  # the float32 sampling grid's error on [0, 1] pixels


def random_images(n: int, size: int, seed: int = 0, width: int | None = None) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, width or size), dtype=np.uint8)


def with_geometry(n: int, size: int, crop: np.ndarray, flip=None) -> AugParams:
    p = identity_aug_params(n, size, size)
    return replace(p, crop=np.asarray(crop, np.float32), flip=np.zeros(n, bool) if flip is None else np.asarray(flip))


def run(images: np.ndarray, p: AugParams, out: int) -> np.ndarray:
    y = augment(torch.from_numpy(images), p, out)
    assert y.dtype == torch.float32 and y.shape == (len(images), 3, out, out)
    return y.numpy()


# --------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 31, 17, 224])
def test_identity_params_leave_images_unchanged(size):
    x = random_images(3, size)
    y = run(x, identity_aug_params(3, size, size), size)
    np.testing.assert_allclose(y, x / 255.0, atol=tol(size), rtol=0)


@pytest.mark.parametrize("size", [32, 31, 17, 224])
def test_pad_crop_is_a_shift_with_zero_fill(size):
    n = 6 if size < 100 else 2
    x = random_images(n, size, seed=size)
    rng = np.random.default_rng(1)
    p = sample_aug_params(rng, n, size, size, AugConfig(crop="pad", pad_px=4, flip=False, **NO_COLOUR))
    offsets = p.crop[:, :2]
    assert np.array_equal(offsets, np.round(offsets)) and np.abs(offsets).max() <= 4
    assert np.array_equal(p.crop[:, 2:], np.full((n, 2), size))
    # An explicit corner case on top: the window hangs over the bottom-right corner.
    crop = np.concatenate([p.crop[:-1], [[4, -4, size, size]]]).astype(np.float32)
    p = with_geometry(n, size, crop)
    y = run(x, p, size)
    expected = np.zeros((n, 3, size, size))
    for k in range(n):  # the shift written out: out[i, j] = x[i + top, j + left], zero outside the image
        top, left = int(crop[k, 0]), int(crop[k, 1])
        for i in range(size):
            si = i + top
            if 0 <= si < size:
                lo, hi = max(0, -left), min(size, size - left)
                expected[k, :, i, lo:hi] = x[k, :, si, lo + left:hi + left] / 255.0
    np.testing.assert_allclose(y, expected, atol=tol(size), rtol=0)
    assert np.abs(y[-1, :, -4:, :]).max() < tol(size) and np.abs(y[-1, :, :, :4]).max() < tol(size)


def test_pad_crop_offsets_cover_the_range():
    p = sample_aug_params(np.random.default_rng(0), 2000, 32, 32, AugConfig(crop="pad", pad_px=4))
    for axis in (0, 1):
        values, counts = np.unique(p.crop[:, axis], return_counts=True)
        assert values.tolist() == list(range(-4, 5)), "CIFAR pad-4 crop offsets are the 9 values -4..4"
        assert counts.min() > 2000 / 9 * 0.7


@pytest.mark.parametrize("size", [32, 31, 224])
def test_flip_is_an_exact_mirror(size):
    n = 4
    x = random_images(n, size, seed=3)
    crop = [[0, 0, size, size], [2, -3, size, size], [-1, 4, size, size], [0, 0, size, size]]
    flipped = run(x, with_geometry(n, size, crop, flip=np.ones(n, bool)), size)
    plain = run(x, with_geometry(n, size, crop), size)
    assert np.array_equal(flipped, plain[..., ::-1])
    expected = ref.augment(x, with_geometry(n, size, crop, flip=np.ones(n, bool)), size)
    np.testing.assert_allclose(flipped, expected, atol=tol(size), rtol=0)


@pytest.mark.parametrize("size,out", [(32, 32), (31, 31), (17, 17), (224, 224), (31, 20)])
def test_resized_crop_matches_numpy_bilinear(size, out):
    n = 12 if size < 100 else 5
    x = random_images(n, size, seed=size + out)
    rng = np.random.default_rng(size)
    p = sample_aug_params(rng, n, size, size, AugConfig(crop="resized", flip=True, **NO_COLOUR))
    # Hand-made windows too: touching each border (upscaled 2x and 3x), and the whole image.
    half, third = size // 2, size // 3
    hand = [[0, 0, half, half], [size - third, size - third, third, third], [1, 2, size - 3, size - 5],
            [0, 0, size, size]]
    p = replace(p, crop=np.concatenate([p.crop[: n - 4], hand]).astype(np.float32))
    y = run(x, p, out)
    np.testing.assert_allclose(y, ref.augment(x, p, out), atol=tol(max(size, out)), rtol=0)
    # Cross-check the rebuild itself against PyTorch's interpolate on the cropped window.
    for k in range(n):
        top, left, h, w = (int(v) for v in p.crop[k])
        window = torch.from_numpy(x[k:k + 1, :, top:top + h, left:left + w]).double() / 255.0
        t = F.interpolate(window, size=(out, out), mode="bilinear", align_corners=False).numpy()[0]
        t = t[:, :, ::-1] if p.flip[k] else t
        np.testing.assert_allclose(y[k], t, atol=tol(max(size, out)), rtol=0)


def test_resized_crop_at_the_border_does_not_blend_in_padding():
    # A constant image stays constant under any crop-and-resize: a window at the corner, upscaled, must
    # not read the zero padding beyond the image (it did: edge pixels came out 25% darker).
    x = np.full((1, 3, 8, 8), 200, np.uint8)
    y = run(x, with_geometry(1, 8, [[0, 0, 4, 4]]), 8)
    np.testing.assert_allclose(y, 200 / 255.0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("height,width", [(32, 32), (224, 224), (24, 40), (40, 24)])
def test_random_resized_crop_windows_inside_and_within_scale_ratio(height, width):
    cfg = AugConfig(crop="resized")
    p = sample_aug_params(np.random.default_rng(0), 4000, height, width, cfg)
    top, left, h, w = p.crop.T.astype(np.float64)
    assert np.array_equal(p.crop, np.round(p.crop)), "windows are whole pixels"
    assert (h >= 1).all() and (w >= 1).all()
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area = height * width
    # h = round(√(T/a)), w = round(√(T·a)): |h·w − T| ≤ (h + w + 1)/2 + 1/4, and a lies in the interval
    # that w/h allows after rounding each side by at most ½.
    slack = 0.5 * (h + w + 1) + 0.25
    assert (h * w >= cfg.scale[0] * area - slack).all() and (h * w <= cfg.scale[1] * area + slack).all()
    assert ((w + 0.5) / (h - 0.5 + 1e-9) >= cfg.ratio[0]).all()
    assert ((w - 0.5) / (h + 0.5) <= cfg.ratio[1]).all()
    # The windows really vary over the allowed range (a stuck sampler would pass the bounds).
    frac = h * w / area
    # (On a 24×40 image no window within the ratio range covers more than 24·32 px, 80% of it.)
    assert frac.min() < 0.12 and frac.max() > (0.95 if height == width else 0.75)
    assert len(np.unique(top)) > min(height, width) // 2


def test_random_resized_crop_position_uniform():
    # Fixed size 16×16 in a 32×32 image: top and left uniform on 0..16.
    p = sample_aug_params(np.random.default_rng(2), 17 * 400, 32, 32,
                          AugConfig(crop="resized", scale=(0.25, 0.25), ratio=(1.0, 1.0)))
    assert np.array_equal(p.crop[:, 2:], np.full((17 * 400, 2), 16))
    for axis in (0, 1):
        counts = np.bincount(p.crop[:, axis].astype(int), minlength=17)
        assert len(counts) == 17 and stats.chisquare(counts).pvalue > 1e-6


def test_random_resized_crop_fallback_is_centre_crop():
    # No window can be 3..4 times wider than tall *and* cover 90% of a square: torchvision falls back to
    # the largest centre crop within the ratio range: width 32, height round(32/3) = 11, top (32-11)//2.
    p = sample_aug_params(np.random.default_rng(0), 50, 32, 32,
                          AugConfig(crop="resized", scale=(0.9, 1.0), ratio=(3.0, 4.0)))
    assert np.array_equal(p.crop, np.tile(np.array([10, 0, 11, 32], np.float32), (50, 1)))


# --------------------------------------------------------------------------------------------------
# Colour
# --------------------------------------------------------------------------------------------------


def colour_params(n=1, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0, grayscale=False) -> AugParams:
    p = identity_aug_params(n, 4, 4)
    f = lambda v: np.full(n, v, np.float32)  # noqa: E731
    return replace(p, brightness=f(brightness), contrast=f(contrast), saturation=f(saturation), hue=f(hue),
                   grayscale=np.full(n, grayscale))


def test_colour_matrix_identity():
    m, t = colour_matrices(colour_params())
    np.testing.assert_allclose(m[0], np.eye(3), atol=1e-6, rtol=0)
    np.testing.assert_allclose(t[0], 0, atol=1e-7)


def test_colour_matrix_brightness_and_contrast():
    m, t = colour_matrices(colour_params(brightness=1.3))
    np.testing.assert_allclose(m[0], 1.3 * np.eye(3), atol=1e-6, rtol=0)
    np.testing.assert_allclose(t[0], 0, atol=1e-7)
    # Contrast c around 0.5: x' = c·x + 0.5·(1 − c).
    m, t = colour_matrices(colour_params(contrast=0.6))
    np.testing.assert_allclose(m[0], 0.6 * np.eye(3), atol=1e-6, rtol=0)
    np.testing.assert_allclose(t[0], 0.5 * 0.4, atol=1e-6, rtol=0)
    # Brightness first, then contrast: x' = c·(b·x) + 0.5·(1 − c).
    m, t = colour_matrices(colour_params(brightness=1.2, contrast=0.7))
    np.testing.assert_allclose(m[0], 0.84 * np.eye(3), atol=1e-6, rtol=0)
    np.testing.assert_allclose(t[0], 0.15, atol=1e-6, rtol=0)


def test_colour_matrix_grayscale_rows_are_luma():
    m, t = colour_matrices(colour_params(grayscale=True))
    np.testing.assert_allclose(m[0], np.tile(ref.LUMA, (3, 1)), atol=1e-6, rtol=0)
    np.testing.assert_allclose(t[0], 0, atol=1e-7)
    # Saturation 0 keeps only Y: every row is (approximately, the YIQ constants are rounded) the luma.
    m, _ = colour_matrices(colour_params(saturation=0.0))
    np.testing.assert_allclose(m[0], np.tile(ref.LUMA, (3, 1)), atol=2e-3, rtol=0)


@pytest.mark.parametrize("hue", [0.1, -0.07, 0.5])
def test_colour_matrix_hue_keeps_gray_and_luma(hue):
    m, t = colour_matrices(colour_params(hue=hue, saturation=0.8))
    np.testing.assert_allclose(m[0] @ np.ones(3), np.ones(3), atol=1e-5, rtol=0)  # gray stays gray (I = Q = 0)
    np.testing.assert_allclose(ref.LUMA @ m[0], ref.LUMA, atol=1e-5, rtol=0)  # Y is untouched
    assert np.abs(m[0] - np.eye(3)).max() > 0.05  # and it does change colours
    np.testing.assert_allclose(t[0], 0, atol=1e-7)


@pytest.mark.parametrize("size", [32, 17])
def test_augment_colour_equals_numpy_sequence(size):
    n = 16
    x = random_images(n, size, seed=9)
    rng = np.random.default_rng(4)
    p = sample_aug_params(rng, n, size, size, AugConfig(crop="pad", color_prob=0.9, grayscale_prob=0.4,
                                                         color_jitter=0.6, hue=0.2))
    p = replace(p, grayscale=np.arange(n) % 3 == 0)  # make sure both kinds are present
    y = run(x, p, size)
    np.testing.assert_allclose(y, ref.augment(x, p, size), atol=tol(size), rtol=0)
    assert y.min() == 0.0 and y.max() == 1.0, "bright/dark jitter must hit the clamp on random images"
    # The colour part alone is the affine map M·x + t, clamped, written here in numpy.
    m, t = colour_matrices(p)
    geom = run(x, replace(identity_aug_params(n, size, size), crop=p.crop, flip=p.flip), size)
    affine = np.clip(np.einsum("nij,njhw->nihw", m.astype(np.float64), geom) + t[:, :, None, None], 0, 1)
    np.testing.assert_allclose(y, affine, atol=1e-5, rtol=0)


def test_augment_accepts_float_input():
    x = random_images(3, 17, seed=5)
    p = sample_aug_params(np.random.default_rng(0), 3, 17, 17, AugConfig())
    a = augment(torch.from_numpy(x), p, 17)
    b = augment(torch.from_numpy(x).float() / 255.0, p, 17)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------
# Parameter sampling
# --------------------------------------------------------------------------------------------------


def test_sample_aug_params_colour_ranges_and_rates():
    n = 20000
    cfg = AugConfig(color_jitter=0.4, hue=0.1, color_prob=0.8, grayscale_prob=0.2)
    p = sample_aug_params(np.random.default_rng(0), n, 32, 32, cfg)
    assert len(p) == n and p.flip.dtype == bool
    on = (p.brightness != 1) | (p.contrast != 1) | (p.saturation != 1) | (p.hue != 0)
    for v in (p.brightness, p.contrast, p.saturation):
        assert v.dtype == np.float32 and v[on].min() >= 0.6 - 1e-6 and v[on].max() <= 1.4 + 1e-6
        assert (v[~on] == 1).all()
    assert np.abs(p.hue).max() <= 0.1 + 1e-7
    # Binomial rates, 6 standard deviations wide (the std of a rate is √(p(1−p)/n) ≈ 0.003).
    assert abs(on.mean() - 0.8) < 6 * np.sqrt(0.8 * 0.2 / n)
    assert abs(p.grayscale.mean() - 0.2) < 6 * np.sqrt(0.2 * 0.8 / n)
    assert abs(p.flip.mean() - 0.5) < 6 * np.sqrt(0.25 / n)
    # Off switches.
    off = sample_aug_params(np.random.default_rng(0), 100, 32, 32,
                            AugConfig(flip=False, color_prob=0.0, grayscale_prob=0.0))
    assert not off.flip.any() and not off.grayscale.any()
    assert (off.brightness == 1).all() and (off.contrast == 1).all() and (off.hue == 0).all()


def test_aug_params_select():
    p = sample_aug_params(np.random.default_rng(0), 5, 32, 32, AugConfig())
    s = p.select(np.array([3, 1]))
    assert len(s) == 2 and np.array_equal(s.crop, p.crop[[3, 1]]) and np.array_equal(s.hue, p.hue[[3, 1]])
