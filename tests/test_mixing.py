"""Tests of pipelines/ops/mixing.py: resize-and-paste (and the CutMix-style crop) against a numpy rebuild,
the λ / box sampler, and the two-view composition for every aug_order.

    python -m pytest tests/test_mixing.py -q
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from helpers import numpy_reference as ref
from mixtail.pipelines.ops.augment import identity_aug_params, sample_aug_params
from mixtail.pipelines.config import AugConfig
from mixtail.pipelines.ops.augment import box_mask
from mixtail.pipelines.ops.mixing import paste, render_views, sample_mix_params
from mixtail.pipelines.plan import pack_train_plan, plan_layout
from helpers.configs import mixing_from_the_start as MixConfig  # every batch mixed, from epoch 0





tol = ref.grid_tolerance  # the float32 sampling grid's error on [0, 1] pixels


def random_floats(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((n, 3, size, size), dtype=np.float32))


def random_uint8(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8))


def inside_mask(box: np.ndarray, size: int) -> np.ndarray:
    """(n, 1, H, W) bool written with slices, independent of mixing.box_mask."""
    m = np.zeros((len(box), 1, size, size), bool)
    for k, (top, left, bh, bw) in enumerate(box):
        m[k, :, top:top + bh, left:left + bw] = True
    return m


# --------------------------------------------------------------------------------------------------
# paste
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 31, 17, 224])
@pytest.mark.parametrize("ratio_range", [(0.2, 0.8), (0.0, 1.0)])
def test_paste_resize_matches_numpy(size, ratio_range):
    n = 24 if size < 100 else 4
    fg, bg = random_floats(n, size, 1), random_floats(n, size, 2)
    mp = sample_mix_params(np.random.default_rng(size), n, size, size,
                           MixConfig(ratio_range=ratio_range), mixed=True)
    box = mp.box.copy()
    box[0] = [0, 0, size, size]  # a full box
    box[1] = [size - size // 3, 0, size // 3, size // 3]  # bottom-left corner
    box[2] = [3, 4, 0, 0]  # an empty box
    box[3] = [1, size - 1, 1, 1]  # a single pixel
    out = paste(fg, bg, torch.from_numpy(box), "resize")
    assert out.dtype == torch.float32 and out.shape == bg.shape
    inside = torch.from_numpy(inside_mask(box, size)).expand_as(bg)
    # Outside the box: the background, bit for bit.
    assert torch.equal(out[~inside], bg[~inside])
    # Inside: the whole foreground resized (bilinear, align_corners=False) to the box.
    expected = ref.paste(fg.numpy(), bg.numpy(), box, "resize")
    np.testing.assert_allclose(out.numpy(), expected, atol=tol(size), rtol=0)
    # ... and the numpy rebuild agrees with PyTorch's interpolate, per sample.
    for k, (top, left, bh, bw) in enumerate(box):
        if bh and bw:
            r = F.interpolate(fg[k:k + 1].double(), size=(int(bh), int(bw)), mode="bilinear", align_corners=False)
            np.testing.assert_allclose(out[k, :, top:top + bh, left:left + bw].numpy(), r[0].numpy(),
                                       atol=tol(size), rtol=0)
    # The full box is the foreground itself.
    np.testing.assert_allclose(out[0].numpy(), fg[0].numpy(), atol=tol(size), rtol=0)
    assert torch.equal(out[2], bg[2])


@pytest.mark.parametrize("size", [32, 31, 17])
def test_paste_crop_copies_foreground_pixels(size):
    n = 16
    fg, bg = random_floats(n, size, 3), random_floats(n, size, 4)
    mp = sample_mix_params(np.random.default_rng(0), n, size, size, MixConfig(), mixed=True)
    out = paste(fg, bg, torch.from_numpy(mp.box), "crop")
    inside = torch.from_numpy(inside_mask(mp.box, size)).expand_as(bg)
    assert inside.any() and (~inside).any()
    assert torch.equal(out[inside], fg[inside])
    assert torch.equal(out[~inside], bg[~inside])


def test_box_mask_and_bad_op():
    box = np.array([[0, 0, 3, 2], [5, 6, 2, 2], [1, 1, 0, 4]])
    m = box_mask(torch.from_numpy(box), 8, 8)
    assert m.dtype == torch.bool and m.shape == (3, 1, 8, 8)
    assert np.array_equal(m.numpy(), inside_mask(box, 8))
    with pytest.raises(ValueError, match="mix_op"):
        paste(random_floats(1, 8, 0), random_floats(1, 8, 1), torch.from_numpy(box[:1]), "blend")


# --------------------------------------------------------------------------------------------------
# λ and the box
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 31, 17, 224])
@pytest.mark.parametrize("ratio_range", [(0.2, 0.8), (0.0, 1.0), (0.5, 0.5)])
def test_mix_params_lambda_and_box(size, ratio_range):
    n = 5000
    cfg = MixConfig(ratio_range=ratio_range)
    mp = sample_mix_params(np.random.default_rng(1), n, size, size, cfg, mixed=True)
    assert mp.mixed.all() and mp.box.dtype == np.int64 and mp.lam.dtype == np.float32
    top, left, bh, bw = mp.box.T
    # λ is the exact pasted area after rounding.
    assert np.array_equal(mp.lam, (bh * bw / (size * size)).astype(np.float32))
    # Boxes are square on a square canvas and lie fully inside the image.
    assert np.array_equal(bh, bw)
    assert (top >= 0).all() and (left >= 0).all() and (top + bh <= size).all() and (left + bw <= size).all()
    # The side is round-half-up(√λ'·H) with λ' in ratio_range, so it lies between the rounded ends.
    lo, hi = ratio_range
    assert bh.min() >= ref.round_half_up(np.sqrt(lo) * size) and bh.max() <= ref.round_half_up(np.sqrt(hi) * size)
    # λ' = lo + (hi − lo)·Beta(α, α), drawn first from the batch generator (the fixed draw order every
    # backend reproduces): rebuild λ' and the side from the same seed.
    lam_raw = lo + (hi - lo) * np.random.default_rng(1).beta(1.0, 1.0, n)
    assert ((lam_raw >= lo) & (lam_raw <= hi)).all()
    assert np.array_equal(bh, [ref.round_half_up(np.sqrt(v) * size) for v in lam_raw])


def test_box_side_rounds_half_up():
    # √0.390625 = 0.625 exactly; 0.625·20 = 12.5 -> 13 (banker's rounding would give 12); 0.625·4 = 2.5 -> 3.
    for size, side in [(20, 13), (4, 3), (12, 8)]:
        mp = sample_mix_params(np.random.default_rng(0), 50, size, size, MixConfig(ratio_range=(0.390625, 0.390625)),
                               mixed=True)
        assert (mp.box[:, 2] == side).all() and (mp.box[:, 3] == side).all(), size
        assert np.array_equal(mp.lam, np.full(50, side * side / (size * size), np.float32))


def test_box_position_uniform():
    # Side 16 on 32: top and left uniform on 0..16 (every position reachable, the far edge included).
    n = 17 * 400
    mp = sample_mix_params(np.random.default_rng(3), n, 32, 32, MixConfig(ratio_range=(0.25, 0.25)), mixed=True)
    assert (mp.box[:, 2] == 16).all()
    for axis in (0, 1):
        counts = np.bincount(mp.box[:, axis], minlength=17)
        assert len(counts) == 17 and stats.chisquare(counts).pvalue > 1e-6


@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
def test_box_side_distribution_is_normalized_beta(alpha):
    # side = round-half-up(√λ'·H) with λ' = lo + (hi − lo)·u, u ~ Beta(α, α), so side s has probability
    # F((((s + ½)/H)² − lo)/(hi − lo)) − F((((s − ½)/H)² − lo)/(hi − lo)), F the Beta(α, α) cdf.
    lo, hi, size, n = 0.2, 0.8, 32, 20000
    mp = sample_mix_params(np.random.default_rng(5), n, size, size, MixConfig(alpha=alpha, ratio_range=(lo, hi)),
                           mixed=True)
    sides = np.arange(size + 1)

    def probs(a: float) -> np.ndarray:
        u = lambda s: np.clip((((s / size) ** 2) - lo) / (hi - lo), 0, 1)  # noqa: E731
        return stats.beta(a, a).cdf(u(sides + 0.5)) - stats.beta(a, a).cdf(u(np.maximum(sides - 0.5, 0)))

    counts = np.bincount(mp.box[:, 2], minlength=size + 1)
    support = probs(alpha) > 0
    assert counts[~support].sum() == 0 and abs(probs(alpha).sum() - 1) < 1e-12
    assert stats.chisquare(counts[support], n * probs(alpha)[support]).pvalue > 1e-6
    for wrong in {0.5, 1.0, 2.0} - {alpha}:
        assert stats.chisquare(counts[support], n * probs(wrong)[support]).pvalue < 1e-6, wrong


@pytest.mark.parametrize("size", [32, 31, 17])
def test_clipped_boxes_are_cutmix_rand_bbox(size):
    """mix.box=clipped: each box and λ equal CutMix's rand_bbox (ref.cutmix_box) from the same draws (λ' first,
    then the centre row and column), and pasting its own pixels equals the numpy rebuild."""
    n = 3000
    mp = sample_mix_params(np.random.default_rng(2), n, size, size, MixConfig(ratio_range=(0.0, 1.0), box="clipped"),
                           mixed=True)
    rng = np.random.default_rng(2)
    share = rng.beta(1.0, 1.0, n)
    rows, cols = np.floor(rng.random(n) * size).astype(int), np.floor(rng.random(n) * size).astype(int)
    expected = np.array([ref.cutmix_box(u, r, c, size, size) for u, r, c in zip(share, rows, cols)])
    assert np.array_equal(mp.box, expected)
    assert np.array_equal(mp.lam, (expected[:, 2] * expected[:, 3] / size ** 2).astype(np.float32))
    # Boxes reach the border, where they are cut: some are clipped (shorter than their even cut), none leave.
    top, left, bh, bw = mp.box.T
    assert (top >= 0).all() and (top + bh <= size).all() and (left + bw <= size).all()
    assert (top == 0).any() and (top + bh == size).any() and (bh != bw).any()
    fg, bg = random_floats(16, size, 10), random_floats(16, size, 11)
    out = paste(fg, bg, torch.from_numpy(mp.box[:16]), "crop")
    assert np.array_equal(out.numpy(), ref.paste(fg.numpy(), bg.numpy(), mp.box[:16], "crop").astype(np.float32))


def test_clipped_box_gives_the_foreground_a_smaller_mean_share():
    """The reason the key exists: at λ' ~ U(0, 1) the clipped box covers about 0.30 of the image on average
    (CMO's foreground share of the label), the inside box 0.50."""
    n, cfg = 20000, MixConfig(ratio_range=(0.0, 1.0))
    inside = sample_mix_params(np.random.default_rng(4), n, 32, 32, cfg, mixed=True).lam.mean()
    clipped = sample_mix_params(np.random.default_rng(4), n, 32, 32, replace(cfg, box="clipped"), mixed=True).lam.mean()
    assert abs(inside - 0.50) < 0.01 and 0.27 < clipped < 0.33


def test_box_keys_name_themselves():
    from mixtail.errors import ConfigError

    with pytest.raises(ConfigError, match="mix.box"):
        MixConfig(box="outside")
    with pytest.raises(ConfigError, match="mix.box_per"):
        MixConfig(box_per="epoch")


def test_one_box_per_batch_is_shared_by_every_pair_and_rank():
    """mix.box_per=batch: every mixed pair of a global batch has the batch's one λ and box (CutMix's and CMO's
    code draw one per batch), the same on every rank; unmixed pairs keep λ = 1 and no box."""
    from mixtail.pipelines.plan import Planner
    from mixtail.pipelines.sampling import foreground_weights

    labels = np.arange(64) % 4
    mix = MixConfig(box="clipped", box_per="batch", mix_op="crop", ratio_range=(0.0, 1.0))

    def plan(rank, world, batch, mix=mix):
        return Planner.for_training(labels, None, aug=AugConfig(), mix=mix, image_size=32, batch_size=8, num_views=1,
                                    fg_weights=foreground_weights(labels, 4, "instance", 1.0), seed=3, rank=rank,
                                    world_size=world, num_epochs=None).plan(0, batch)

    for b in range(3):
        a, c = plan(0, 2, b), plan(1, 2, b)
        assert (a["box"] == a["box"][0]).all() and np.array_equal(a["box"], c["box"]) and (a["lam"] == c["lam"][0]).all()
    assert len({tuple(plan(0, 1, b)["box"][0]) for b in range(3)}) == 3  # each batch its own box
    per_pair = plan(0, 1, 0, replace(mix, box_per="pair"))
    assert len({tuple(r) for r in per_pair["box"]}) > 1
    half = plan(0, 1, 0, replace(mix, mix_prob=0.5, mix_per="sample"))
    on = half["mixed"] == 1
    assert 0 < on.sum() < 8 and (half["box"][~on] == 0).all() and (half["lam"][~on] == 1).all()
    assert (half["box"][on] == half["box"][on][0]).all()


def test_ratio_range_edges_give_empty_and_full_boxes():
    size, n = 31, 8
    fg, bg = random_floats(n, size, 6), random_floats(n, size, 7)
    empty = sample_mix_params(np.random.default_rng(0), n, size, size, MixConfig(ratio_range=(0.0, 0.0)), True)
    assert empty.mixed.all() and (empty.box[:, 2:] == 0).all() and (empty.lam == 0).all()
    for op in ("resize", "crop"):
        assert torch.equal(paste(fg, bg, torch.from_numpy(empty.box), op), bg)
    full = sample_mix_params(np.random.default_rng(0), n, size, size, MixConfig(ratio_range=(1.0, 1.0)), True)
    assert np.array_equal(full.box, np.tile([0, 0, size, size], (n, 1))) and (full.lam == 1).all()
    assert torch.equal(paste(fg, bg, torch.from_numpy(full.box), "crop"), fg)
    np.testing.assert_allclose(paste(fg, bg, torch.from_numpy(full.box), "resize").numpy(), fg.numpy(),
                               atol=tol(size), rtol=0)


def test_unmixed_pairs_are_the_background():
    size, n = 17, 10
    mixed = np.zeros(n, bool)
    mixed[3] = True
    mp = sample_mix_params(np.random.default_rng(0), n, size, size, MixConfig(), mixed)
    assert np.array_equal(mp.mixed, mixed)
    assert (mp.lam[~mixed] == 1).all() and (mp.box[~mixed] == 0).all() and mp.lam[3] < 1
    fg, bg = random_floats(n, size, 8), random_floats(n, size, 9)
    out = paste(fg, bg, torch.from_numpy(mp.box), "resize")
    assert torch.equal(out[~torch.from_numpy(mixed)], bg[~torch.from_numpy(mixed)])
    assert not torch.equal(out[3], bg[3])


def test_mixing_window():
    cfg = MixConfig(start_epoch=2, unmixed_last_epochs=2)
    assert [cfg.active(e, 7) for e in range(7)] == [False, False, True, True, True, False, False]
    assert not MixConfig(start_epoch=3, unmixed_last_epochs=0).active(3, 3)


# --------------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------------

AUG = AugConfig(crop="pad", color_prob=1.0, grayscale_prob=0.3)


def make_plan(size: int, mp, fg_aug: list, bg_aug: list, aug_order: str = "before_mix", mix_op: str = "resize"):
    """A plan holding exactly these draws (components of image i are images i of fg and bg)."""
    n, views = len(mp.lam), len(bg_aug)
    if aug_order == "after_mix":
        augs = {f"mx{v}": bg_aug[v] for v in range(views)}
    else:
        augs = {**{f"fg{v}": fg_aug[v] for v in range(views)}, **{f"bg{v}": bg_aug[v] for v in range(views)}}
    full = (np.full(n, float(size)), np.full(n, float(size)))
    layout = plan_layout(train=True, aug_order=aug_order, num_views=views, mix_op=mix_op)
    return pack_train_plan(layout, epoch=0, batch=0,
                           fg_index=np.arange(n), bg_index=np.arange(n), labels=np.zeros(n, np.int64), mix=mp,
                           augs=augs, sizes={p: full for p in augs})


def draw(seed: int, n: int, size: int, aug: AugConfig, views: int = 2, crop: bool = True, mixed=True):
    rng = np.random.default_rng(seed)
    mp = sample_mix_params(rng, n, size, size, MixConfig(), mixed)
    fg = [sample_aug_params(rng, n, size, size, aug, crop=crop) for _ in range(views)]
    bg = [sample_aug_params(rng, n, size, size, aug, crop=crop) for _ in range(views)]
    return mp, fg, bg


def views_of(fg, bg, plan, size):
    """The plan's views: how the components combine (aug_order, mix_op, views) is the plan layout's."""
    return render_views(fg, bg, plan.to("cpu"), out_size=size)


@pytest.mark.parametrize("size,aug", [(32, AUG), (31, AUG), (31, AugConfig(crop="resized", grayscale_prob=0.3))])
@pytest.mark.parametrize("mix_op", ["resize", "crop"])
def test_before_mix_views_share_box_and_differ_in_augmentation(size, aug, mix_op):
    n = 8
    fg, bg = random_uint8(n, size, 10), random_uint8(n, size, 11)
    mp, fg_aug, bg_aug = draw(0, n, size, aug)
    views = views_of(fg, bg, make_plan(size, mp, fg_aug, bg_aug, mix_op=mix_op), size)
    assert len(views) == 2 and all(v.shape == (n, 3, size, size) and v.dtype == torch.float32 for v in views)
    inside = inside_mask(mp.box, size)
    for v in range(2):
        # Each component augmented on its own, then pasted with the pair's single box (the paper's Eq. 3).
        expected = ref.paste(ref.augment(fg.numpy(), fg_aug[v], size), ref.augment(bg.numpy(), bg_aug[v], size),
                             mp.box, mix_op)
        np.testing.assert_allclose(views[v].numpy(), expected, atol=tol(size), rtol=0)
    # The two views differ both inside (foreground) and outside (background) the box.
    diff = (views[0] - views[1]).abs().numpy()
    assert diff[np.broadcast_to(inside, diff.shape)].mean() > 0.05
    assert diff[np.broadcast_to(~inside, diff.shape)].mean() > 0.05


def test_aug_order_none_crops_nothing_but_keeps_flip_and_colour():
    size, n = 32, 8
    fg, bg = random_uint8(n, size, 12), random_uint8(n, size, 13)
    mp, fg_aug, bg_aug = draw(0, n, size, AUG, crop=False)
    assert all(np.array_equal(a.crop, np.tile([0, 0, size, size], (n, 1))) for a in fg_aug + bg_aug)
    views = views_of(fg, bg, make_plan(size, mp, fg_aug, bg_aug, "none"), size)
    for v in range(2):
        expected = ref.paste(ref.augment(fg.numpy(), fg_aug[v], size), ref.augment(bg.numpy(), bg_aug[v], size),
                             mp.box, "resize")
        np.testing.assert_allclose(views[v].numpy(), expected, atol=tol(size), rtol=0)
    assert (views[0] - views[1]).abs().mean() > 0.05, "the views still differ by flip and colour"


@pytest.mark.parametrize("size", [32, 31])
def test_after_mix_augments_the_mixed_image(size):
    n = 8
    fg, bg = random_uint8(n, size, 14), random_uint8(n, size, 15)
    mp, _, bg_aug = draw(2, n, size, AUG)
    views = views_of(fg, bg, make_plan(size, mp, [], bg_aug, "after_mix"), size)
    mixed = ref.paste(fg.numpy() / 255.0, bg.numpy() / 255.0, mp.box, "resize")
    for v in range(2):
        np.testing.assert_allclose(views[v].numpy(), ref.augment(mixed, bg_aug[v], size), atol=tol(size), rtol=0)
    assert (views[0] - views[1]).abs().mean() > 0.05


def test_one_view():
    n, size = 16, 32
    mp, fg_aug, bg_aug = draw(7, n, size, AUG, views=1)
    plan = make_plan(size, mp, fg_aug, bg_aug)
    assert plan.layout.num_views == 1
    assert len(views_of(random_uint8(n, size, 0), random_uint8(n, size, 1), plan, size)) == 1


def test_unmixed_views_are_augmented_backgrounds():
    size, n = 32, 6
    fg, bg = random_uint8(n, size, 16), random_uint8(n, size, 17)
    mp, fg_aug, bg_aug = draw(1, n, size, AUG, mixed=False)
    plan = make_plan(size, mp, fg_aug, bg_aug)
    assert not plan.mixed
    views = views_of(None, bg, plan, size)  # no foreground at all: an unmixed batch never reads one
    for v in range(2):
        np.testing.assert_allclose(views[v].numpy(), ref.augment(bg.numpy(), bg_aug[v], size), atol=tol(size), rtol=0)
    # Same parameters for a mixed batch only change the pixels inside the boxes.
    mp_mixed = sample_mix_params(np.random.default_rng(1), n, size, size, MixConfig(), True)
    mixed = views_of(fg, bg, make_plan(size, mp_mixed, fg_aug, bg_aug), size)
    assert not torch.equal(mixed[0], views[0])
    outside = torch.from_numpy(~inside_mask(mp_mixed.box, size)).expand_as(views[0])
    assert torch.equal(mixed[0][outside], views[0][outside])


def test_identity_plan_reproduces_the_images():
    size, n = 31, 4
    bg = random_uint8(n, size, 3)
    ident = [identity_aug_params(n, size, size) for _ in range(2)]
    mp = sample_mix_params(np.random.default_rng(0), n, size, size, MixConfig(), False)
    views = views_of(None, bg, make_plan(size, mp, ident, ident), size)
    torch.testing.assert_close(views[1], bg.float() / 255, atol=tol(size), rtol=0)


@pytest.mark.parametrize("policy", ["autoaugment", "cmo_randaug"])
def test_policy_views_equal_autoaugment_reference(policy):
    """aug.policy's columns: each component rendered from the plan equals autoaugment.augment_view (crop,
    flip, jitter on SimCLR rows, AutoAugment + Cutout on the others) on the same draws, then the paste."""
    from mixtail.pipelines.ops.autoaugment import augment_view, sample_policy_params, without_colour

    size, n = 32, 24
    aug = AugConfig(policy=policy, grayscale_prob=0.3)
    fg, bg = random_uint8(n, size, 20), random_uint8(n, size, 21)
    rng = np.random.default_rng(4)
    mp = sample_mix_params(rng, n, size, size, MixConfig(), True)
    augs, pols = {}, {}
    for p in ("fg0", "bg0", "fg1", "bg1"):
        a = sample_aug_params(rng, n, size, size, aug)
        pols[p] = sample_policy_params(rng, n, size, size, aug)
        augs[p] = without_colour(a, pols[p].autoaugment)
    full = (np.full(n, float(size)), np.full(n, float(size)))
    plan = pack_train_plan(plan_layout(train=True, num_views=2, policy=policy), epoch=0, batch=0,
                           fg_index=np.arange(n), bg_index=np.arange(n), labels=np.zeros(n, np.int64), mix=mp,
                           augs=augs, sizes={p: full for p in augs}, policies=pols, view_size=size)
    views = views_of(fg, bg, plan, size)
    for v in range(2):
        expected = paste(augment_view(fg, augs[f"fg{v}"], pols[f"fg{v}"], size),
                         augment_view(bg, augs[f"bg{v}"], pols[f"bg{v}"], size), torch.from_numpy(mp.box), "resize")
        torch.testing.assert_close(views[v], expected, atol=1e-5, rtol=0)
    chosen = pols["bg0"].autoaugment
    assert chosen.all() if policy == "autoaugment" else 0 < chosen.sum() < n
    assert (plan["bg0.cutout"][chosen, 2:] > 0).all() and (plan["bg0.cutout"][~chosen, 2:] == 0).all()


@pytest.mark.parametrize("mix_op,aug_order", [("crop", "before_mix"), ("resize", "after_mix"), ("crop", "after_mix"),
                                              ("resize", "before_mix")])
def test_render_plan_combines_the_components_as_the_plan_was_drawn(mix_op, aug_order):
    """The public render_plan takes no mixing arguments: a CutMix or after_mix plan is rendered as it was
    drawn, against the numpy rebuild, whoever renders it (a renderer with its own defaults would paste a crop
    plan as ResizeMix, and silently)."""
    from mixtail.pipelines.ops.mixing import render_plan

    size, n = 31, 6
    images = random_uint8(2 * n, size, 30)  # foreground i is image n + i, background i is image i
    rng = np.random.default_rng(5)
    mp = sample_mix_params(rng, n, size, size, MixConfig(), True)
    parts = [f"mx{v}" for v in range(2)] if aug_order == "after_mix" else ["fg0", "bg0", "fg1", "bg1"]
    augs = {p: sample_aug_params(rng, n, size, size, AUG) for p in parts}
    full = (np.full(n, float(size)), np.full(n, float(size)))
    layout = plan_layout(train=True, aug_order=aug_order, num_views=2, mix_op=mix_op)
    plan = pack_train_plan(layout, epoch=0, batch=0, fg_index=n + np.arange(n), bg_index=np.arange(n),
                           labels=np.zeros(2 * n, np.int64), mix=mp, augs=augs, sizes={p: full for p in augs})
    views = render_plan(plan, images, out_size=size)
    fg, bg = images[n:].numpy(), images[:n].numpy()
    for v in range(2):
        if aug_order == "after_mix":
            expected = ref.augment(ref.paste(fg / 255.0, bg / 255.0, mp.box, mix_op), augs[f"mx{v}"], size)
        else:
            expected = ref.paste(ref.augment(fg, augs[f"fg{v}"], size), ref.augment(bg, augs[f"bg{v}"], size),
                                 mp.box, mix_op)
        np.testing.assert_allclose(views[v].numpy(), expected, atol=tol(size), rtol=0)


def test_a_plan_layout_refuses_unknown_mixing_choices():
    with pytest.raises(ValueError, match="mix_op must be one of resize, crop, got 'cutmix'"):
        plan_layout(train=True, mix_op="cutmix")
    with pytest.raises(ValueError, match="aug_order must be one of before_mix, after_mix, none, got 'later'"):
        plan_layout(train=True, aug_order="later")
