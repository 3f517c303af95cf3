"""Tests of pipelines/ops/autoaugment.py: every AutoAugment op against torchvision's functional op, the policy and
its draws against torchvision's AutoAugment, batched against one-by-one application, the draw frequencies
against the policy table, Cutout against the reference rule, and the simclr / autoaugment / cmo_randaug
views.

    python -m pytest tests/test_autoaugment.py -q

Tolerances, in 8-bit levels (d = 255·ours − torchvision on uint8):
- geometric ops: equal pixel for pixel, except where the source point lies exactly halfway between two
  pixels (a shear factor b/30 with b = 2 or 6, a 30° rotation, odd sizes): both neighbours are then the
  nearest, float rounding order picks one, and the test checks that each differing pixel is such a tie;
- Posterize, Solarize, Equalize, Invert on 8-bit input: exact (|d| ≤ 1e-3);
- torchvision on uint8 truncates every blend to an integer, and also truncates the luma (Color, Contrast)
  and rounds the smoothed image (Sharpness) before blending, where we keep floats: so 0 ≤ d ≤ 1 for
  Brightness and AutoContrast, |d| ≤ 1 + |1 − f| for Color and Contrast, |d| ≤ 1 + |1 − f|/2 for Sharpness
  (f the factor). Each op at a strong magnitude moves pixels by far more than its bound (checked);
- against torchvision on float input (every op but Posterize and Equalize, which it runs on uint8 only):
  1e-5 in [0, 1] values, float32 rounding.
"""

from __future__ import annotations

import io
import math
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.transforms import AutoAugment, AutoAugmentPolicy, InterpolationMode

from mixtail.pipelines.ops import autoaugment as A
from mixtail.pipelines.ops.augment import augment, identity_aug_params, sample_aug_params
from mixtail.pipelines.config import AugConfig

from helpers.images import cifar_like_jpeg

ENHANCE = A.ENHANCE
EXACT_ON_LEVELS = ("Posterize", "Solarize", "Equalize", "Invert")
SIZES = [(32, 32), (31, 29)]
FILL_LEVEL = 128.0


def make_images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, H, W): smooth random images with noise, each in its own sub-range of [0, 255] (so that
    AutoContrast and Equalize have work to do), plus one image with a constant channel and one with only two
    levels per channel (their degenerate cases)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand((n, 3, 5, 5), generator=g)
    lo = torch.rand((n, 1, 1, 1), generator=g) * 0.4
    hi = 0.6 + torch.rand((n, 1, 1, 1), generator=g) * 0.4
    x = F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
    x = lo + (hi - lo) * x + 0.05 * torch.randn((n, 3, height, width), generator=g)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    if n >= 3:
        x[0, 1] = 77
        x[1] = torch.where(torch.rand((3, height, width), generator=g) < 0.3, 40, 200).to(torch.uint8)
    return x


def tv_op(img: torch.Tensor, name: str, m: float, fill: float = FILL_LEVEL) -> torch.Tensor:
    """torchvision's functional op, called the way torchvision's AutoAugment calls it for magnitude m (our
    units: the enhancement factor, pixels, degrees, bits, the threshold in levels); on float input the
    threshold is passed as a [0, 1] value and the fill as fill/255."""
    nearest = InterpolationMode.NEAREST
    is_float = img.is_floating_point()
    fills = [fill / 255.0 if is_float else fill] * 3
    if name == "ShearX":
        return TF.affine(img, 0.0, [0, 0], 1.0, [math.degrees(math.atan(m)), 0.0], nearest, fills, center=[0, 0])
    if name == "ShearY":
        return TF.affine(img, 0.0, [0, 0], 1.0, [0.0, math.degrees(math.atan(m))], nearest, fills, center=[0, 0])
    if name == "TranslateX":
        return TF.affine(img, 0.0, [int(m), 0], 1.0, [0.0, 0.0], nearest, fills)
    if name == "TranslateY":
        return TF.affine(img, 0.0, [0, int(m)], 1.0, [0.0, 0.0], nearest, fills)
    if name == "Rotate":
        return TF.rotate(img, m, nearest, fill=fills)
    if name == "Brightness":
        return TF.adjust_brightness(img, m)
    if name == "Color":
        return TF.adjust_saturation(img, m)
    if name == "Contrast":
        return TF.adjust_contrast(img, m)
    if name == "Sharpness":
        return TF.adjust_sharpness(img, m)
    if name == "Posterize":
        return TF.posterize(img, int(m))
    if name == "Solarize":
        return TF.solarize(img, m / 255.0 if is_float else m)
    if name == "AutoContrast":
        return TF.autocontrast(img)
    if name == "Equalize":
        return TF.equalize(img)
    if name == "Invert":
        return TF.invert(img)
    raise AssertionError(name)


