"""Tests of pipelines/backends/torch_executor.py (and the Batch/normalization helpers of pipelines/batch.py): epoch
lengths on every rank, reproducible epochs, mid-epoch resume, unmixed samples, test-split coverage,
layout, normalization and soft targets.

    python -m pytest tests/test_torch_loader.py -q

Most tests use a tiny synthetic dataset whose every image spells its own index in its pixels, so a
batch can be traced back to the samples it holds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mixtail.pipelines.batch import Batch, normalize_views
from mixtail.pipelines.loader import build_loader, loader_for_dataset
from mixtail.pipelines.sources.types import ImageArrays
from mixtail.pipelines.ops import mixing
from mixtail.pipelines.sampling import batch_mixed, foreground_weights, sample_order
from mixtail.pipelines.loader import Loader
from mixtail.pipelines.config import AugConfig, DataConfig
from helpers.configs import mixing_from_the_start as MixConfig  # every batch mixed, from epoch 0
from mixtail.trainer.config import load_config




SIZE = 16
# No flip and no colour: with aug_order none (no cropping) every view is its component's own pixels.
PLAIN = AugConfig(flip=False, color_jitter=0.0, hue=0.0, color_prob=0.0, grayscale_prob=0.0)
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CPU = torch.device("cpu")


def indexed_dataset(n: int, num_classes: int = 5, seed: int = 0) -> ImageArrays:
    """Image i is constant: channel 0 = i mod 256, channel 1 = i div 256, channel 2 = its label·40.
    Labels are long-tailed and shuffled."""
    rng = np.random.default_rng(seed)
    weights = 0.5 ** np.arange(num_classes)
    labels = rng.choice(num_classes, n, p=weights / weights.sum())
    labels[:num_classes] = np.arange(num_classes)  # every class present
    images = np.zeros((n, SIZE, SIZE, 3), np.uint8)
    images[..., 0] = (np.arange(n) % 256)[:, None, None]
    images[..., 1] = (np.arange(n) // 256)[:, None, None]
    images[..., 2] = (labels * 40)[:, None, None]
    return ImageArrays(images, labels.astype(np.int64), [f"c{k}" for k in range(num_classes)])


def loader(ds: ImageArrays, *, train=True, batch_size=16, mix=MixConfig(), aug=AugConfig(), rank=0, world_size=1,
           num_views=2, seed=0, num_epochs=None, fg_sampling="class", drop_last=True) -> Loader:
    """The torch backend over an in-memory dataset; batch_size is per rank."""
    data = DataConfig(batch_size=batch_size * world_size, eval_batch_size=batch_size, num_views=num_views,
                      fg_sampling=fg_sampling, image_size=SIZE, mean=MEAN, std=STD, drop_last=drop_last)
    return loader_for_dataset(ds, data, aug, mix, split="train" if train else "test", rank=rank,
                              world_size=world_size, device=CPU, seed=seed, num_epochs=num_epochs)


def pixels(images: torch.Tensor, y: int = 0, x: int = 0) -> np.ndarray:
    """Undo the normalization at pixel (y, x): (rows, 3) uint8 values."""
    m = torch.tensor(MEAN)[None, :]
    s = torch.tensor(STD)[None, :]
    return torch.round((images[:, :, y, x] * s + m) * 255).to(torch.int64).numpy()


def decode_index(images: torch.Tensor, y: int = 0, x: int = 0) -> np.ndarray:
    p = pixels(images, y, x)
    return p[:, 0] + 256 * p[:, 1]


def same_batches(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(torch.equal(x.images, y.images) and torch.equal(x.y_f, y.y_f)
                                    and torch.equal(x.y_b, y.y_b) and torch.equal(x.lam, y.lam)
                                    for x, y in zip(a, b))


def epoch(ld: Loader, e: int, start_batch: int = 0) -> list[Batch]:
    ld.set_epoch(e, start_batch)
    return list(ld)


DS = indexed_dataset(203)


# --------------------------------------------------------------------------------------------------
# Train split
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_train_epoch_length_same_on_every_rank(world_size):
    bs = 16
    expected = (len(DS) // world_size) // bs
    for rank in range(world_size):
        ld = loader(DS, batch_size=bs, rank=rank, world_size=world_size)
        assert len(ld) == expected
        batches = epoch(ld, 1)
        assert len(batches) == expected
        for b in batches:
            assert b.images.shape == (2 * bs, 3, SIZE, SIZE) and b.images.dtype == torch.float32
            assert b.y_f.shape == b.y_b.shape == b.lam.shape == (bs,)
            assert b.y_f.dtype == b.y_b.dtype == torch.int64 and b.lam.dtype == torch.float32
            assert b.num_views == 2


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_kept_last_batch_delivers_every_sample_of_each_rank(world_size):
    """data.drop_last=false: ceil(samples per rank / batch) batches, the last one short and as long on every
    rank; the ranks' backgrounds are disjoint and together the single-process epoch (less the tail that does
    not divide over the ranks); a mixed short batch mixes all its pairs."""
    bs, per_rank = 16, len(DS) // world_size
    seen = []
    for rank in range(world_size):
        ld = loader(DS, batch_size=bs, rank=rank, world_size=world_size, drop_last=False)
        assert len(ld) == math.ceil(per_rank / bs) == (len(DS) // world_size) // bs + 1
        batches = epoch(ld, 1)
        sizes = [len(b.y_f) for b in batches]
        assert len(batches) == len(ld) and sum(sizes) == per_rank and sizes[-1] == per_rank % bs
        last = batches[-1]
        assert last.images.shape == (2 * sizes[-1], 3, SIZE, SIZE) and last.lam.shape == (sizes[-1],)
        assert (last.plan["mixed"] == 1).all() and (last.lam < 1).any()
        seen.append(np.concatenate([b.plan["bg_index"] for b in batches]))
    union = np.concatenate(seen)
    assert len(np.unique(union)) == len(union) == per_rank * world_size
    full = sample_order(None, epoch=1, seed=0, rank=0, world_size=1, num_samples=len(DS))
    assert set(union) == set(full[:per_rank * world_size])


def test_drop_last_is_a_bool_and_a_kept_tail_may_be_the_only_batch():
    from mixtail.errors import ConfigError

    with pytest.raises(ConfigError, match="data.drop_last"):
        DataConfig(drop_last=0)
    small = indexed_dataset(12)
    assert len(loader(small, batch_size=16, drop_last=False)) == 1
    with pytest.raises(ConfigError, match="data.batch_size"):
        loader(small, batch_size=16)


def test_set_epoch_reproducible_and_epochs_differ():
    ld = loader(DS)
    first = epoch(ld, 3)
    assert same_batches(first, epoch(ld, 3))
    assert same_batches(first, epoch(loader(DS), 3)), "a fresh loader must give the same epoch"
    assert not torch.equal(first[0].images, epoch(ld, 4)[0].images)
    assert not torch.equal(first[0].images, epoch(loader(DS, seed=1), 3)[0].images)


@pytest.mark.parametrize("start", [1, 5, 11])
def test_start_batch_resumes_mid_epoch(start):
    full = epoch(loader(DS), 2)
    assert len(full) == 12
    resumed_loader = loader(DS)  # a restarted process: a new loader told where to resume
    assert same_batches(epoch(resumed_loader, 2, start_batch=start), full[start:])
    # After the resumed epoch the next one starts from batch 0 again.
    assert same_batches(epoch(resumed_loader, 2), full)
    resumed_loader.set_epoch(2, start)
    assert same_batches(list(resumed_loader), full[start:])
    assert same_batches(list(resumed_loader), full)


def test_unmixed_samples_are_their_background():
    ld = loader(DS, mix=MixConfig(mix_prob=0.0, aug_order="none"), aug=PLAIN, world_size=2, rank=1)
    order = sample_order(None, epoch=0, seed=0, rank=1, world_size=2, num_samples=len(DS))
    seen = []
    for b in epoch(ld, 0):
        assert torch.equal(b.y_f, b.y_b) and (b.lam == 1).all()
        bs = len(b.y_f)
        # Views are identical (no crop, flip or colour) and hold exactly the background images, normalized.
        assert torch.equal(b.images[:bs], b.images[bs:])
        idx = decode_index(b.images[:bs])
        assert np.array_equal(b.y_b.numpy(), DS.labels[idx])
        assert np.array_equal(pixels(b.images[:bs], 5, 9)[:, 2], DS.labels[idx] * 40)  # every pixel, not one
        seen.append(idx)
    seen = np.concatenate(seen)
    assert np.array_equal(seen, order[: len(seen)]), "the background stream is sample_order's permutation"


def test_mixing_window_in_epochs():
    # CMO's window: mixing for start_epoch <= epoch < E − unmixed_last_epochs; the last epochs are unmixed.
    ld = loader(DS, mix=MixConfig(start_epoch=1, unmixed_last_epochs=2), num_epochs=5)
    for e in (0, 3, 4):
        for b in epoch(ld, e):
            assert torch.equal(b.y_f, b.y_b) and (b.lam == 1).all() and not b.plan.mixed
    for e in (1, 2):
        lam = torch.cat([b.lam for b in epoch(ld, e)])
        assert (lam < 1).all() and (lam >= 0.1).all()  # ratio_range [0.2, 0.8] after rounding at 16 px


def test_mix_per_batch_mixes_whole_batches_at_mix_prob():
    ld = loader(DS, mix=MixConfig(mix_prob=0.5), batch_size=8)
    flags = []
    for e in range(12):
        for bi, b in enumerate(epoch(ld, e)):
            mixed = b.plan["mixed"].astype(bool)
            assert mixed.all() or not mixed.any(), "mix_per=batch mixes a whole batch or none of it"
            assert mixed.all() == batch_mixed(0, e, bi, 0.5)  # the documented draw, shared by every rank
            flags.append(mixed.all())
    n = len(flags)
    assert abs(np.mean(flags) - 0.5) < 4 * np.sqrt(0.25 / n), (np.mean(flags), n)
    per_sample = loader(DS, mix=MixConfig(mix_prob=0.5, mix_per="sample"), batch_size=64)
    b = epoch(per_sample, 0)[0]
    assert 0 < b.plan["mixed"].sum() < 64


def test_unmixed_batches_draw_no_foreground(monkeypatch):
    rendered = []
    real = mixing.render_component
    monkeypatch.setattr(mixing, "render_component", lambda x, plan, name, *a, **k: rendered.append(name) or
                        real(x, plan, name, *a, **k))
    ld = loader(DS, mix=MixConfig(mix_prob=0.5), batch_size=8)
    ld.set_epoch(2)
    kinds = set()
    for b in ld:  # a training batch is rendered when its tensors are first read (PlanRender)
        b.tensors()
        names, rendered[:] = list(rendered), []
        kinds.add(b.plan.mixed)
        if b.plan.mixed:
            assert names == ["bg0", "fg0", "bg1", "fg1"]
        else:
            assert names == ["bg0", "bg1"], "an unmixed batch must not render a foreground"
            assert np.array_equal(b.plan["fg_index"], b.plan["bg_index"])
    assert kinds == {True, False}


def test_aug_order_none_keeps_images_uncropped_but_flips():
    ld = loader(DS, mix=MixConfig(aug_order="none"), aug=AugConfig(crop="resized"), batch_size=32)
    plan = epoch(ld, 0)[0].plan
    for p in ("fg0", "bg0", "fg1", "bg1"):
        assert np.array_equal(plan[f"{p}.crop"], np.tile([0.0, 0.0, 1.0, 1.0], (32, 1)))
    flips = np.concatenate([plan[f"{p}.flip"] for p in ("bg0", "bg1")])
    assert 0 < flips.sum() < len(flips), "no cropping, but the flip stays"
    assert plan.colour, "and so does the colour augmentation"


def test_mixed_batches_hold_the_foreground_and_background_streams():
    # No crop, flip or colour + CutMix-style crop: inside the box the pixels are the foreground's own, so
    # both sample indices can be read back and checked against the documented streams and labels.
    mix = MixConfig(aug_order="none", mix_op="crop", mix_prob=0.7, mix_per="sample")
    ld = loader(DS, mix=mix, aug=PLAIN, rank=0, world_size=2, seed=4)
    kw = dict(epoch=6, seed=4, rank=0, world_size=2, num_samples=len(DS))
    bg_order = sample_order(None, **kw)
    fg_order = sample_order(foreground_weights(DS.labels, 5, "class", 1.0), **kw)
    n_mixed = 0
    for bi, b in enumerate(epoch(ld, 6)):
        bs = len(b.y_f)
        box, mixed = b.plan["box"], b.plan["mixed"].astype(bool)
        lam = np.where(mixed, box[:, 2] * box[:, 3] / SIZE**2, 1.0)
        np.testing.assert_allclose(b.lam.numpy(), lam, rtol=0, atol=1e-7)  # λ is the pasted area
        bg_idx = bg_order[bi * bs:(bi + 1) * bs]
        fg_idx = fg_order[bi * bs:(bi + 1) * bs]
        assert np.array_equal(b.y_b.numpy(), DS.labels[bg_idx])
        assert np.array_equal(b.y_f.numpy(), np.where(mixed, DS.labels[fg_idx], DS.labels[bg_idx]))
        for i in range(bs):
            top, left, bh, bw = box[i]
            if bh > 0:
                inside = decode_index(b.images[i:i + 1], top, left)[0]
                assert inside == fg_idx[i]
                n_mixed += 1
            # Row 0 of an image is outside the box unless the box starts there; pick an outside pixel.
            outside = [(y, x) for y, x in [(0, 0), (SIZE - 1, SIZE - 1), (0, SIZE - 1), (SIZE - 1, 0)]
                       if not (top <= y < top + bh and left <= x < left + bw)]
            assert decode_index(b.images[i:i + 1], *outside[0])[0] == bg_idx[i]
    assert n_mixed > 0


def test_soft_targets():
    ld = loader(DS)
    b = epoch(ld, 0)[0]
    t = b.soft_targets(5)
    bs = len(b.y_f)
    assert t.shape == (2 * bs, 5) and t.dtype == torch.float32
    torch.testing.assert_close(t.sum(1), torch.ones(2 * bs), atol=1e-6, rtol=0)
    lam = b.lam.numpy().astype(np.float64)
    expected = np.zeros((bs, 5))
    expected[np.arange(bs), b.y_f.numpy()] += lam
    expected[np.arange(bs), b.y_b.numpy()] += 1 - lam
    np.testing.assert_allclose(t[:bs].numpy(), expected, atol=1e-6, rtol=0)
    assert torch.equal(t[:bs], t[bs:]), "view v of pair b is row v·B + b: both views share the target"


def test_train_images_channels_last_and_normalized():
    b = epoch(loader(DS, mix=MixConfig(aug_order="none", mix_prob=0.0), aug=PLAIN), 0)[0]
    assert b.images.is_contiguous(memory_format=torch.channels_last)
    raw = torch.from_numpy(DS.images[decode_index(b.images[: len(b.y_f)])]).permute(0, 3, 1, 2).float() / 255
    expected = (raw - torch.tensor(MEAN)[None, :, None, None]) / torch.tensor(STD)[None, :, None, None]
    torch.testing.assert_close(b.images[: len(b.y_f)], expected, atol=1e-5, rtol=0)


def test_train_needs_one_full_batch():
    with pytest.raises(ValueError, match="do not fill one batch"):
        loader(indexed_dataset(40), batch_size=16, world_size=3)
    with pytest.raises(ValueError, match="RGB"):
        loader(ImageArrays(np.zeros((4, 8, 8, 1), np.uint8), np.zeros(4, np.int64), ["a"]), batch_size=2)


# --------------------------------------------------------------------------------------------------
# Test split
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size,batch_size", [(1, 7), (2, 7), (3, 5), (3, 100)])
def test_test_split_covers_every_sample_once(world_size, batch_size):
    ds = indexed_dataset(50)
    seen = []
    for rank in range(world_size):
        ld = loader(ds, train=False, batch_size=batch_size, rank=rank, world_size=world_size)
        batches = epoch(ld, 0)
        assert len(batches) == len(ld) == math.ceil(len(range(rank, 50, world_size)) / batch_size)
        for b in batches:
            assert b.num_views == 1 and torch.equal(b.y_f, b.y_b) and (b.lam == 1).all()
            assert b.images.is_contiguous(memory_format=torch.channels_last)
            idx = decode_index(b.images)
            assert np.array_equal(b.y_f.numpy(), ds.labels[idx])
            raw = torch.from_numpy(ds.images[idx]).permute(0, 3, 1, 2).float() / 255
            expected = (raw - torch.tensor(MEAN)[None, :, None, None]) / torch.tensor(STD)[None, :, None, None]
            torch.testing.assert_close(b.images, expected, atol=1e-6, rtol=0)
            seen.append(idx)
    seen = np.concatenate(seen)
    assert np.array_equal(np.sort(seen), np.arange(50)), "each test sample exactly once over the ranks"


def test_normalize_views_layout():
    views = [torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)]
    x = normalize_views(views, (0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    assert x.shape == (8, 3, 8, 8) and x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x[4:, 1], (views[1][:, 1] - 0.25) / 0.25, atol=1e-6, rtol=0)
    torch.testing.assert_close(x[:4, 2], views[0][:, 2] / 2.0, atol=1e-6, rtol=0)
    assert normalize_views(views, (0, 0, 0), (1, 1, 1), channels_last=False).is_contiguous()


# --------------------------------------------------------------------------------------------------
# From a config (the demo set)
# --------------------------------------------------------------------------------------------------


def test_build_loader_from_demo_config():
    cfg = load_config("demo")
    world = 2
    train = build_loader(cfg.data, cfg.aug, cfg.mix, split="train", rank=1, world_size=world, device=CPU, seed=0,
                         num_epochs=cfg.train.epochs)
    counts = [int(300 * (1 / cfg.data.imbalance_ratio) ** (k / 9)) for k in range(10)]
    assert train.class_counts.tolist() == counts and train.num_classes == 10
    assert train.batch_size == cfg.data.batch_size // world
    assert len(train) == (sum(counts) // world) // (cfg.data.batch_size // world)
    train.set_epoch(0)
    b = next(iter(train))
    assert b.images.shape == (2 * train.batch_size, 3, 32, 32)
    assert b.images.is_contiguous(memory_format=torch.channels_last)
    test = build_loader(cfg.data, cfg.aug, cfg.mix, split="test", rank=0, world_size=1, device=CPU, seed=0)
    assert len(test) == math.ceil(1000 / cfg.data.eval_batch_size)
    with pytest.raises(ValueError, match="do not divide over 3 ranks"):
        build_loader(cfg.data, cfg.aug, cfg.mix, split="train", rank=0, world_size=3, device=CPU, seed=0)
    with pytest.raises(ValueError, match="not a known backend"):
        build_loader(DataConfig(dataset="demo", backend="nope"), cfg.aug, cfg.mix,  # type: ignore[arg-type]
                     split="train", rank=0, world_size=1, device=CPU, seed=0)


def test_mixing_on_is_the_planners_window_and_only_a_training_loaders():
    ld = loader(DS, mix=MixConfig(start_epoch=2, unmixed_last_epochs=1), num_epochs=6)
    assert [ld.mixing_on(e) for e in range(6)] == [False, False, True, True, True, False]
    assert all(any(b.plan.mixed for b in epoch(ld, e)) == ld.mixing_on(e) for e in (1, 2))
    with pytest.raises(ValueError, match="mixes nothing"):
        loader(DS, train=False).mixing_on(3)
