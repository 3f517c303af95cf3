"""The DALI backend (pipelines/backends/dali_executor.py) against the torch reference, on the CPU (device_id=None).

What is checked:
- the DALI graph reproduces mixing.render_views for fixed plans and augmentations (every crop mode, aug order
  and mix op), within float-rounding tolerances stated below;
- λ and the labels equal the pasted areas and the sampled images (read back from the pixels);
- foreground classes follow q(k) (chi-square; a wrong weighting is rejected);
- image-folder, ImageNet-LT list and iNaturalist JSON sources (fixtures, and generated photo-like JPEGs);
- two ranks see disjoint backgrounds and equal epoch lengths, equal to the torch loader's;
- resume (set_epoch with start_batch) and abandoned epochs;
- AutoAugment and Cutout (aug.policy autoaugment, cmo_randaug): every op forced alone at three magnitudes,
  both signs, either slot, at 32 and 31 px, against autoaugment.py, with proof that a wrong sign, bin,
  skipped slot, swapped order or skipped Cutout fails; the drawn plans of both policies (pad and resized
  crops, after_mix), with the rows that hang on a rounding tie held to a mean bound (dali_autoaugment.py's docstring);
- `mixtail train --data.backend=dali` (also with each aug.policy) and the loader benchmark, tiny, on the CPU.
GPU variants (marked gpu) run the same comparisons with device_id=0 where CUDA is present.

    python -m pytest tests/test_dali_loader.py -q
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed (pip install 'mixtail[dali]')")

from dataclasses import replace  # noqa: E402

from mixtail.pipelines.ops import autoaugment as AA  # noqa: E402
from mixtail.pipelines.ops.augment import AugParams, identity_aug_params, sample_aug_params  # noqa: E402
from mixtail.pipelines.loader import build_loader, loader_for_dataset
from mixtail.pipelines.batch import normalize_views  # noqa: E402
from mixtail.pipelines.config import AugConfig, DataConfig  # noqa: E402
from mixtail.pipelines.backends import dali_autoaugment  # noqa: E402
from mixtail.pipelines.backends.dali_executor import run_plan_once  # noqa: E402
from mixtail.pipelines.sources.types import ImageArrays, ImageFiles  # noqa: E402
from mixtail.pipelines.ops.mixing import MixParams, render_views
from mixtail.pipelines.ops.augment import box_mask  # noqa: E402
from mixtail.pipelines.plan import Planner, pack_train_plan, plan_layout  # noqa: E402
from mixtail.pipelines.sampling import foreground_class_probs, foreground_weights, sample_order  # noqa: E402
from mixtail.pipelines.config import MixConfig as _MixConfig  # noqa: E402
from mixtail.trainer.config import load_config  # noqa: E402

from helpers.images import CIFAR10_CLASSES, write_cifar_like_tree  # noqa: E402


def MixConfig(**overrides) -> _MixConfig:  # noqa: N802 - stands in for the dataclass
    """These tests exercise mixing itself: every batch is mixed from epoch 0 unless a test says otherwise
    (the defaults mix half the batches, from epoch 4: tests/test_config.py pins them)."""
    return _MixConfig(**{"mix_prob": 1.0, "start_epoch": 0, **overrides})


pytestmark = pytest.mark.dali

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (the GPU variant of a CPU test)")

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# No flip and no colour: with aug_order none (no cropping) every view is its component's own pixels.
PLAIN = AugConfig(flip=False, color_jitter=0.0, hue=0.0, color_prob=0.0, grayscale_prob=0.0)
# Tolerances in grey levels (0..255), converted to normalized units below. Both backends compute the same
# bilinear interpolation at the same source coordinates in float32; they differ only by rounding: of the
# coordinates (DALI derives them from a float32 ROI, up to S²/h = 200 px away for the box resize at 32 px)
# and of the weights and the colour matrix. Measured: < 0.003 grey levels. A wrong pixel offset, flip,
# box size or an antialiased resize moves pixels by whole grey levels (tens on these noise images).
TOL_INSIDE = 0.02  # inside the box: the foreground's shrink plus its own crop and colour
TOL_OUTSIDE = 0.01  # outside the box: the background's crop/flip/colour, no box resize involved
TOL_EXACT = 0.001  # outside the box with no augmentation: a pure copy, only normalization rounding


def _grey(tol: float) -> float:
    return tol / (255.0 * min(STD))


def _any_loader(backend, dataset, *, train=True, batch_size=8, aug=None, mix=None, rank=0, world_size=1, seed=0,
                image_size=None, device="cpu", mean=MEAN, std=STD, fg_sampling="class", num_threads=2, drop_last=True):
    size = image_size or (dataset.images.shape[1] if isinstance(dataset, ImageArrays) else 32)
    data = DataConfig(backend=backend, batch_size=batch_size * world_size, eval_batch_size=batch_size,
                      image_size=size, mean=mean, std=std, fg_sampling=fg_sampling, num_threads=num_threads,
                      drop_last=drop_last)
    return loader_for_dataset(dataset, data, aug or AugConfig(), mix or MixConfig(), split="train" if train else "test",
                              rank=rank, world_size=world_size, device=torch.device(device), seed=seed)


def _loader(dataset, **kw):
    return _any_loader("dali", dataset, **kw)


def _torch_loader(dataset, **kw):
    return _any_loader("torch", dataset, **kw)


def _from_config(backend, data, aug, mix, **kw):
    return build_loader(replace(data, backend=backend), aug, mix, **kw)


def _noise(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _reference(images: np.ndarray, plan) -> list[np.ndarray]:
    """mixing.render_views + normalize, as (n, S, S, 3) float arrays (the torch backend's math)."""
    t = torch.from_numpy(images).permute(0, 3, 1, 2)
    dp = plan.to("cpu")
    views = render_views(t[dp["fg_index"].long()], t[dp["bg_index"].long()], dp, out_size=images.shape[1])
    return [normalize_views([v], MEAN, STD).permute(0, 2, 3, 1).numpy() for v in views]


def _box_masks(plan, size: int) -> np.ndarray:
    m = np.zeros((len(plan), size, size), bool)
    for i, (t, l, h, w) in enumerate(plan["box"]):
        m[i, t:t + h, l:l + w] = True
    return m


def _assert_matches_reference(views, ref, plan, size, exact_outside=False):
    inside = _box_masks(plan, size)[..., None]
    for v, (d, r) in enumerate(zip(views, ref)):
        err = np.abs(d - r)
        out_tol = _grey(TOL_EXACT if exact_outside else TOL_OUTSIDE)
        assert err[~np.broadcast_to(inside, err.shape)].max(initial=0) <= out_tol, f"view {v} outside the box"
        assert err[np.broadcast_to(inside, err.shape)].max(initial=0) <= _grey(TOL_INSIDE), f"view {v} inside the box"


def _run(images, plan, aug, device_id=None):
    return run_plan_once(images, plan, aug=aug, mean=MEAN, std=STD, device_id=device_id)


# --------------------------------------------------------------------------------------------------
# The graph against the torch reference, fixed parameters
# --------------------------------------------------------------------------------------------------


def _fixed_plan(n: int, size: int, aug_order: str, crop: str, mix_op: str = "resize"):
    """Hand-picked boxes (corner, interior, full canvas, unmixed) and augmentations (windows touching every
    border, flips, strong colour and grayscale). Foreground i is image i, background i is image n + i."""
    s = size
    box = np.array([[0, 0, 16, 16], [5, 7, 20, 11], [0, 0, s, s], [0, 0, 0, 0], [s - 9, s - 13, 9, 13],
                    [3, 1, 27, 29]][:n], dtype=np.int64)
    mixed = box[:, 2] > 0
    lam = np.where(mixed, box[:, 2] * box[:, 3] / (s * s), 1.0).astype(np.float32)
    if aug_order == "none":  # no cropping: whole images
        windows = np.tile([0, 0, s, s], (6, 1))
    elif crop == "pad":
        windows = np.array([[-4, 3, s, s], [0, 0, s, s], [4, -4, s, s], [2, 2, s, s], [-1, 0, s, s], [0, 4, s, s]])
    else:
        windows = np.array([[0, 0, 20, 24], [0, 0, s, s], [s - 10, s - 31, 10, 31], [7, 3, 5, 5], [1, 2, 30, 29],
                            [s - 16, 0, 16, 9]])

    def aug(shift: int) -> AugParams:
        k = (np.arange(n) + shift) % 6
        return AugParams(crop=windows[k].astype(np.float32), flip=(k % 2 == 1),
                         brightness=np.float32([1.0, 1.3, 0.7, 1.0, 1.2, 0.9])[k],
                         contrast=np.float32([1.0, 0.6, 1.4, 1.1, 1.0, 0.8])[k],
                         saturation=np.float32([1.0, 0.0, 1.5, 0.7, 1.3, 1.0])[k],
                         hue=np.float32([0.0, 0.1, -0.1, 0.05, 0.0, -0.03])[k],
                         grayscale=(k == 3))

    if aug_order == "after_mix":
        augs = {"mx0": aug(2), "mx1": aug(3)}
    else:
        augs = {"fg0": aug(0), "bg0": aug(2), "fg1": aug(1), "bg1": aug(3)}
    full = (np.full(n, float(s)), np.full(n, float(s)))
    return pack_train_plan(plan_layout(train=True, aug_order=aug_order, num_views=2, mix_op=mix_op), epoch=0, batch=0,
                           fg_index=np.arange(n), bg_index=n + np.arange(n), labels=np.zeros(2 * n, np.int64),
                           mix=MixParams(lam, box, mixed), augs=augs, sizes={p: full for p in augs})


@pytest.mark.parametrize("crop", ["pad", "resized"])
@pytest.mark.parametrize("aug_order", ["before_mix", "after_mix", "none"])
@pytest.mark.parametrize("mix_op", ["resize", "crop"])
def test_graph_matches_reference_fixed_params(crop, aug_order, mix_op):
    size, n = 32, 6
    images = np.concatenate([_noise(n, size, 1), _noise(n, size, 2)])
    aug = AugConfig(crop=crop)
    plan = _fixed_plan(n, size, aug_order, crop, mix_op)
    views = _run(images, plan, aug)
    _assert_matches_reference(views, _reference(images, plan), plan, size)


def _drawn_plan(seed, n, size, aug, mix, labels_n):
    labels = np.arange(labels_n) % 5
    planner = Planner.for_training(labels, None, aug=aug, mix=mix, image_size=size, batch_size=n, num_views=2,
                                   fg_weights=foreground_weights(labels, 5, "instance", 1.0), seed=seed, rank=0,
                                   world_size=1, num_epochs=None)
    return planner.plan(0, 0)


@pytest.mark.parametrize("seed,box", [(0, {}), (1, {}), (2, {"box": "clipped", "mix_op": "crop"}),
                                      (3, {"box": "clipped", "box_per": "batch", "mix_op": "crop"})])
def test_graph_matches_reference_drawn_params(seed, box):
    """The plans the loaders actually draw, RandomResizedCrop at 48 px, some pairs unmixed; CutMix's clipped
    boxes (mix.box) too, per pair and one per batch."""
    size, n = 48, 16
    aug, mix = AugConfig(crop="resized"), MixConfig(mix_prob=0.7, mix_per="sample", **box)
    images = _noise(40, size, 3 + seed)
    plan = _drawn_plan(seed, n, size, aug, mix, 40)
    assert 0 < plan["mixed"].sum() < n
    views = _run(images, plan, aug)
    _assert_matches_reference(views, _reference(images, plan), plan, size)


def test_the_graph_refuses_a_plan_of_another_layout():
    """The graph is built once from its planner's layout (aug_order, mix_op, views): a plan drawn for another
    layout would be rendered the graph's way, so it is refused, naming both."""
    ds = ImageArrays(_noise(16, 16, 0), np.arange(16) % 4, ["a", "b", "c", "d"])
    dali = _loader(ds, mix=MixConfig(mix_op="resize"))
    crop_plan = _loader(ds, mix=MixConfig(mix_op="crop")).planner.plan(0, 0)
    with pytest.raises(ValueError, match="mix_op crop, 2 views.* built for .*mix_op resize"):
        next(dali.executor.batches(iter([crop_plan] * 3), 1))


def test_antialiased_box_resize_would_fail_the_tolerance():
    """The tolerance tests something: the foreground shrunk with an antialiasing filter (DALI's default)
    instead of the reference's plain bilinear sampling differs by far more than TOL_INSIDE."""
    from mixtail.pipelines.ops.mixing import resize_into_boxes

    size = 32
    fg = torch.from_numpy(_noise(1, size, 5)).permute(0, 3, 1, 2).float()
    box = torch.tensor([[4, 4, 16, 16]])
    plain = resize_into_boxes(fg, box)[0, :, 4:20, 4:20]
    smooth = torch.nn.functional.interpolate(fg, size=(16, 16), mode="bilinear", antialias=True)[0]
    assert (plain - smooth).abs().max() > 100 * TOL_INSIDE


# --------------------------------------------------------------------------------------------------
# AutoAugment and Cutout in the graph (aug.policy autoaugment, cmo_randaug) against the torch reference
# --------------------------------------------------------------------------------------------------

_QUANTIZING = [AA.OP_ID[k] for k in ("Posterize", "Solarize", "Equalize")]  # read 8-bit levels
_CONTINUOUS = [AA.OP_ID[k] for k in ("Brightness", "Color", "Contrast", "Sharpness", "AutoContrast")]
_GEOMETRIC = [AA.OP_ID[k] for k in AA.GEOMETRIC]
# A pixel is a nearest-neighbour tie when a source coordinate lies this close to a pixel edge (an integer):
# the two backends' float rounding may then pick either neighbour (dali_autoaugment.py's docstring).
TIE_EPS = 1e-3
# Rows whose result hangs on a rounding tie (see _tie_sensitive) may differ from the reference by at most this
# mean error over the row, in grey levels: Equalize and AutoContrast are discontinuous (one pixel's level
# moves a whole channel's lookup table or range), so a tie moves many values a little or a few a lot.
# Measured worst over 25 seeds of cmo_randaug/resized/32, autoaugment/resized/31 and autoaugment/after_mix/32:
# 0.14. A wrong op, sign, bin or slot moves a row by one grey level (Posterize 7 vs 6 bits) to tens.
TIE_ROW_MEAN = 0.5


def _grey_err(dali: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """|difference| of normalized (..., 3) views in grey levels (0..255), channel by channel."""
    return np.abs(dali - ref) * 255.0 * np.asarray(STD)


def _range_images(n: int, size: int, seed: int, degenerate: bool = True) -> np.ndarray:
    """Noise whose channels span less than 0..255, so AutoContrast and Equalize change it. With `degenerate`,
    every third image has a degenerate case: 3k+1 a constant channel (AutoContrast leaves it), 3k+2 a channel
    where one level covers 85% of the pixels (Equalize's step is 0 there: it leaves the channel)."""
    rng = np.random.default_rng(seed)
    lo = rng.integers(0, 100, (n, 1, 1, 3))
    hi = rng.integers(150, 256, (n, 1, 1, 3))
    x = lo + np.floor(rng.random((n, size, size, 3)) * (hi - lo + 1))
    if degenerate:
        x[1::3, :, :, 1] = 77
        dominant = rng.random((n, size, size)) < 0.85
        x[2::3, :, :, 0] = np.where(dominant[2::3], 200, x[2::3, :, :, 0])
    return x.astype(np.uint8)


def _magnitudes(ops: np.ndarray, bins: np.ndarray, signs: np.ndarray, size: int) -> np.ndarray:
    """Signed magnitudes of op ids at bins, as autoaugment.sample_autoaugment gives them (0 for NO_OP)."""
    value = AA.magnitude_bins(size, size)[np.maximum(ops, 0), bins]
    signed = np.isin(ops, [AA.OP_ID[k] for k in AA.SIGNED])
    enhance = np.isin(ops, [AA.OP_ID[k] for k in AA.ENHANCE])
    s = np.where(signed, signs, 1.0)
    return np.where(ops == AA.NO_OP, 0.0, np.where(enhance, 1.0 + s * value, s * value))


def _with_policy(plan, size: int, comp: str, op=None, mag=None, cutout=None):
    """A copy of `plan` with one component's op ids and magnitudes (its affine maps rebuilt from them) or its
    Cutout boxes replaced: the plan a broken graph would in effect have followed."""
    new = replace(plan, table=plan.table.copy())
    op = plan[f"{comp}.aa_op"] if op is None else op
    mag = plan[f"{comp}.aa_mag"] if mag is None else mag
    aa = AA.autoaugment_params(op, mag, size, size)
    new.layout.write(new.table, f"{comp}.aa_op", aa.op)
    new.layout.write(new.table, f"{comp}.aa_mag", aa.magnitude)
    new.layout.write(new.table, f"{comp}.aa_affine", aa.affine.reshape(len(op), 12))
    if cutout is not None:
        new.layout.write(new.table, f"{comp}.cutout", cutout)
    return new


def _policy_plan(size: int, ops: dict, cutout: dict):
    """An unmixed plan with identity crops (so the policy reads exact 8-bit levels) whose components take
    the given (n, 2) op ids and magnitudes and (n, 4) Cutout boxes. Background i is image i."""
    n = len(next(iter(cutout.values())))
    layout = plan_layout(train=True, aug_order="before_mix", num_views=2, colour=False, policy="autoaugment")
    full = (np.full(n, float(size)), np.full(n, float(size)))
    plan = pack_train_plan(layout, epoch=0, batch=0, fg_index=np.arange(n), bg_index=np.arange(n),
                           labels=np.zeros(n, np.int64),
                           mix=MixParams(np.ones(n, np.float32), np.zeros((n, 4), np.int64), np.zeros(n, bool)),
                           augs={p: identity_aug_params(n, size, size) for p in ops}, sizes={p: full for p in ops})
    for p, (op, mag) in ops.items():
        plan = _with_policy(plan, size, p, op, mag, cutout[p])
    return plan


def _warp_ties(affine: np.ndarray, size: int) -> np.ndarray:
    """(n, S, S) bool: destination pixels whose source coordinate under (n, 2, 3) maps is a nearest tie."""
    c = np.arange(size) + 0.5
    a = affine.astype(np.float64)[:, :, :, None, None]  # (n, 2, 3, 1, 1)
    src = a[:, :, 0] * c[None, None, None, :] + a[:, :, 1] * c[None, None, :, None] + a[:, :, 2]  # (n, 2, S, S)
    return (np.abs(src - np.round(src)) < TIE_EPS).any(axis=1)


def _tie_sensitive(plan, comp: str, size: int, continuous_input) -> np.ndarray:
    """(n,) bool: rows of a component whose result may hang on a rounding tie, so that the backends can
    legitimately differ there: a level-reading op (Posterize, Solarize, Equalize) on non-integer values (a
    resized crop, the resize-pasted box of after_mix, or the output of a continuous op in slot 0), or a
    geometric op with a nearest-neighbour tie. Everything else reads exact 8-bit values in both backends."""
    op = plan[f"{comp}.aa_op"]
    affine = plan[f"{comp}.aa_affine"].reshape(-1, 2, 2, 3)
    quantizing = np.isin(op, _QUANTIZING)
    after_continuous = continuous_input | np.isin(op[:, 0], _CONTINUOUS)  # what slot 1 reads
    out = (quantizing[:, 0] & continuous_input) | (quantizing[:, 1] & after_continuous)
    for k in (0, 1):
        out |= np.isin(op[:, k], _GEOMETRIC) & _warp_ties(affine[:, k], size).any(axis=(1, 2))
    return out


def _sensitive_rows(plan, view: int, size: int, crop: str, aug_order: str) -> np.ndarray:
    covered = (plan["box"][:, 2] > 0) & (plan["box"][:, 3] > 0)
    resized = np.full(len(plan), crop == "resized")
    if aug_order == "after_mix":
        return _tie_sensitive(plan, f"mx{view}", size, resized | covered)
    fg = _tie_sensitive(plan, f"fg{view}", size, resized)
    return _tie_sensitive(plan, f"bg{view}", size, resized) | (covered & fg)


def _policy_row_failures(views, ref, plan, size: int, crop: str, aug_order: str) -> tuple[list, int]:
    """The (view, row) pairs that break the rule (tie-free rows within TOL_INSIDE everywhere; tie-sensitive
    rows within TIE_ROW_MEAN on average), and how many rows were held to the exact rule."""
    bad, exact = [], 0
    for v, (d, r) in enumerate(zip(views, ref)):
        err = _grey_err(d, r)
        sensitive = _sensitive_rows(plan, v, size, crop, aug_order)
        exact += int((~sensitive).sum())
        for i in range(len(plan)):
            ok = err[i].mean() <= TIE_ROW_MEAN if sensitive[i] else err[i].max() <= TOL_INSIDE
            if not ok:
                bad.append((v, i))
    return bad, exact


# Every op at bins 3, 6 and 9 with signs +, −, + (one row each): in bg0 the op is slot 0 followed by Invert
# in slot 1; in bg1 slot 0 does not fire and the op is slot 1. Half the bg0 rows also get a Cutout box.
_BINS, _SIGNS = np.array([3, 6, 9]), np.array([1.0, -1.0, 1.0])


@functools.lru_cache(maxsize=None)
def _forced_case(size: int, equalize_on_host: bool = True, device_id: int | None = None):
    """(images, plan, DALI views, per-view tie masks) of the forced-op plan at `size` (run once per size).
    equalize_on_host=False runs the graph's own Equalize (the GPU's) on the CPU."""
    n_ops = len(AA.OPS)
    op = np.repeat(np.arange(n_ops), 3)
    bins, signs = np.tile(_BINS, n_ops), np.tile(_SIGNS, n_ops)
    n = len(op)
    mag = _magnitudes(op, bins, signs, size)
    invert = np.full(n, AA.OP_ID["Invert"])
    none = np.full(n, AA.NO_OP)
    centres = np.random.default_rng(size).integers(0, size, (n, 2))
    cut = AA.cutout_boxes(centres, np.where(np.arange(n) % 2 == 0, 16, 0), size, size)
    ops = {"bg0": (np.stack([op, invert], 1), np.stack([mag, np.zeros(n)], 1)),
           "bg1": (np.stack([none, op], 1), np.stack([np.zeros(n), mag], 1))}
    plan = _policy_plan(size, ops, {"bg0": cut, "bg1": np.zeros_like(cut)})
    images = _range_images(n, size, seed=size)
    saved = dali_autoaugment.EQUALIZE_ON_HOST
    dali_autoaugment.EQUALIZE_ON_HOST = equalize_on_host
    try:
        views = _run(images, plan, AugConfig(policy="autoaugment"), device_id=device_id)
    finally:
        dali_autoaugment.EQUALIZE_ON_HOST = saved
    affine = [plan["bg0.aa_affine"].reshape(n, 2, 2, 3)[:, 0], plan["bg1.aa_affine"].reshape(n, 2, 2, 3)[:, 1]]
    ties = [_warp_ties(a, size) for a in affine]
    return images, plan, views, ties


def _op_reference(images: np.ndarray, plan) -> list[np.ndarray]:
    """autoaugment.apply_autoaugment and Cutout straight on the images (the plan's crops are the identity),
    normalized, as (n, S, S, 3) per view. (Not render_views: its crop resamples the identity window, which at
    sizes that are not powers of two moves values by a float ulp, and AutoContrast stretches a constant
    channel's ulp noise to 0..255.)"""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    out = []
    for v in (0, 1):
        p = f"bg{v}"
        op = plan[f"{p}.aa_op"]
        params = AA.AutoAugmentParams(np.full(len(op), -1, np.int8), op.astype(np.int8), plan[f"{p}.aa_mag"],
                                      plan[f"{p}.aa_affine"].reshape(-1, 2, 2, 3))
        y = AA.apply_autoaugment(x, params)
        y = torch.where(box_mask(torch.from_numpy(plan[f"{p}.cutout"]).long(), *y.shape[2:]), 0.0, y)
        out.append(normalize_views([y], MEAN, STD).permute(0, 2, 3, 1).numpy())
    return out


def _row_max_errors(views, ref, ties) -> np.ndarray:
    """(views, rows) largest grey-level error outside the tie pixels."""
    out = []
    for d, r, t in zip(views, ref, ties):
        err = np.where(t[..., None], 0.0, _grey_err(d, r))
        out.append(err.reshape(len(err), -1).max(1))
    return np.stack(out)


@pytest.mark.parametrize("size,equalize_on_host", [(32, True), (31, True), (32, False), (31, False)])
def test_each_autoaugment_op_matches_reference(size, equalize_on_host):
    """Every op alone, at three magnitudes and both signs, in either slot, with and without Cutout, on exact
    8-bit inputs: the graph equals autoaugment.py's op to float rounding everywhere but at nearest-neighbour
    ties of the geometric ops (whole rows or columns: Rotate at odd sizes, ShearX/Y at bin 6). Both Equalize
    versions: the CPU's host function and the graph's one-hot histogram (the GPU's)."""
    images, plan, views, ties = _forced_case(size, equalize_on_host)
    err = _row_max_errors(views, _op_reference(images, plan), ties)
    op = np.repeat(np.arange(len(AA.OPS)), 3)
    for k, name in enumerate(AA.OPS):
        assert err[:, op == k].max() <= TOL_OUTSIDE, f"{name}: {err[:, op == k].max():.3g} grey levels"
    geometric = np.isin(op, _GEOMETRIC)
    for t in ties:  # ties are whole rows or columns of a few geometric rows, never most of an image
        assert not t[~geometric].any() and t.mean(axis=(1, 2)).max() <= 0.2 and t.any(axis=(1, 2)).sum() <= 6


@pytest.mark.parametrize("size", [32, 31])
def test_wrong_sign_magnitude_slot_or_cutout_fails_the_op_test(size):
    """The tolerance of the op test rejects a graph that got any of the plan's numbers wrong: each wrong
    variant's reference differs from the graph's output beyond TOL_OUTSIDE on every row it changes."""
    images, plan, views, ties = _forced_case(size)
    op = np.repeat(np.arange(len(AA.OPS)), 3)
    bins, signs = np.tile(_BINS, len(AA.OPS)), np.tile(_SIGNS, len(AA.OPS))
    signed = np.isin(op, [AA.OP_ID[k] for k in AA.SIGNED])
    levels = np.isin(op, [AA.OP_ID["Posterize"], AA.OP_ID["Solarize"]])

    def rows_failing(wrong_plan, view):
        return _row_max_errors(views, _op_reference(images, wrong_plan), ties)[view] > TOL_OUTSIDE

    for view, comp, slot in ((0, "bg0", 0), (1, "bg1", 1)):
        m = plan[f"{comp}.aa_mag"].copy()
        m[:, slot] = _magnitudes(op, bins, -signs, size)  # the opposite sign
        assert rows_failing(_with_policy(plan, size, comp, mag=m), view)[signed].all(), f"{comp}: sign"
        m = plan[f"{comp}.aa_mag"].copy()
        # Another bin (bin 9 -> 6: Solarize at bins 8 and 9 differ only on levels below 29); bits: one fewer
        # (Posterize at bins 8 and 9 agree).
        posterize = op == AA.OP_ID["Posterize"]
        m[:, slot] = np.where(posterize, m[:, slot] - 1, _magnitudes(op, np.where(bins == 9, 6, bins - 1), signs, size))
        assert rows_failing(_with_policy(plan, size, comp, mag=m), view)[signed | levels].all(), f"{comp}: bin"
        o = plan[f"{comp}.aa_op"].copy()
        o[:, slot] = AA.NO_OP  # the op skipped
        assert rows_failing(_with_policy(plan, size, comp, op=o), view).all(), f"{comp}: slot {slot} skipped"
    o = plan["bg0.aa_op"].copy()
    o[:, 1] = AA.NO_OP  # bg0's second slot (Invert) skipped
    assert rows_failing(_with_policy(plan, size, "bg0", op=o), 0).all()
    o, m = plan["bg0.aa_op"][:, ::-1].copy(), plan["bg0.aa_mag"][:, ::-1].copy()  # slots swapped
    order_matters = np.isin(op, [AA.OP_ID[k] for k in ("Brightness", "Posterize", "Solarize", "Equalize")])
    order_matters &= ~((op == AA.OP_ID["Solarize"]) & (bins == 9))  # threshold 0 inverts all: commutes with Invert
    assert rows_failing(_with_policy(plan, size, "bg0", op=o, mag=m), 0)[order_matters].all()
    cut = plan["bg0.cutout"]
    no_cut = _with_policy(plan, size, "bg0", cutout=np.zeros_like(cut))
    assert rows_failing(no_cut, 0)[cut[:, 2] * cut[:, 3] > 0].all()  # Cutout skipped


def test_dali_own_equalize_is_not_the_reference_rule():
    """Why the graph writes Equalize out: DALI's fn.equalize (OpenCV's rule) is far from PIL's and
    torchvision's on the same 8-bit images (measured: 30 grey levels on average)."""
    from nvidia.dali import fn, pipeline_def

    images = _range_images(12, 32, seed=5)

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None)
    def pipe():
        return fn.equalize(fn.external_source(source=lambda: list(images), batch=True, layout="HWC"))

    p = pipe()
    p.build()
    out = p.run()[0]
    dali = np.stack([np.array(out[i]) for i in range(len(images))]).astype(np.float64)
    ref = AA.equalize(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0) * 255.0
    assert np.abs(dali - ref.round().permute(0, 2, 3, 1).numpy()).mean() > 10


@pytest.mark.parametrize("policy,crop,size,aug_order", [
    ("autoaugment", "pad", 32, "before_mix"),
    ("autoaugment", "pad", 31, "before_mix"),
    ("cmo_randaug", "pad", 31, "before_mix"),
    ("cmo_randaug", "resized", 32, "before_mix"),
    ("autoaugment", "pad", 32, "after_mix"),
])
def test_policy_plans_match_reference(policy, crop, size, aug_order):
    """The plans the loaders draw for aug.policy, some pairs unmixed: rows free of rounding ties equal the
    reference within TOL_INSIDE; tie-sensitive rows (_tie_sensitive) within TIE_ROW_MEAN on average. The same
    outputs fail against the plan with its signed magnitudes negated."""
    n = 48
    aug, mix = AugConfig(policy=policy, crop=crop), MixConfig(mix_prob=0.7, mix_per="sample", aug_order=aug_order)
    # No constant channels here: render_views' identity resampling at 31 px adds float-ulp noise to them,
    # which the reference's AutoContrast stretches to 0..255 (see _op_reference).
    images = _range_images(100, size, seed=size, degenerate=False)
    plan = _drawn_plan(size, n, size, aug, mix, 100)
    assert 0 < plan["mixed"].sum() < n
    views = _run(images, plan, aug)
    ref = _reference(images, plan)
    bad, exact = _policy_row_failures(views, ref, plan, size, crop, aug_order)
    assert not bad, f"(view, row) pairs off the reference: {bad}"
    assert exact >= (2 * n) // 2 if crop == "pad" else exact > 0  # most rows are held to the exact rule
    comps = [p for p in plan.layout.offsets if p.endswith(".aa_op")]
    wrong = plan
    for p in (c[:-len(".aa_op")] for c in comps):
        o, m = wrong[f"{p}.aa_op"], wrong[f"{p}.aa_mag"]
        enhance = np.isin(o, [AA.OP_ID[k] for k in AA.ENHANCE])
        wrong = _with_policy(wrong, size, p, mag=np.where(enhance, 2.0 - m, -m))
    bad_wrong, _ = _policy_row_failures(views, _reference(images, wrong), plan, size,
                                        crop, aug_order)
    covered = plan["box"][:, 2] > 0
    changed = set()
    for v in (0, 1):
        parts = [(f"mx{v}", np.ones(n, bool))] if aug_order == "after_mix" else [(f"bg{v}", np.ones(n, bool)),
                                                                                  (f"fg{v}", covered)]
        moved = np.zeros(n, bool)  # a signed op that does something (Color at bin 0 is the factor 1)
        for p, used in parts:
            o, m = plan[f"{p}.aa_op"], plan[f"{p}.aa_mag"]
            enhance = np.isin(o, [AA.OP_ID[k] for k in AA.ENHANCE])
            geometric = np.isin(o, _GEOMETRIC)
            moved |= used & ((enhance & (m != 1.0)) | (geometric & (m != 0.0))).any(axis=1)
        # Rows held to the exact rule: a tie-sensitive row whose change is mostly hidden under the pasted box
        # may stay within TIE_ROW_MEAN.
        moved &= ~_sensitive_rows(plan, v, size, crop, aug_order)
        changed |= {(v, int(i)) for i in np.flatnonzero(moved)}
    assert changed and changed <= set(bad_wrong)


# --------------------------------------------------------------------------------------------------
# The loader: parity with the torch loader, labels and λ, sampling, ranks, epochs
# --------------------------------------------------------------------------------------------------


def _demo_cfg(*overrides):
    """The smoke config with every batch mixed from epoch 0 unless an override says otherwise."""
    return load_config("smoke_cpu", ["--data.batch_size=16", "--mix.start_epoch=0", "--mix.mix_prob=1.0", *overrides])


@pytest.mark.parametrize("overrides", [[], ["--aug.crop=resized", "--mix.mix_prob=0.5"],
                                       ["--mix.mix_prob=0.5", "--mix.mix_per=sample", "--mix.aug_order=after_mix"],
                                       pytest.param(["--aug.policy=autoaugment"], marks=pytest.mark.slow),
                                       pytest.param(["--aug.policy=cmo_randaug", "--mix.mix_prob=0.5",
                                                     "--mix.mix_per=sample"], marks=pytest.mark.slow),
                                       ["--mix.box=clipped", "--mix.box_per=batch", "--mix.mix_op=crop",
                                        "--mix.mix_prob=0.5", "--data.drop_last=false"]])
def test_loader_matches_torch_loader(overrides):
    cfg = _demo_cfg(*overrides)
    policy = cfg.aug.policy != "simclr"
    kw = dict(split="train", rank=0, world_size=1, device=torch.device("cpu"), seed=7)
    tl = _from_config("torch", cfg.data, cfg.aug, cfg.mix, **kw)
    dl = _from_config("dali", cfg.data, cfg.aug, cfg.mix, **kw)
    assert len(dl) == len(tl) > 2
    # The second epoch continues the same pipeline (no rebuild); one epoch is enough for the policy cases,
    # whose torch reference is the slow part.
    for epoch in (0,) if policy else (0, 1):
        tl.set_epoch(epoch)
        dl.set_epoch(epoch)
        pipe = dl.executor._pipe
        n = pairs = 0
        for bt, bd in zip(tl, dl):
            pairs += len(bt.y_f)
            assert bd.images.shape == bt.images.shape == (2 * len(bt.y_f), 3, 32, 32) and bd.images.dtype == torch.float32
            assert bd.images.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(bd.y_f, bt.y_f) and torch.equal(bd.y_b, bt.y_b) and torch.equal(bd.lam, bt.lam)
            if policy:  # AutoAugment: rows that hang on a rounding tie get the mean rule (see _policy_row_failures)
                views = [x.permute(0, 2, 3, 1).numpy() for x in bd.images.chunk(2)]  # (B, S, S, 3) per view
                ref = [x.permute(0, 2, 3, 1).numpy() for x in bt.images.chunk(2)]
                bad, exact = _policy_row_failures(views, ref, bd.plan, 32, cfg.aug.crop, cfg.mix.aug_order)
                assert not bad and exact > len(bd.y_f)
            else:
                assert (bd.images - bt.images).abs().max() <= _grey(TOL_INSIDE)
            n += 1
        assert n == len(tl)
        # Every backend yields the count it promises: full batches, or every sample with the short tail kept.
        assert pairs == (len(tl) * 16 if cfg.data.drop_last else tl.planner.num_samples)
        if epoch == 1:
            assert dl.executor._pipe is pipe, "a fully iterated epoch should not restart the pipeline"


def test_test_split_shards_like_torch_loader():
    cfg = _demo_cfg("--data.eval_batch_size=128")
    for rank in (0, 1):
        kw = dict(split="test", rank=rank, world_size=2, device=torch.device("cpu"), seed=0)
        tl = _from_config("torch", cfg.data, cfg.aug, cfg.mix, **kw)
        dl = _from_config("dali", cfg.data, cfg.aug, cfg.mix, **kw)
        assert len(dl) == len(tl) == 4  # 1000 test images, 500 per rank: 3 x 128 and a partial batch
        got = list(dl)
        assert [b.y_f.numel() for b in got] == [b.y_f.numel() for b in tl] == [128, 128, 128, 116]
        for bt, bd in zip(tl, got):
            assert bd.num_views == 1 and torch.equal(bd.y_f, bt.y_f) and torch.equal(bd.y_b, bd.y_f)
            assert torch.all(bd.lam == 1)
            assert (bd.images - bt.images).abs().max() <= _grey(TOL_EXACT)


def test_resume_mid_epoch_and_abandoned_epochs():
    cfg = _demo_cfg()
    kw = dict(split="train", rank=0, world_size=1, device=torch.device("cpu"), seed=3)
    tl = _from_config("torch", cfg.data, cfg.aug, cfg.mix, **kw)
    dl = _from_config("dali", cfg.data, cfg.aug, cfg.mix, **kw)
    for epoch, start in [(2, 5), (3, 0), (4, 1)]:
        tl.set_epoch(epoch, start)
        dl.set_epoch(epoch, start)
        # Take two batches and abandon the epoch: the next set_epoch must still give the right batches.
        for bt, bd, _ in zip(tl, dl, range(2)):
            assert torch.equal(bd.y_f, bt.y_f) and torch.equal(bd.lam, bt.lam)
            assert (bd.images - bt.images).abs().max() <= _grey(TOL_INSIDE)


def _index_images(n: int, size: int) -> np.ndarray:
    """Image i is one flat colour that encodes i (r = i mod 256, g = i div 256, b = 255 − r)."""
    i = np.arange(n)
    colour = np.stack([i % 256, i // 256, 255 - i % 256], 1).astype(np.uint8)
    return np.broadcast_to(colour[:, None, None, :], (n, size, size, 3)).copy()


def _decode_index(pixels: torch.Tensor) -> np.ndarray:
    """(..., 3) pixel values 0..255 (mean 0, std 1 normalization) -> image index."""
    p = pixels.round().long().numpy()
    return p[..., 0] + 256 * p[..., 1]


def _flat_loader(n_images, labels, **kw):
    size = 16
    ds = ImageArrays(_index_images(n_images, size), labels, [str(k) for k in range(labels.max() + 1)])
    mix = kw.pop("mix", MixConfig(aug_order="none"))
    return _loader(ds, mix=mix, aug=PLAIN, mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255), **kw), ds


def test_labels_and_lambda_equal_the_pasted_areas():
    """With flat-colour images and no augmentation, the pixels tell which images were pasted where:
    λ·S² is the number of foreground pixels, y_f/y_b are those images' labels, and the indices are
    this rank's sample_order streams."""
    n, size = 60, 16
    labels = np.random.default_rng(0).integers(0, 5, n)
    loader, ds = _flat_loader(n, labels, batch_size=10, mix=MixConfig(aug_order="none", mix_prob=0.75,
                                                                      mix_per="sample"), seed=4)
    loader.set_epoch(1)
    w = foreground_weights(labels, 5, "class", 1.0)
    kw = dict(epoch=1, seed=4, rank=0, world_size=1, num_samples=n)
    bg_order, fg_order = sample_order(None, **kw), sample_order(w, **kw)
    unmixed = 0
    for b, batch in enumerate(loader):
        x = batch.images[:10].permute(0, 2, 3, 1) * 1.0  # view 0, (B, S, S, 3) in 0..255
        idx = _decode_index(x)  # (B, S, S)
        assert torch.equal(batch.images[:10], batch.images[10:])  # no crop, flip or colour: both views are the mix
        for i in range(10):
            bg_i, fg_i = bg_order[b * 10 + i], fg_order[b * 10 + i]
            assert batch.y_b[i] == labels[bg_i]
            fg_pixels = int((idx[i] == fg_i).sum()) if fg_i != bg_i else None
            if batch.lam[i] == 1:  # unmixed: the background alone, y_f = y_b
                unmixed += 1
                assert (idx[i] == bg_i).all() and batch.y_f[i] == batch.y_b[i]
                continue
            assert batch.y_f[i] == labels[fg_i]
            assert set(np.unique(idx[i])) <= {bg_i, fg_i}
            if fg_pixels is not None:
                assert fg_pixels == round(float(batch.lam[i]) * size * size), (b, i)
    assert 0 < unmixed < len(loader) * 10  # mix_prob 0.75 gives both kinds


@pytest.mark.parametrize("mode", ["class", "instance"])
def test_foreground_class_frequencies_follow_q(mode):
    """Chi-square of the foreground labels against q(k); the other weighting (and the data prior) fail."""
    from scipy.stats import chisquare

    counts = np.array([160, 80, 40, 20, 10, 5])
    labels = np.repeat(np.arange(6), counts)
    ds = ImageArrays(np.zeros((len(labels), 8, 8, 3), np.uint8), labels, [str(k) for k in range(6)])
    loader = _loader(ds, batch_size=63, mix=MixConfig(aug_order="none"), fg_sampling=mode, seed=11)
    y_f = []
    for epoch in range(6):  # 6 epochs x 5 batches x 63 = 1890 draws, through one continuing pipeline
        loader.set_epoch(epoch)
        y_f += [b.y_f.numpy() for b in loader]
    observed = np.bincount(np.concatenate(y_f), minlength=6)
    total = observed.sum()
    q = foreground_class_probs(counts, mode, 1.0)
    assert chisquare(observed, q * total).pvalue > 1e-3
    wrong = foreground_class_probs(counts, "instance" if mode == "class" else "class", 1.0)
    assert chisquare(observed, wrong * total).pvalue < 1e-9
    prior = counts / counts.sum()
    assert chisquare(observed, prior * total).pvalue < 1e-9


@pytest.mark.parametrize("drop_last", [True, False])
def test_two_ranks_disjoint_and_equal_lengths(drop_last):
    """35 samples a rank in batches of 4: 8 batches, or 9 with the short last one kept (data.drop_last false),
    which then delivers every sample of the rank's streams."""
    n = 70
    labels = np.arange(n) % 7
    global_batch = 8
    lengths, bgs = [], []
    for rank in (0, 1):
        kw = dict(batch_size=global_batch // 2, rank=rank, world_size=2, seed=2, drop_last=drop_last)
        loader, ds = _flat_loader(n, labels, **kw)
        torch_len = len(_torch_loader(ds, **kw))
        loader.set_epoch(0)
        seen_bg, seen_fg = [], []
        for b, batch in enumerate(loader):
            x = batch.images[:len(batch.y_f)].permute(0, 2, 3, 1)
            for i, (t, l, h, w) in enumerate(batch.plan["box"]):
                outside = np.ones((16, 16), bool)
                outside[t:t + h, l:l + w] = False
                seen_bg.append(int(_decode_index(x[i])[outside][0]))
                seen_fg.append(int(_decode_index(x[i, t + h // 2, l + w // 2])))
        kw = dict(epoch=0, seed=2, rank=rank, world_size=2, num_samples=n)
        m = len(seen_bg)
        assert seen_bg == sample_order(None, **kw)[:m].tolist()
        assert seen_fg == sample_order(foreground_weights(labels, 7, "class", 1.0), **kw)[:m].tolist()
        lengths.append((len(loader), torch_len))
        bgs.append(set(seen_bg))
    assert lengths[0] == lengths[1] and lengths[0][0] == lengths[0][1] == (n // 2) // 4 + (not drop_last)
    assert not bgs[0] & bgs[1], "ranks must see disjoint backgrounds"
    assert len(bgs[0]) == len(bgs[1]) == (32 if drop_last else 35)


# --------------------------------------------------------------------------------------------------
# File sources: fixtures in the real formats, and photo-like JPEGs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset,lists", [
    ("folder", []),
    ("imagenet_lt", ["imagenet_lt_train.txt", "imagenet_lt_test.txt"]),
    ("inat2018", ["inat_train.json", "inat_val.json"]),
])
def test_file_sources_match_torch_loader(dataset, lists):
    """JPEG files decoded by DALI vs the torch loader's PIL decode of the same fixtures. Labels and λ are
    equal; pixels agree up to the JPEG decoders and, for the non-square images, the order of resize
    and crop (DALI crops the original, torch squashes to 32x32 first)."""
    extra = []
    if lists:
        extra = [f"--data.train_list={FIXTURES / 'lists' / lists[0]}",
                 f"--data.test_list={FIXTURES / 'lists' / lists[1]}"]
    cfg = load_config("smoke_cpu", [f"--data.dataset={dataset}", f"--data.root={FIXTURES / 'images'}",
                                    "--data.imbalance_ratio=1", "--data.batch_size=4", "--data.eval_batch_size=4",
                                    *extra])
    for split in ("train", "test"):
        kw = dict(split=split, rank=0, world_size=1, device=torch.device("cpu"), seed=5)
        tl = _from_config("torch", cfg.data, cfg.aug, cfg.mix, **kw)
        dl = _from_config("dali", cfg.data, cfg.aug, cfg.mix, **kw)
        assert dl.executor.spec.source == "files" and len(dl) == len(tl) == 2
        assert dl.class_counts.tolist() == ([6, 3, 1] if split == "train" else [2, 2, 2])
        for bt, bd in zip(tl, dl):
            assert torch.equal(bd.y_f, bt.y_f) and torch.equal(bd.y_b, bt.y_b) and torch.equal(bd.lam, bt.lam)
            err = (bd.images - bt.images).abs() * 255 * min(STD)  # grey levels
            assert err.mean() < 1.0 and err.max() < 16


@pytest.mark.parametrize("kind", ["folder", "imagenet_lt", "inat2018"])
def test_photos_through_each_source(photos_dir, tmp_path, kind):
    """Photo-like JPEGs of every size (68 to 2400 px) and encoding (conftest's photos_dir) through the three file
    sources at 64 px, RandomResizedCrop."""
    photos = sorted(photos_dir.glob("*.JPEG"))[:8]
    labels = [0, 0, 0, 0, 1, 1, 2, 2]
    args = ["--data.image_size=64", "--data.batch_size=4", "--data.eval_batch_size=3", "--aug.crop=resized",
            "--data.imbalance_ratio=1"]
    if kind == "folder":
        for split in ("train", "test"):
            for p, y in zip(photos, labels):
                (tmp_path / split / f"c{y}").mkdir(parents=True, exist_ok=True)
                (tmp_path / split / f"c{y}" / p.name).symlink_to(p)
        args += ["--data.dataset=folder", f"--data.root={tmp_path}"]
    elif kind == "imagenet_lt":
        (tmp_path / "list.txt").write_text("".join(f"{p.name} {y}\n" for p, y in zip(photos, labels)))
        args += ["--data.dataset=imagenet_lt", f"--data.root={photos_dir}",
                 f"--data.train_list={tmp_path / 'list.txt'}",
                 f"--data.test_list={tmp_path / 'list.txt'}"]
    else:
        doc = {"images": [{"id": 10 + i, "file_name": p.name, "width": 0, "height": 0} for i, p in enumerate(photos)],
               "annotations": [{"id": 10 + i, "image_id": 10 + i, "category_id": 700 + y}
                               for i, y in enumerate(labels)],
               "categories": [{"id": str(700 + y), "name": f"c{y}"} for y in (2, 1, 0)]}
        (tmp_path / "val.json").write_text(json.dumps(doc))
        args += ["--data.dataset=inat2018", f"--data.root={photos_dir}", f"--data.train_list={tmp_path / 'val.json'}",
                 f"--data.test_list={tmp_path / 'val.json'}"]
    cfg = load_config("smoke_cpu", args)
    kw = dict(rank=0, world_size=1, device=torch.device("cpu"), seed=0)
    train = _from_config("dali", cfg.data, cfg.aug, cfg.mix, split="train", **kw)
    assert train.class_counts.tolist() == [4, 2, 2] and len(train) == 2
    for batch in train:
        assert batch.images.shape == (8, 3, 64, 64) and torch.isfinite(batch.images).all()
        assert set(batch.y_b.tolist()) <= {0, 1, 2}
        assert batch.images.std() > 0.1  # real content, not a blank canvas
    test = _from_config("dali", cfg.data, cfg.aug, cfg.mix, split="test", **kw)
    got = [b.y_f.tolist() for b in test]
    assert got == [labels[:3], labels[3:6], labels[6:]]


def test_missing_image_root_names_the_file(tmp_path):
    ds = ImageFiles([str(tmp_path / "nope.jpg")], np.array([0]), ["a"])
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        _loader(ds, batch_size=1)


# --------------------------------------------------------------------------------------------------
# GPU variants (device_id=0); skipped without CUDA
# --------------------------------------------------------------------------------------------------


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("crop", ["pad", "resized"])
@pytest.mark.parametrize("aug_order", ["before_mix", "after_mix"])
@pytest.mark.parametrize("mix_op", ["resize", "crop"])
def test_gpu_graph_matches_reference_fixed_params(crop, aug_order, mix_op):
    size, n = 32, 6
    images = np.concatenate([_noise(n, size, 1), _noise(n, size, 2)])
    plan = _fixed_plan(n, size, aug_order, crop, mix_op)
    views = _run(images, plan, AugConfig(crop=crop), device_id=0)
    _assert_matches_reference(views, _reference(images, plan), plan, size)


@gpu
@pytest.mark.gpu
def test_gpu_graph_matches_reference_drawn_params_224():
    size, n = 224, 32
    aug, mix = AugConfig(crop="resized"), MixConfig(mix_prob=0.8, mix_per="sample")
    images = _noise(64, size, 3)
    plan = _drawn_plan(0, n, size, aug, mix, 64)
    views = _run(images, plan, aug, device_id=0)
    _assert_matches_reference(views, _reference(images, plan), plan, size)


@gpu
@pytest.mark.gpu
def test_gpu_loader_matches_torch_loader():
    cfg = _demo_cfg("--aug.crop=resized", "--mix.mix_prob=0.5")
    kw = dict(split="train", rank=0, world_size=1, device=torch.device("cuda"), seed=7)
    tl = _from_config("torch", cfg.data, cfg.aug, cfg.mix, **kw)
    dl = _from_config("dali", cfg.data, cfg.aug, cfg.mix, **kw)
    for epoch in (0, 1):
        tl.set_epoch(epoch)
        dl.set_epoch(epoch)
        for bt, bd in zip(tl, dl):
            assert bd.images.device.type == "cuda" and bd.y_f.device.type == "cuda"
            assert torch.equal(bd.y_f, bt.y_f) and torch.equal(bd.lam, bt.lam)
            assert (bd.images - bt.images).abs().max() <= _grey(TOL_INSIDE)


@gpu
@pytest.mark.gpu
def test_gpu_each_autoaugment_op_matches_reference():
    """The op test on the GPU graph (Equalize as the one-hot histogram, the constants on the device)."""
    images, plan, views, ties = _forced_case(32, device_id=0)
    err = _row_max_errors(views, _op_reference(images, plan), ties)
    op = np.repeat(np.arange(len(AA.OPS)), 3)
    for k, name in enumerate(AA.OPS):
        assert err[:, op == k].max() <= TOL_OUTSIDE, f"{name}: {err[:, op == k].max():.3g} grey levels"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("policy,crop", [("autoaugment", "pad"), ("cmo_randaug", "resized")])
def test_gpu_policy_plans_match_reference(policy, crop):
    size, n = 32, 48
    aug, mix = AugConfig(policy=policy, crop=crop), MixConfig(mix_prob=0.7, mix_per="sample")
    images = _range_images(100, size, seed=size, degenerate=False)
    plan = _drawn_plan(size, n, size, aug, mix, 100)
    views = _run(images, plan, aug, device_id=0)
    bad, _ = _policy_row_failures(views, _reference(images, plan), plan, size, crop,
                                  mix.aug_order)
    assert not bad


@gpu
@pytest.mark.gpu
def test_gpu_photos_mixed_decode(photos_dir):
    photos = sorted(photos_dir.glob("*.JPEG"))[:16]
    ds = ImageFiles([str(p) for p in photos], np.arange(16) % 4, ["a", "b", "c", "d"])
    loader = _loader(ds, batch_size=8, aug=AugConfig(crop="resized"), image_size=224, device="cuda")
    for batch in loader:
        assert batch.images.shape == (16, 3, 224, 224) and batch.images.is_cuda and torch.isfinite(batch.images).all()


# --------------------------------------------------------------------------------------------------
# End to end: the CLI and the benchmark, tiny, on the CPU
# --------------------------------------------------------------------------------------------------


def test_bench_loader_tiny_cpu(photos_dir, tmp_path):
    from mixtail.benchmarks import bench_loader

    out = tmp_path / "results"
    rows = bench_loader.main(["--backend", "dali", "torch", "--device", "cpu", "--photos", str(photos_dir),
                              "--num-photos", "16", "--size", "64", "--batch-size", "8", "--warmup", "1",
                              "--windows", "2", "--window-batches", "2", "--threads", "2", "--out", str(out)])
    assert [r["backend"] for r in rows] == ["dali", "torch"]
    assert all(r["pairs_per_s"] > 0 for r in rows)
    files = list(out.glob("loader_*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    assert {r["backend"] for r in doc["rows"]} == {"dali", "torch"} and "environment" in doc


def _train_cli(tmp_path, *overrides) -> dict:
    """`mixtail train` on the smoke config with the DALI backend on the CPU; the final evaluation."""
    cmd = [sys.executable, "-m", "mixtail", "train", "configs/smoke_cpu.yaml", "--data.backend=dali",
           f"--train.out_dir={tmp_path / 'run'}", "--data.num_threads=2", *overrides]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads((tmp_path / "run" / "final_eval.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["autoaugment", "cmo_randaug"])
def test_mixtail_train_demo_with_dali_backend_and_policy(tmp_path, policy):
    """`mixtail train` on the demo data with an aug.policy and mixing from epoch 0 (about 15 s)."""
    final = _train_cli(tmp_path, f"--aug.policy={policy}", "--mix.start_epoch=0")
    assert 0.0 <= final["all"] <= 100.0


@pytest.mark.slow
def test_mixtail_train_cifar_like_lt_with_dali_backend(tmp_path):
    """`mixtail train` on a long-tailed CIFAR-style JPEG tree (image folder, generated: 40 train and 10 test
    images per class, the smoke config's ρ=20) with the DALI backend on the CPU."""
    root = write_cifar_like_tree(tmp_path / "cifar_like", CIFAR10_CLASSES, 40, 10)
    final = _train_cli(tmp_path, "--data.dataset=folder", f"--data.root={root}")
    assert 0.0 <= final["all"] <= 100.0


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_224_test_protocol_on_photos(photos_dir, tmp_path, backend):
    """Test images are resized on the shorter side to 256 and centre-cropped to 224
    (docs/method.md, "The test-time view"), never squashed: each backend against PIL doing exactly that, on
    photo-like JPEGs from 97 to 2400 px and aspect ratios from 1:2.4 to 3.4:1 (the first six of conftest's
    photos_dir, one of them grayscale). The squashed image is far from both, so the check can tell them apart."""
    from PIL import Image

    for k, photo in enumerate(sorted(photos_dir.glob("*.JPEG"))[:6]):
        (tmp_path / "test" / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "test" / f"c{k % 2}" / f"{k}.jpg").symlink_to(photo)
    (tmp_path / "train").symlink_to(tmp_path / "test")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    cfg = load_config("smoke_cpu", ["--data.dataset=folder", f"--data.root={tmp_path}", "--data.image_size=224",
                                    "--data.eval_batch_size=6", f"--data.backend={backend}", "--data.num_threads=2"])
    loader = build_loader(cfg.data, cfg.aug, cfg.mix, split="test", rank=0, world_size=1, device=torch.device("cpu"),
                          seed=0)
    batch = next(iter(loader))
    got = (batch.images.permute(0, 2, 3, 1).numpy() * np.array(std) + np.array(mean)) * 255  # (6, 224, 224, 3)
    files = [loader_file for loader_file in sorted((tmp_path / "test").glob("*/*.jpg"))]
    for i, idx in enumerate(batch.plan["index"]):
        with Image.open(files[idx]) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = 256 / min(w, h)
            resized = im.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
            left, top = (resized.width - 224) // 2, (resized.height - 224) // 2
            protocol = np.asarray(resized.crop((left, top, left + 224, top + 224)), dtype=np.float64)
            squashed = np.asarray(im.resize((224, 224), Image.BILINEAR), dtype=np.float64)
        err = np.abs(got[i] - protocol).mean()
        # Two resamplers (and, for DALI, its own JPEG decoder) differ by a few grey levels on average; a
        # squashed or shifted crop differs by tens.
        assert err < 6.0, (files[idx].name, err)
        if abs(np.log(w / h)) > 0.3:
            assert np.abs(got[i] - squashed).mean() > 2 * err + 5, files[idx].name


def test_decode_error_during_training_names_the_files_and_does_not_hang(tmp_path):
    """A file that turns bad after the run checked it (here: overwritten with text) fails the batch with a
    one-line DataError naming the batch's files, within seconds, and the loader can be closed."""
    import shutil
    import time

    from mixtail.errors import DataError

    root = tmp_path / "tree"
    shutil.copytree(FIXTURES / "images", root)
    cfg = load_config("smoke_cpu", ["--data.dataset=folder", f"--data.root={root}", "--data.imbalance_ratio=1",
                                    "--data.batch_size=4", "--data.backend=dali", "--data.num_threads=1",
                                    "--mix.start_epoch=0", "--mix.mix_prob=1.0"])
    loader = build_loader(cfg.data, cfg.aug, cfg.mix, split="train", rank=0, world_size=1,
                          device=torch.device("cpu"), seed=0, num_epochs=10)
    for f in sorted(root.glob("train/*/*.jpg")):
        f.write_text("not a jpeg any more")
    t0 = time.perf_counter()
    loader.set_epoch(0)
    with pytest.raises(DataError, match=r"DALI failed on epoch 0, batch 0, whose images are .*tree/train/class_"):
        list(loader)
    assert time.perf_counter() - t0 < 60
    loader.close()