def op_magnitudes(name: str, height: int, width: int) -> list[float]:
    """Every magnitude the policy space can give `name` (all bins, both signs), in our units, as float32."""
    values = A.magnitude_bins(height, width)[A.OP_ID[name]]
    signs = (1, -1) if name in A.SIGNED else (1,)
    out = sorted({float(np.float32((1 + s * v) if name in ENHANCE else s * v)) for v in values for s in signs})
    return out


def single_op(name: str, m: float, n: int, height: int, width: int) -> A.AutoAugmentParams:
    op = np.stack([np.full(n, A.OP_ID[name]), np.full(n, A.NO_OP)], 1)
    return A.autoaugment_params(op, np.stack([np.full(n, m), np.zeros(n)], 1), height, width)


def source_ties(affine: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) bool: output pixels whose source point, computed exactly (float64), lies halfway between two
    pixel centres in x or y, where nearest sampling has two right answers."""
    a = affine.astype(np.float64)
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    u = a[0, 0] * xs + a[0, 1] * ys + a[0, 2] - 0.5  # source pixel index coordinates
    v = a[1, 0] * xs + a[1, 1] * ys + a[1, 2] - 0.5
    return (np.abs(u - np.floor(u) - 0.5) < 1e-4) | (np.abs(v - np.floor(v) - 0.5) < 1e-4)


def assert_geometric_equal(ours: torch.Tensor, ref: torch.Tensor, params: A.AutoAugmentParams, scale: float):
    """Exact per pixel (values scaled by `scale` to levels) except at source ties of the slot-0 matrix."""
    height, width = ours.shape[-2:]
    differs = ((ours - ref).abs() > 1e-3 * scale).any(dim=1).numpy()  # (n, H, W)
    for i in range(len(ours)):
        ties = source_ties(params.affine[i, 0], height, width)
        assert not (differs[i] & ~ties).any(), f"image {i}: {int((differs[i] & ~ties).sum())} pixels differ off ties"
    assert differs.mean() < 0.05  # shear 0.2 (b = 6) puts its source on a tie for one pixel row in five


def blend_bound(name: str, f: float) -> tuple[float, float]:
    """(low, high) bounds on d = 255·ours − torchvision-uint8 (module docstring)."""
    eps = 1e-3
    if name in ("Brightness", "AutoContrast"):
        return -eps, 1 + eps
    if name in ("Color", "Contrast"):
        b = 1 + abs(1 - f) + eps
        return -b, b
    if name == "Sharpness":
        b = 1 + abs(1 - f) / 2 + eps
        return -b, b
    return -eps, eps


# --------------------------------------------------------------------------------------------------
# The policy table and the magnitude bins, against torchvision
# --------------------------------------------------------------------------------------------------


def test_policy_is_torchvisions_cifar10_policy():
    ours = [tuple((op, p, b) for op, p, b in sub) for sub in A.CIFAR10_POLICY]
    cifar = AutoAugment(AutoAugmentPolicy.CIFAR10).policies
    assert ours == [tuple(tuple(e) for e in sub) for sub in cifar]
    assert ours != [tuple(tuple(e) for e in sub) for sub in AutoAugment(AutoAugmentPolicy.IMAGENET).policies]
    assert set(A.OPS) == set(AutoAugment(AutoAugmentPolicy.CIFAR10)._augmentation_space(10, (32, 32)))


@pytest.mark.parametrize("height,width", SIZES + [(224, 224)])
def test_magnitude_bins_and_signs_match_torchvision(height, width):
    space = AutoAugment(AutoAugmentPolicy.CIFAR10)._augmentation_space(A.NUM_BINS, (height, width))
    ours = A.magnitude_bins(height, width)
    for name, (values, signed) in space.items():
        k = A.OP_ID[name]
        assert (name in A.SIGNED) == signed, name
        ref = np.broadcast_to(values.double().numpy(), (A.NUM_BINS,))
        if name.startswith("Translate"):  # torchvision passes int(magnitude) to F.affine
            ref = np.trunc(ref)
        np.testing.assert_allclose(ours[k], ref, rtol=1e-6, atol=1e-6, err_msg=name)


# --------------------------------------------------------------------------------------------------
# Every op against torchvision
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("name", A.OPS)
def test_op_matches_torchvision_on_uint8(name, height, width):
    x = make_images(8, height, width, seed=height)
    for m in op_magnitudes(name, height, width):
        params = single_op(name, m, len(x), height, width)
        ours = A.apply_autoaugment(x.float() / 255, params) * 255
        ref = torch.stack([tv_op(img, name, m) for img in x]).float()
        if name in A.GEOMETRIC:
            assert_geometric_equal(ours, ref, params, scale=255)
            continue
        lo, hi = blend_bound(name, m)
        d = ours - ref
        assert lo <= d.min().item() and d.max().item() <= hi, f"{name}({m}): d in [{d.min()}, {d.max()}]"


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("name", [op for op in A.OPS if op not in ("Posterize", "Equalize")])
def test_op_matches_torchvision_on_float(name, height, width):
    x = make_images(8, height, width, seed=7).float() / 255
    for m in op_magnitudes(name, height, width):
        params = single_op(name, m, len(x), height, width)
        ours = A.apply_autoaugment(x, params)
        ref = torch.stack([tv_op(img, name, m) for img in x])
        if name in A.GEOMETRIC:
            assert_geometric_equal(ours, ref, params, scale=1)
        else:
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0, msg=f"{name}({m})")


@pytest.mark.parametrize("name", A.OPS)
def test_each_op_moves_pixels_far_beyond_its_tolerance(name):
    """So the bounds above cannot hide a missing or wrong op: at its strongest magnitude every op changes
    a sizeable share of pixels by more than 3 levels (the largest tolerance is 1.9)."""
    x = make_images(12, 32, 32, seed=3)
    m = max(op_magnitudes(name, 32, 32), key=lambda v: abs(v - 1) if name in ENHANCE else abs(v))
    if name == "Solarize":
        m = min(op_magnitudes(name, 32, 32)[1:], key=lambda t: abs(t - 128))  # a threshold inside the range
    if name == "Posterize":
        m = min(op_magnitudes(name, 32, 32))
    ours = A.apply_autoaugment(x.float() / 255, single_op(name, m, len(x), 32, 32)) * 255
    assert ((ours - x.float()).abs() > 3).float().mean() > 0.05, name


def test_ops_match_torchvision_on_cifar_like_jpegs():
    """The same bounds on 16 decoded 32×32 JPEGs of photo-like content (tests/helpers/images.py), whose
    histograms, full-range and uneven, are what Equalize and AutoContrast meet in training."""
    from PIL import Image

    images = [np.array(Image.open(io.BytesIO(cifar_like_jpeg(k % 4, k))).convert("RGB")) for k in range(16)]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    for name in A.OPS:
        for m in op_magnitudes(name, 32, 32):
            params = single_op(name, m, len(x), 32, 32)
            ours = A.apply_autoaugment(x.float() / 255, params) * 255
            ref = torch.stack([tv_op(img, name, m) for img in x]).float()
            if name in A.GEOMETRIC:
                assert_geometric_equal(ours, ref, params, scale=255)
            else:
                lo, hi = blend_bound(name, m)
                d = ours - ref
                assert lo <= d.min().item() and d.max().item() <= hi, f"{name}({m}): d in [{d.min()}, {d.max()}]"


def test_equalize_and_autocontrast_degenerate_channels():
    """A constant channel stays as it is under both; a two-level channel equalizes as torchvision's does."""
    x = make_images(3, 17, 13)
    for name in ("Equalize", "AutoContrast"):
        ours = A.apply_autoaugment(x.float() / 255, single_op(name, 0.0, 3, 17, 13)) * 255
        assert torch.equal(ours[0, 1], x[0, 1].float())
        if name == "Equalize":
            assert torch.equal(ours[:2], TF.equalize(x[:2]).float())


