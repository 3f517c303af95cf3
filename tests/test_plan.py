"""Tests of pipelines/plan.py and pipelines/loader.py: the batch-plan table, the planner's draws (purity,
ranks, the mixing schedule, crop windows on each image's own size, the test protocol) and the one loader
(prefetch stream, restarts, errors from the side thread).

    python -m pytest tests/test_plan.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixtail.pipelines.config import AugConfig, MixConfig
from mixtail.pipelines.loader import Loader, PlanStream
from mixtail.pipelines.plan import Column, Planner, PlanLayout, centre_crop_windows, plan_layout
from mixtail.pipelines.sampling import foreground_weights, sample_order

LABELS = np.repeat(np.arange(4), [40, 20, 10, 5])


def planner(*, rank=0, world_size=1, mix=None, aug=None, sizes=None, seed=0, num_epochs=None, batch_size=8,
            labels=LABELS, image_size=32):
    return Planner.for_training(labels, sizes, aug=aug or AugConfig(), mix=mix or MixConfig(mix_prob=1.0, start_epoch=0),
                                image_size=image_size, batch_size=batch_size, num_views=2,
                                fg_weights=foreground_weights(labels, 4, "instance", 1.0), seed=seed, rank=rank,
                                world_size=world_size, num_epochs=num_epochs)


# --------------------------------------------------------------------------------------------------
# The layout
# --------------------------------------------------------------------------------------------------


def test_layout_reads_and_writes_typed_columns():
    layout = PlanLayout((Column("i", 1, np.dtype(np.int32)), Column("f", 3, np.dtype(np.float32)),
                         Column("j", 2, np.dtype(np.int32))))
    assert layout.width == 6
    t = layout.empty(5)
    big = np.array([0, 1, -7, 2**31 - 1, 123456789])  # int32 cells are bit views: exact beyond float32's 2^24
    layout.write(t, "i", big)
    layout.write(t, "f", np.arange(15).reshape(5, 3) / 7)
    layout.write(t, "j", np.arange(10).reshape(5, 2))
    assert layout.read(t, "i").dtype == np.int32 and np.array_equal(layout.read(t, "i"), big)
    np.testing.assert_array_equal(layout.read(t, "f"), (np.arange(15).reshape(5, 3) / 7).astype(np.float32))
    assert layout.read(t, "j").shape == (5, 2)
    tt = torch.from_numpy(t)  # the same views on a torch copy of the table (the device path)
    assert layout.read(tt, "i").dtype == torch.int32 and layout.read(tt, "i").tolist() == big.tolist()
    with pytest.raises(KeyError, match="no column 'nope'"):
        layout.read(t, "nope")
    with pytest.raises(ValueError, match="twice"):
        PlanLayout((Column("a", 1, np.dtype(np.int32)), Column("a", 2, np.dtype(np.float32))))


def test_layouts_per_aug_order():
    names = lambda layout: [c.name for c in layout.columns]  # noqa: E731
    before = names(plan_layout(train=True, aug_order="before_mix", num_views=2))
    assert [n for n in before if n.endswith(".crop")] == ["fg0.crop", "bg0.crop", "fg1.crop", "bg1.crop"]
    after = names(plan_layout(train=True, aug_order="after_mix", num_views=2, colour=False))
    assert [n for n in after if "." in n] == ["mx0.crop", "mx0.flip", "mx1.crop", "mx1.flip"]
    assert names(plan_layout(train=False)) == ["index", "y", "crop"]


# --------------------------------------------------------------------------------------------------
# The planner
# --------------------------------------------------------------------------------------------------


def test_plans_are_pure_functions_of_seed_epoch_rank_batch():
    a, b = planner(), planner()
    assert np.array_equal(a.plan(3, 2).table, b.plan(3, 2).table)
    a.plan(5, 0)  # visiting another epoch in between changes nothing
    assert np.array_equal(a.plan(3, 2).table, b.plan(3, 2).table)
    assert not np.array_equal(a.plan(3, 2).table, a.plan(4, 2).table)
    assert not np.array_equal(a.plan(3, 2).table, planner(seed=1).plan(3, 2).table)
    assert not np.array_equal(a.plan(3, 2).table, a.plan(3, 3).table)


def test_index_columns_are_the_sample_order_streams():
    p = planner(rank=1, world_size=2, seed=3, batch_size=4)
    kw = dict(epoch=2, seed=3, rank=1, world_size=2, num_samples=len(LABELS))
    bg = sample_order(None, **kw)
    fg = sample_order(foreground_weights(LABELS, 4, "instance", 1.0), **kw)
    for b in range(len(p)):
        plan = p.plan(2, b)
        assert np.array_equal(plan["bg_index"], bg[4 * b:4 * b + 4])
        assert np.array_equal(plan["fg_index"], fg[4 * b:4 * b + 4])
        assert np.array_equal(plan["y_b"], LABELS[bg[4 * b:4 * b + 4]])
        assert np.array_equal(plan["y_f"], LABELS[fg[4 * b:4 * b + 4]])


@pytest.mark.parametrize("mix", [MixConfig(mix_prob=0.5), MixConfig(mix_prob=0.4, mix_per="sample"),
                                 MixConfig(mix_prob=0.0)], ids=["batch", "sample", "never"])
def test_indices_are_the_plans_index_columns(mix):
    """Planner.indices (the FFCV executor's traversal order) skips the plan's other draws; it must still give
    exactly the plan's indices, and a foreground only when the plan mixes."""
    p = planner(rank=1, world_size=2, seed=3, batch_size=4, mix=mix, num_epochs=10)
    mixed = 0
    for e in range(10):
        for b in range(len(p)):
            bg, fg = p.indices(e, b)
            plan = p.plan(e, b)
            assert np.array_equal(bg, plan["bg_index"]) and (fg is None) == (not plan.mixed)
            if fg is not None:
                assert np.array_equal(fg, plan["fg_index"])
                mixed += 1
    assert (mixed > 0) == (mix.mix_prob > 0)
    with pytest.raises(IndexError, match="outside"):
        p.indices(0, len(p))


def test_batch_level_mixing_is_shared_by_every_rank():
    mix = MixConfig(mix_prob=0.5)
    ranks = [planner(rank=r, world_size=3, mix=mix, batch_size=4) for r in range(3)]
    decisions = [[r.plan(e, b).mixed for e in range(4, 10) for b in range(len(r))] for r in ranks]
    assert decisions[0] == decisions[1] == decisions[2]
    assert 0 < sum(decisions[0]) < len(decisions[0])


def test_mixing_window_and_unmixed_batches():
    p = planner(mix=MixConfig(mix_prob=1.0), num_epochs=12)  # window [4, 9)
    for e in range(12):
        plan = p.plan(e, 0)
        assert plan.mixed == (4 <= e < 9), e
        if not plan.mixed:
            assert (plan["lam"] == 1).all() and (plan["box"] == 0).all()
            assert np.array_equal(plan["fg_index"], plan["bg_index"]) and np.array_equal(plan["y_f"], plan["y_b"])


def test_resized_crop_windows_follow_each_images_own_aspect():
    """RandomResizedCrop drawn on the photo's true size: the window's aspect ratio and area are within the
    ranges on the photo itself. The same windows read on a squashed square copy would not be."""
    sizes = np.tile([[100.0, 400.0], [375.0, 500.0], [2400.0, 68.0]], (25, 1))[:len(LABELS)]
    aug = AugConfig(crop="resized", scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    p = planner(aug=aug, sizes=sizes, batch_size=25, image_size=224)
    aspects, squashed = [], []
    for b in range(len(p)):
        plan = p.plan(0, b)
        for comp, col in (("fg", "fg_index"), ("bg", "bg_index")):
            h_img, w_img = sizes[plan[col]].T
            for v in (0, 1):
                top, left, h, w = plan[f"{comp}{v}.crop"].astype(np.float64).T
                assert (top >= 0).all() and (left >= 0).all()
                assert (top + h <= 1 + 1e-6).all() and (left + w <= 1 + 1e-6).all()
                area = h * w  # fraction of the photo; a 2400×68 photo can only get torchvision's fallback,
                tall = h_img > 20 * w_img  # the largest centred window within the ratio range (91×68 px)
                assert ((area >= 0.08 - 1e-3) & (area <= 1 + 1e-6))[~tall].all()
                np.testing.assert_allclose((h * h_img)[tall], 91, rtol=1e-5)
                np.testing.assert_allclose((w * w_img)[tall], 68, rtol=1e-5)
                aspects.append(w * w_img / (h * h_img))
                squashed.append(w / h)
    aspects, squashed = np.concatenate(aspects), np.concatenate(squashed)
    # Whole-pixel rounding of windows >= 49 px moves the ratio by at most about 2%.
    assert (aspects >= 0.75 / 1.03).all() and (aspects <= 4 / 3 * 1.03).all()
    assert ((squashed < 0.7) | (squashed > 1.4)).mean() > 0.5


def test_pad_crop_shifts_by_whole_output_pixels():
    p = planner(aug=AugConfig(crop="pad", pad_px=4), image_size=32)
    crop = p.plan(0, 0)["bg0.crop"]
    assert np.allclose(crop[:, 2:], 1.0)
    offsets = crop[:, :2] * 32
    assert np.allclose(offsets, np.round(offsets)) and np.abs(offsets).max() <= 4


def test_test_windows_resize_shorter_side_and_centre_crop():
    h, w = np.array([375.0, 500.0, 224.0, 68.0]), np.array([500.0, 375.0, 224.0, 2400.0])
    win = centre_crop_windows(h, w, 8 / 7)
    # 500×375 (w×h): shorter side 375 resized to 256, centre 224 -> a 328.125 px square of the original.
    np.testing.assert_allclose(win[0], [(1 - 0.875) / 2, (1 - 328.125 / 500) / 2, 0.875, 328.125 / 500])
    np.testing.assert_allclose(win[1], [(1 - 328.125 / 500) / 2, (1 - 0.875) / 2, 328.125 / 500, 0.875])
    side = np.minimum(h, w) * 7 / 8
    np.testing.assert_allclose(win[:, 2] * h, side)
    np.testing.assert_allclose(win[:, 3] * w, side)  # square on the photo: never squashed
    np.testing.assert_allclose(centre_crop_windows(np.array([32.0]), np.array([32.0]), 1.0), [[0, 0, 1, 1]])
    t = Planner.for_testing(LABELS[:4], np.stack([h, w], 1), image_size=224, batch_size=4, rank=0, world_size=1,
                            test_resize_ratio=8 / 7)
    np.testing.assert_allclose(t.plan(0, 0)["crop"], win.astype(np.float32))


# --------------------------------------------------------------------------------------------------
# The loader and its stream
# --------------------------------------------------------------------------------------------------


class _Recorder:
    """An executor that hands out the plans it is given."""

    device = None

    def __init__(self):
        self.resets = 0

    def batches(self, stream, count):
        for _ in range(count):
            yield next(stream)

    def reset(self):
        self.resets += 1

    def close(self):
        pass


def test_stream_runs_across_epochs_and_restarts_only_on_a_jump():
    p = planner(batch_size=16)
    ex = _Recorder()
    loader = Loader(p, ex, classes=list("abcd"), class_counts=np.bincount(LABELS))
    assert len(loader) == len(LABELS) // 16 == 4
    seen = []
    for e in range(3):
        loader.set_epoch(e)
        seen += [(x.epoch, x.batch) for x in loader]
    assert seen == [(e, b) for e in range(3) for b in range(4)]
    assert ex.resets == 1, "consecutive epochs continue one stream"
    loader.set_epoch(7, 2)
    assert [(x.epoch, x.batch) for x in loader] == [(7, 2), (7, 3)]
    assert ex.resets == 2
    loader.set_epoch(8)
    it = iter(loader)
    next(it)  # abandon epoch 8 after one batch
    loader.set_epoch(9)
    assert [x.batch for x in loader] == [0, 1, 2, 3] and ex.resets == 3


def test_stream_reraises_planner_errors():
    class Broken(Planner):
        def plan(self, epoch, b):
            if b == 2:
                raise RuntimeError("planner failed at batch 2")
            return super().plan(epoch, b)

    p = Broken(train=True, labels=LABELS, sizes=None, image_size=32, batch_size=8, seed=0, rank=0, world_size=1,
               aug=AugConfig(), mix=MixConfig(), num_views=2, fg_weights=foreground_weights(LABELS, 4, "class", 1.0))
    stream = PlanStream(p, 0, 0, None, depth=3)
    next(stream), next(stream)
    with pytest.raises(RuntimeError, match="batch 2"):
        next(stream)
    stream.close()


def test_staged_plans_land_on_the_executor_device():
    class OnCpu(_Recorder):
        device = torch.device("cpu")

    loader = Loader(planner(), OnCpu(), classes=list("abcd"), class_counts=np.bincount(LABELS))
    staged = next(iter(loader))
    assert isinstance(staged.table, torch.Tensor) and staged["lam"].dtype == torch.float32
    assert np.array_equal(staged["bg_index"].numpy(), staged.host["bg_index"])


def test_every_plan_of_a_run_has_one_static_shape():
    """A CUDA graph replays fixed shapes: mixed and unmixed plans, every epoch, share the table's shape."""
    p = planner(mix=MixConfig(mix_prob=0.5), aug=AugConfig(policy="cmo_randaug"), num_epochs=12)
    shapes = {(p.plan(e, b).table.shape, p.plan(e, b).table.dtype) for e in (0, 5, 6, 11) for b in range(len(p))}
    kinds = {p.plan(e, b).mixed for e in (0, 5, 6, 11) for b in range(len(p))}
    assert len(shapes) == 1 and kinds == {True, False}
