"""The DALI backend (pipelines/backends/dali_executor.py) against the torch reference, on the CPU (device_id=None).

What is checked:
- the DALI graph reproduces mixing.render_views for fixed plans and augmentations (every crop mode, aug order
  and mix op), within the float-rounding tolerances of tests/helpers/dali_parity.py;
- λ and the labels equal the pasted areas and the sampled images (read back from the pixels);
- foreground classes follow q(k) (chi-square; a wrong weighting is rejected);
- image-folder, ImageNet-LT list and iNaturalist JSON sources (fixtures, and generated photo-like JPEGs);
- two ranks see disjoint backgrounds and equal epoch lengths, equal to the torch loader's;
- resume (set_epoch with start_batch) and abandoned epochs;
- whole training batches of the AutoAugment policies against the torch loader's (the ops alone, one by one, are
  tests/test_dali_autoaugment.py's);
- `mixtail train --data.backend=dali` (also with each aug.policy) and the loader benchmark, tiny, on the CPU.
GPU variants (marked gpu) run the same comparisons with device_id=0 where CUDA is present.

    python -m pytest tests/test_dali_loader.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed (pip install 'mixtail[dali]')")

from helpers.configs import mixing_from_the_start as MixConfig  # noqa: E402 - every batch mixed, from epoch 0
from helpers.dali_parity import (MEAN, STD, TOL_EXACT, TOL_INSIDE, assert_matches_reference,  # noqa: E402
                                 drawn_plan, grey, noise, policy_row_failures, reference, run_graph)
from helpers.images import CIFAR10_CLASSES, write_cifar_like_tree  # noqa: E402
from mixtail.pipelines.config import AugConfig, DataConfig  # noqa: E402
from mixtail.pipelines.loader import build_loader, loader_for_dataset  # noqa: E402
from mixtail.pipelines.ops.augment import AugParams  # noqa: E402
from mixtail.pipelines.ops.mixing import MixParams  # noqa: E402
from mixtail.pipelines.plan import pack_train_plan, plan_layout  # noqa: E402
from mixtail.pipelines.sampling import foreground_class_probs, foreground_weights, sample_order  # noqa: E402
from mixtail.pipelines.sources.types import ImageArrays, ImageFiles  # noqa: E402
from mixtail.trainer.config import load_config  # noqa: E402

pytestmark = pytest.mark.dali

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (the GPU variant of a CPU test)")

# No flip and no colour: with aug_order none (no cropping) every view is its component's own pixels.
PLAIN = AugConfig(flip=False, color_jitter=0.0, hue=0.0, color_prob=0.0, grayscale_prob=0.0)

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
    images = np.concatenate([noise(n, size, 1), noise(n, size, 2)])
    aug = AugConfig(crop=crop)
    plan = _fixed_plan(n, size, aug_order, crop, mix_op)
    views = run_graph(images, plan, aug)
    assert_matches_reference(views, reference(images, plan), plan, size)


@pytest.mark.parametrize("seed,box", [(0, {}), (1, {}), (2, {"box": "clipped", "mix_op": "crop"}),
                                      (3, {"box": "clipped", "box_per": "batch", "mix_op": "crop"})])
def test_graph_matches_reference_drawn_params(seed, box):
    """The plans the loaders actually draw, RandomResizedCrop at 48 px, some pairs unmixed; CutMix's clipped
    boxes (mix.box) too, per pair and one per batch."""
    size, n = 48, 16
    aug, mix = AugConfig(crop="resized"), MixConfig(mix_prob=0.7, mix_per="sample", **box)
    images = noise(40, size, 3 + seed)
    plan = drawn_plan(seed, n, size, aug, mix, 40)
    assert 0 < plan["mixed"].sum() < n
    views = run_graph(images, plan, aug)
    assert_matches_reference(views, reference(images, plan), plan, size)


def test_the_graph_refuses_a_plan_of_another_layout():
    """The graph is built once from its planner's layout (aug_order, mix_op, views): a plan drawn for another
    layout would be rendered the graph's way, so it is refused, naming both."""
    ds = ImageArrays(noise(16, 16, 0), np.arange(16) % 4, ["a", "b", "c", "d"])
    dali = _loader(ds, mix=MixConfig(mix_op="resize"))
    crop_plan = _loader(ds, mix=MixConfig(mix_op="crop")).planner.plan(0, 0)
    with pytest.raises(ValueError, match="mix_op crop, 2 views.* built for .*mix_op resize"):
        next(dali.executor.batches(iter([crop_plan] * 3), 1))


def test_antialiased_box_resize_would_fail_the_tolerance():
    """The tolerance tests something: the foreground shrunk with an antialiasing filter (DALI's default)
    instead of the reference's plain bilinear sampling differs by far more than TOL_INSIDE."""
    from mixtail.pipelines.ops.mixing import resize_into_boxes

    size = 32
    fg = torch.from_numpy(noise(1, size, 5)).permute(0, 3, 1, 2).float()
    box = torch.tensor([[4, 4, 16, 16]])
    plain = resize_into_boxes(fg, box)[0, :, 4:20, 4:20]
    smooth = torch.nn.functional.interpolate(fg, size=(16, 16), mode="bilinear", antialias=True)[0]
    assert (plain - smooth).abs().max() > 100 * TOL_INSIDE


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
            if policy:  # AutoAugment: rows that hang on a rounding tie get the mean rule (see policy_row_failures)
                views = [x.permute(0, 2, 3, 1).numpy() for x in bd.images.chunk(2)]  # (B, S, S, 3) per view
                ref = [x.permute(0, 2, 3, 1).numpy() for x in bt.images.chunk(2)]
                bad, exact = policy_row_failures(views, ref, bd.plan, 32, cfg.aug.crop, cfg.mix.aug_order)
                assert not bad and exact > len(bd.y_f)
            else:
                assert (bd.images - bt.images).abs().max() <= grey(TOL_INSIDE)
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
            assert (bd.images - bt.images).abs().max() <= grey(TOL_EXACT)


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
            assert (bd.images - bt.images).abs().max() <= grey(TOL_INSIDE)


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
    images = np.concatenate([noise(n, size, 1), noise(n, size, 2)])
    plan = _fixed_plan(n, size, aug_order, crop, mix_op)
    views = run_graph(images, plan, AugConfig(crop=crop), device_id=0)
    assert_matches_reference(views, reference(images, plan), plan, size)


@gpu
@pytest.mark.gpu
def test_gpu_graph_matches_reference_drawn_params_224():
    size, n = 224, 32
    aug, mix = AugConfig(crop="resized"), MixConfig(mix_prob=0.8, mix_per="sample")
    images = noise(64, size, 3)
    plan = drawn_plan(0, n, size, aug, mix, 64)
    views = run_graph(images, plan, aug, device_id=0)
    assert_matches_reference(views, reference(images, plan), plan, size)


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
            assert (bd.images - bt.images).abs().max() <= grey(TOL_INSIDE)


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