# --------------------------------------------------------------------------------------------------
# Batched application
# --------------------------------------------------------------------------------------------------


def mixed_params(n: int, height: int, width: int, seed: int = 0) -> A.AutoAugmentParams:
    """Rows that between them draw every op in both slots, in varied pairs, with random magnitudes; some
    rows fire nothing and some only one slot."""
    rng = np.random.default_rng(seed)
    bins = A.magnitude_bins(height, width)
    op = np.stack([np.arange(n) % 15 - 1, rng.permutation(np.arange(n) % 15 - 1)], 1)
    mag = np.zeros((n, 2))
    for i, s in np.ndindex(n, 2):
        if op[i, s] != A.NO_OP:
            name = A.OPS[op[i, s]]
            v = bins[op[i, s], rng.integers(0, A.NUM_BINS)] * (rng.choice([-1, 1]) if name in A.SIGNED else 1)
            mag[i, s] = 1 + v if name in ENHANCE else v
    return A.autoaugment_params(op, mag, height, width)


@pytest.mark.parametrize("height,width", SIZES)
def test_batched_equals_one_image_at_a_time(height, width):
    n = 60
    x = make_images(n, height, width, seed=11).float() / 255
    params = mixed_params(n, height, width)
    assert set(params.op[:, 0]) == set(params.op[:, 1]) == set(range(-1, 14))
    ours = A.apply_autoaugment(x, params)
    alone = torch.cat([A.apply_autoaugment(x[i:i + 1], params.select([i])) for i in range(n)])
    torch.testing.assert_close(ours, alone, atol=1e-6, rtol=0)
    assert not torch.equal(x, ours)
    assert torch.equal(x, make_images(n, height, width, 11) / 255)  # the input is not written to


