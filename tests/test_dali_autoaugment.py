"""AutoAugment and Cutout in the DALI graph (aug.policy autoaugment, cmo_randaug;
pipelines/backends/dali_autoaugment.py) against the torch reference (pipelines/ops/autoaugment.py), on the CPU
(device_id=None), and on the GPU where CUDA is present (marked gpu).

What is checked: every op forced alone at three magnitudes, both signs, either slot, at 32 and 31 px, with
proof that a wrong sign, bin, skipped slot, swapped order or skipped Cutout fails; the drawn plans of both
policies (pad and resized crops, after_mix), with the rows that hang on a rounding tie held to a mean bound
(dali_autoaugment.py's docstring says where the two can differ, and why).

    python -m pytest tests/test_dali_autoaugment.py -q
"""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed (pip install 'mixtail[dali]')")

from helpers.configs import mixing_from_the_start as MixConfig  # noqa: E402 - every batch mixed, from epoch 0
from helpers.dali_parity import (GEOMETRIC, MEAN, STD, TOL_OUTSIDE, drawn_plan, grey_err,  # noqa: E402
                                 policy_row_failures, reference, run_graph, sensitive_rows, warp_ties)
from mixtail.pipelines.backends import dali_autoaugment  # noqa: E402
from mixtail.pipelines.batch import normalize_views  # noqa: E402
from mixtail.pipelines.config import AugConfig  # noqa: E402
from mixtail.pipelines.ops import autoaugment as AA  # noqa: E402
from mixtail.pipelines.ops.augment import box_mask, identity_aug_params  # noqa: E402
from mixtail.pipelines.ops.mixing import MixParams  # noqa: E402
from mixtail.pipelines.plan import pack_train_plan, plan_layout  # noqa: E402

pytestmark = pytest.mark.dali

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (the GPU variant of a CPU test)")


# --------------------------------------------------------------------------------------------------
# AutoAugment and Cutout in the graph (aug.policy autoaugment, cmo_randaug) against the torch reference
# --------------------------------------------------------------------------------------------------

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
        views = run_graph(images, plan, AugConfig(policy="autoaugment"), device_id=device_id)
    finally:
        dali_autoaugment.EQUALIZE_ON_HOST = saved
    affine = [plan["bg0.aa_affine"].reshape(n, 2, 2, 3)[:, 0], plan["bg1.aa_affine"].reshape(n, 2, 2, 3)[:, 1]]
    ties = [warp_ties(a, size) for a in affine]
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
        err = np.where(t[..., None], 0.0, grey_err(d, r))
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
    geometric = np.isin(op, GEOMETRIC)
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
    reference within TOL_INSIDE; tie-sensitive rows (helpers/dali_parity.tie_sensitive) within TIE_ROW_MEAN on
    average. The same outputs fail against the plan with its signed magnitudes negated."""
    n = 48
    aug, mix = AugConfig(policy=policy, crop=crop), MixConfig(mix_prob=0.7, mix_per="sample", aug_order=aug_order)
    # No constant channels here: render_views' identity resampling at 31 px adds float-ulp noise to them,
    # which the reference's AutoContrast stretches to 0..255 (see _op_reference).
    images = _range_images(100, size, seed=size, degenerate=False)
    plan = drawn_plan(size, n, size, aug, mix, 100)
    assert 0 < plan["mixed"].sum() < n
    views = run_graph(images, plan, aug)
    ref = reference(images, plan)
    bad, exact = policy_row_failures(views, ref, plan, size, crop, aug_order)
    assert not bad, f"(view, row) pairs off the reference: {bad}"
    assert exact >= (2 * n) // 2 if crop == "pad" else exact > 0  # most rows are held to the exact rule
    comps = [p for p in plan.layout.offsets if p.endswith(".aa_op")]
    wrong = plan
    for p in (c[:-len(".aa_op")] for c in comps):
        o, m = wrong[f"{p}.aa_op"], wrong[f"{p}.aa_mag"]
        enhance = np.isin(o, [AA.OP_ID[k] for k in AA.ENHANCE])
        wrong = _with_policy(wrong, size, p, mag=np.where(enhance, 2.0 - m, -m))
    bad_wrong, _ = policy_row_failures(views, reference(images, wrong), plan, size,
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
            geometric = np.isin(o, GEOMETRIC)
            moved |= used & ((enhance & (m != 1.0)) | (geometric & (m != 0.0))).any(axis=1)
        # Rows held to the exact rule: a tie-sensitive row whose change is mostly hidden under the pasted box
        # may stay within TIE_ROW_MEAN.
        moved &= ~sensitive_rows(plan, v, size, crop, aug_order)
        changed |= {(v, int(i)) for i in np.flatnonzero(moved)}
    assert changed and changed <= set(bad_wrong)


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
    plan = drawn_plan(size, n, size, aug, mix, 100)
    views = run_graph(images, plan, aug, device_id=0)
    bad, _ = policy_row_failures(views, reference(images, plan), plan, size, crop,
                                  mix.aug_order)
    assert not bad