def test_slot_zero_runs_before_slot_one():
    x = make_images(4, 32, 32).float() / 255
    for first, second, m1, m2 in [("Rotate", "TranslateX", 20.0, 9.0), ("Brightness", "Solarize", 1.6, 128.0)]:
        op = np.array([[A.OP_ID[first], A.OP_ID[second]]] * 4)
        both = A.apply_autoaugment(x, A.autoaugment_params(op, np.array([[m1, m2]] * 4), 32, 32))
        one_then_other = A.apply_autoaugment(A.apply_autoaugment(x, single_op(first, m1, 4, 32, 32)),
                                             single_op(second, m2, 4, 32, 32))
        other_then_one = A.apply_autoaugment(A.apply_autoaugment(x, single_op(second, m2, 4, 32, 32)),
                                             single_op(first, m1, 4, 32, 32))
        torch.testing.assert_close(both, one_then_other, atol=1e-6, rtol=0)
        assert (both - other_then_one).abs().max() > 0.1  # the pair does not commute, so order was tested


def test_warp_matrices_are_what_dali_applies():
    """DALI's warp_affine (nearest, fill 128) applies AutoAugmentParams.affine as our warp does."""
    pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed")
    from nvidia.dali import fn, pipeline_def, types

    height, width, n = 31, 29, 20
    x = make_images(n, height, width, seed=5)
    rng = np.random.default_rng(1)
    bins = A.magnitude_bins(height, width)
    ops = np.array([A.OP_ID[k] for k in A.GEOMETRIC])[np.arange(n) % 5]
    mag = np.array([bins[o, rng.integers(1, 10)] * rng.choice([-1, 1]) for o in ops])
    params = A.autoaugment_params(np.stack([ops, np.full(n, A.NO_OP)], 1), np.stack([mag, np.zeros(n)], 1),
                                  height, width)
    ours = A.apply_autoaugment(x.float() / 255, params) * 255
    hwc = [np.ascontiguousarray(img.permute(1, 2, 0).numpy()) for img in x]

    @pipeline_def(batch_size=n, num_threads=1, device_id=None)
    def warp_pipe():
        images = fn.external_source(source=lambda: hwc, batch=True, layout="HWC")
        matrices = fn.external_source(source=lambda: [params.affine[i, 0] for i in range(n)], batch=True)
        return fn.warp_affine(images, matrices, interp_type=types.INTERP_NN, fill_value=FILL_LEVEL)

    pipe = warp_pipe()
    pipe.build()
    (out,) = pipe.run()
    dali = torch.from_numpy(np.stack([np.array(out[i]) for i in range(n)])).permute(0, 3, 1, 2).float()
    assert_geometric_equal(ours, dali, params, scale=255)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x = make_images(60, 31, 29, seed=2).float() / 255
    params = mixed_params(60, 31, 29, seed=4)
    cpu = A.apply_autoaugment(x, params)
    gpu = A.apply_autoaugment(x.cuda(), params).cpu()
    differs = ((cpu - gpu).abs() > 1e-5).any(1).numpy()
    for i in range(60):  # geometric rows may differ only at exact source ties, colour rows by float rounding
        ties = source_ties(params.affine[i, 0], 31, 29) | source_ties(params.affine[i, 1], 31, 29)
        assert not (differs[i] & ~ties).any(), i


# --------------------------------------------------------------------------------------------------
# The draws: against torchvision's AutoAugment, and their frequencies
# --------------------------------------------------------------------------------------------------


def torchvision_draws(params: A.AutoAugmentParams, i: int):
    """torchvision AutoAugment.get_params output that makes it take image i's sub-policy, firing and signs."""
    fire = params.op[i] != A.NO_OP
    probs = torch.tensor([0.0 if f else 1.0 for f in fire])  # it fires when probs[slot] <= p
    neg = [(params.magnitude[i, s] < 1) if A.OPS[params.op[i, s]] in ENHANCE else (params.magnitude[i, s] < 0)
           for s in range(2)]
    signs = torch.tensor([0 if negative else 1 for negative in neg])  # 0 negates a signed magnitude
    return int(params.policy[i]), probs, signs


@pytest.mark.parametrize("height,width", SIZES)
def test_draws_are_torchvisions_ops_and_magnitudes(height, width):
    """For each image, torchvision's AutoAugment given the same sub-policy, firing and signs calls exactly the
    ops and magnitudes our params hold (its _apply_op is recorded, not run)."""
    n = 3000
    params = A.sample_autoaugment(np.random.default_rng(5), n, height, width)
    t = AutoAugment(AutoAugmentPolicy.CIFAR10)
    img = torch.zeros((3, height, width), dtype=torch.uint8)
    for i in range(n):
        calls = []
        with mock.patch.object(AutoAugment, "get_params", staticmethod(lambda k, i=i: torchvision_draws(params, i))), \
                mock.patch("torchvision.transforms.autoaugment._apply_op",
                           lambda im, op, m, **kw: calls.append((op, m)) or im):
            t(img)
        expected = []
        for s in range(2):
            if params.op[i, s] != A.NO_OP:
                name, m = A.OPS[params.op[i, s]], float(params.magnitude[i, s])
                expected.append((name, m - 1 if name in ENHANCE else m))
        assert len(calls) == len(expected), (i, calls, expected)
        for (name, m), (ref_name, ref_m) in zip(expected, calls):
            assert name == ref_name, (i, calls, expected)
            ref_m = int(ref_m) if name.startswith("Translate") else ref_m
            assert abs(m - ref_m) < 1e-5, (i, calls, expected)


def test_whole_policy_pixels_match_torchvision_where_the_first_op_is_exact():
    """End to end on pixels, torchvision's AutoAugment (fill 128) against ours, on images whose first op is
    exact on 8-bit levels (or geometric, or does not fire): the second op then sees the same input in both and
    must stay within its own bound. (After a truncating first op, a threshold or equalization can turn a
    one-level difference into a large one, so those chains are covered op by op instead.)"""
    n = 600
    x = make_images(n, 32, 32, seed=9)
    params = A.sample_autoaugment(np.random.default_rng(2), n, 32, 32)
    exact_first = [A.NO_OP] + [A.OP_ID[k] for k in A.GEOMETRIC + EXACT_ON_LEVELS]
    rows = np.flatnonzero(np.isin(params.op[:, 0], exact_first))
    assert len(rows) > 200 and len(set(params.policy[rows])) == 25
    ours = A.apply_autoaugment(x.float() / 255, params) * 255
    t = AutoAugment(AutoAugmentPolicy.CIFAR10, fill=[FILL_LEVEL] * 3)
    for i in rows:
        with mock.patch.object(AutoAugment, "get_params", staticmethod(lambda k, i=i: torchvision_draws(params, i))):
            ref = t(x[i]).float()
        second = params.op[i, 1]
        lo, hi = (-1e-3, 1e-3) if second == A.NO_OP else blend_bound(A.OPS[second], float(params.magnitude[i, 1]))
        d = ours[i] - ref
        assert lo <= d.min().item() and d.max().item() <= hi, (i, params.policy[i], params.op[i], params.magnitude[i])


def per_op_moments(policy) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance, per image, of how many times each op fires, for a uniformly drawn sub-policy of
    `policy` (a list of ((op, p, bin), (op, p, bin)) pairs, torchvision's format)."""
    mean, second = np.zeros(len(A.OPS)), np.zeros(len(A.OPS))
    for sub in policy:
        for k, name in enumerate(A.OPS):
            p = [prob if op == name else 0.0 for op, prob, _ in sub]
            mean[k] += sum(p) / len(policy)
            second[k] += (sum(p) + 2 * p[0] * p[1]) / len(policy)  # E[(B0 + B1)^2], independent B
    return mean, second - mean ** 2


def assert_op_frequencies(params: A.AutoAugmentParams, policy, sigmas: float = 5.0):
    counts = np.stack([(params.op == k).sum(1) for k in range(len(A.OPS))], 1)  # (n, 14)
    mean, var = per_op_moments(policy)
    bound = sigmas * np.sqrt(var / len(params)) + 1e-12
    err = np.abs(counts.mean(0) - mean)
    assert (err <= bound).all(), {A.OPS[k]: (counts.mean(0)[k], mean[k]) for k in np.flatnonzero(err > bound)}


def test_op_frequencies_match_the_policy_and_a_wrong_policy_fails():
    n = 200_000
    params = A.sample_autoaugment(np.random.default_rng(0), n, 32, 32)
    cifar = AutoAugment(AutoAugmentPolicy.CIFAR10).policies  # the expectation comes from torchvision's table
    assert_op_frequencies(params, cifar)
    with pytest.raises(AssertionError):
        assert_op_frequencies(params, AutoAugment(AutoAugmentPolicy.IMAGENET).policies)
    for dropped in range(len(cifar)):  # losing any one sub-policy is detected
        with pytest.raises(AssertionError):
            assert_op_frequencies(params, cifar[:dropped] + cifar[dropped + 1:])
    # Each sub-policy is drawn 1/25 of the time, and each of its slots fires with its probability.
    freq = np.bincount(params.policy, minlength=25) / n
    assert np.abs(freq - 1 / 25).max() <= 5 * math.sqrt((1 / 25) * (24 / 25) / n)
    for sub_id, sub in enumerate(cifar):
        rows = params.policy == sub_id
        for s, (name, p, _) in enumerate(sub):
            fired = params.op[rows, s] != A.NO_OP
            assert np.all(params.op[rows, s][fired] == A.OP_ID[name])
            assert abs(fired.mean() - p) <= 5 * math.sqrt(max(p * (1 - p), 1e-9) / rows.sum()) + 1e-12


def test_signed_magnitudes_are_symmetric_and_unsigned_ones_fixed():
    n = 200_000
    params = A.sample_autoaugment(np.random.default_rng(1), n, 32, 32)
    bins = A.magnitude_bins(32, 32)
    for sub_id, sub in enumerate(A.CIFAR10_POLICY):
        rows = params.policy == sub_id
        for s, (name, _, b) in enumerate(sub):
            m = params.magnitude[rows, s][params.op[rows, s] != A.NO_OP].astype(np.float64)
            if m.size == 0:
                continue
            value = bins[A.OP_ID[name], b or 0]
            offset = 1.0 if name in ENHANCE else 0.0
            np.testing.assert_allclose(np.abs(m - offset), value, atol=1e-6, err_msg=name)
            if name in A.SIGNED and value > 0:
                negative = (m < offset).mean()
                assert abs(negative - 0.5) <= 5 * math.sqrt(0.25 / m.size), (name, negative)
            else:
                assert np.all(m >= offset), name


def test_same_seed_same_draws_and_a_fixed_number_of_draws():
    a = A.sample_autoaugment(np.random.default_rng(42), 500, 32, 32)
    b = A.sample_autoaugment(np.random.default_rng(42), 500, 32, 32)
    c = A.sample_autoaugment(np.random.default_rng(43), 500, 32, 32)
    for f in ("policy", "op", "magnitude", "affine"):
        assert np.array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.op, c.op)
    assert a.op.dtype == np.int8 and a.magnitude.dtype == np.float32 and a.affine.shape == (500, 2, 2, 3)
    # The draws are the sub-policy, two fire uniforms and two sign uniforms per image, whatever fires.
    rng, ref = np.random.default_rng(7), np.random.default_rng(7)
    A.sample_autoaugment(rng, 300, 32, 32)
    ref.integers(0, 25, 300), ref.random((300, 2)), ref.random((300, 2))
    assert rng.random() == ref.random()


# --------------------------------------------------------------------------------------------------
# Cutout
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height,width,size", [(32, 32, 16), (31, 29, 15), (32, 32, 0), (8, 9, 40)])
def test_cutout_matches_the_reference_rule(height, width, size):
    """The reference code's square, written out per image: rows [cy − L//2, cy + L//2) clipped to the image,
    columns likewise, set to 0; everything else untouched."""
    n = 40
    x = torch.rand((n, 3, height, width))
    centres = A.sample_cutout(np.random.default_rng(3), n, height, width, size)
    sizes = np.where(np.arange(n) % 4 == 0, 0, size)  # per-row sizes too: 0 = no Cutout
    for size_arg in (size, sizes):
        y = A.apply_cutout(x, centres, size_arg)
        expected = x.clone()
        for i in range(n):
            half = int(np.broadcast_to(size_arg, (n,))[i]) // 2
            cy, cx = centres[i]
            expected[i, :, max(0, cy - half):min(height, cy + half), max(0, cx - half):min(width, cx + half)] = 0
        assert torch.equal(y, expected)


def test_cutout_centres_are_uniform():
    n, height, width = 120_000, 32, 29
    c = A.sample_cutout(np.random.default_rng(0), n, height, width, 16)
    assert c.dtype == np.int32 and c.shape == (n, 2)
    for axis, side in ((0, height), (1, width)):
        counts = np.bincount(c[:, axis], minlength=side)
        assert len(counts) == side  # nothing outside the image
        p = 1 / side
        assert np.abs(counts / n - p).max() <= 5 * math.sqrt(p * (1 - p) / n), counts
    # Rows and columns are drawn independently: the joint distribution over the four quadrants is flat.
    quad = np.bincount((c[:, 0] < 16) * 2 + (c[:, 1] < 15), minlength=4) / n
    expected = np.outer([1 - 16 / 32, 16 / 32], [1 - 15 / 29, 15 / 29]).ravel()
    assert np.abs(quad - expected).max() <= 5 * math.sqrt(0.25 / n)


# --------------------------------------------------------------------------------------------------
# The policy views
# --------------------------------------------------------------------------------------------------


def test_simclr_policy_draws_nothing_and_changes_nothing():
    rng, ref = np.random.default_rng(0), np.random.default_rng(0)
    p = A.sample_policy_params(rng, 50, 32, 32, AugConfig(policy="simclr"))
    assert rng.random() == ref.random()
    assert not p.autoaugment.any() and (p.aa.op == A.NO_OP).all() and not p.cutout_px.any()
    x = torch.rand((50, 3, 32, 32))
    assert torch.equal(A.apply_policy_view(x, p), x)
    aug, view = A.sample_view(np.random.default_rng(4), 50, 32, 32, AugConfig(policy="simclr"))
    plain = sample_aug_params(np.random.default_rng(4), 50, 32, 32, AugConfig(policy="simclr"))
    assert all(np.array_equal(getattr(aug, f), getattr(plain, f)) for f in ("crop", "flip", "brightness", "hue"))


@pytest.mark.parametrize("policy", ["autoaugment", "cmo_randaug"])
def test_autoaugment_rows_get_the_policy_and_cutout_and_no_jitter(policy):
    n = 40_000
    cfg = AugConfig(policy=policy)
    aug, view = A.sample_view(np.random.default_rng(8), n, 32, 32, cfg)
    chosen = view.autoaugment
    if policy == "autoaugment":
        assert chosen.all()
    else:
        assert abs(chosen.mean() - A.CMO_AUTOAUGMENT_PROB) <= 5 * math.sqrt(0.25 / n)
    # AutoAugment rows: policy ops as drawn, Cutout of cfg.cutout_px, colour jitter and grayscale off.
    assert (view.cutout_px[chosen] == cfg.cutout_px).all() and (view.cutout_px[~chosen] == 0).all()
    assert (view.aa.op[~chosen] == A.NO_OP).all() and (view.aa.op[chosen] != A.NO_OP).any()
    assert_op_frequencies(view.aa.select(chosen), AutoAugment(AutoAugmentPolicy.CIFAR10).policies)
    assert (aug.brightness[chosen] == 1).all() and (aug.hue[chosen] == 0).all() and not aug.grayscale[chosen].any()
    assert (view.aa.affine[~chosen] == np.eye(2, 3, dtype=np.float32)).all()
    # SimCLR rows keep the jitter augment.py drew for them.
    if policy == "cmo_randaug":
        plain = sample_aug_params(np.random.default_rng(8), n, 32, 32, cfg)
        assert np.array_equal(aug.brightness[~chosen], plain.brightness[~chosen])
        assert np.array_equal(aug.grayscale[~chosen], plain.grayscale[~chosen])
        assert (aug.brightness[~chosen] != 1).mean() > 0.7


def test_cutout_comes_after_autoaugment():
    """With Invert drawn, a Cutout applied after it leaves zeros; applied before, it would leave ones."""
    n = 6
    x = torch.rand((n, 3, 32, 32)) * 0.5 + 0.25
    view = A.PolicyParams(np.ones(n, bool), single_op("Invert", 0.0, n, 32, 32),
                          np.full((n, 2), 16, np.int32), np.full(n, 16, np.int32))
    y = A.apply_policy_view(x, view)
    assert (y[:, :, 8:24, 8:24] == 0).all()
    torch.testing.assert_close(y[:, :, :8], 1 - x[:, :, :8])


def test_augment_view_is_crop_flip_then_policy():
    n = 64
    images = make_images(n, 32, 32, seed=1)
    aug, view = A.sample_view(np.random.default_rng(3), n, 32, 32, AugConfig(policy="cmo_randaug"))
    y = A.augment_view(images, aug, view, out_size=32)
    torch.testing.assert_close(y, A.apply_policy_view(augment(images, aug, 32), view))
    # Identity crop and no jitter: the view is the policy applied to the image itself.
    flat = A.augment_view(images, identity_aug_params(n, 32, 32), view, out_size=32)
    torch.testing.assert_close(flat, A.apply_policy_view(images.float() / 255, view), atol=1e-5, rtol=0)
