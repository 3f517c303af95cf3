"""Every data, aug, mix and loss key changes what the loader or the loss produces.

A switch can be read from the config yet never reach the loader (`fg_sampling` once did: the demo silently
fell back). Here every field of DataConfig, AugConfig, MixConfig and LossConfig, enumerated from the
dataclasses, has a row in `ROWS`: a non-default value and a check that the loader (its batch plans, its
batches) or the trainer's loss changes the way the key promises; or it is in `EXEMPT` with the reason. Every
non-default choice of a Literal key has a row too (`CHOICES_EXEMPT` says why a few cannot run here). A new
key without a row fails `test_every_key_has_a_row_or_a_reason`.

Loaders are built by `build_loader` from the config, on the built-in demo data on the CPU, as the trainer
builds them; the loss is the `Objective` the trainer itself constructs from the config (captured just before
the first step), evaluated on fixed outputs. Each check asserts the default's behaviour and the changed one,
so a key that does nothing fails.

    python -m pytest tests/test_wiring.py -q
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import tempfile
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixtail.errors import ConfigError
from mixtail.kernels.reference import smc_loss as reference_smc_loss
from mixtail.pipelines.loader import build_loader
from mixtail.pipelines.config import AugConfig, DataConfig, MixConfig
from mixtail.pipelines.sources.demo import DEMO_CLASSES, DEMO_TRAIN_PER_CLASS, demo_dataset
from mixtail.pipelines.ops.mixing import render_component
from mixtail.trainer import train as train_module
from mixtail.trainer.config import LossConfig, RunConfig, load_config
from mixtail.trainer.step import Objective

# The module, not the function that mixtail.kernels re-exports under the same name.
smc_module = importlib.import_module("mixtail.kernels.smc_loss")

REPO = Path(__file__).resolve().parent.parent
FIXTURE_TREE = REPO / "tests" / "fixtures" / "images"
CPU = torch.device("cpu")
EPOCHS = 12  # train.epochs of the base config: the default mixing window is [4, E − 3) = 4..8
BASE = ("--data.dataset=demo", "--data.batch_size=32", f"--train.epochs={EPOCHS}", "--train.device=cpu")
SECTIONS = {"data": DataConfig, "aug": AugConfig, "mix": MixConfig, "loss": LossConfig}


def cfg_with(*overrides: str) -> RunConfig:
    return load_config(None, [*BASE, *overrides])


def demo_counts(rho: float) -> np.ndarray:
    """n_k of the demo's long-tailed subset: int(n_max·ρ^(−k/(C−1))) (LDAM's CIFAR-LT profile)."""
    c = len(DEMO_CLASSES)
    return np.array([int(DEMO_TRAIN_PER_CLASS * (1.0 / rho) ** (k / (c - 1))) for k in range(c)])


# --------------------------------------------------------------------------------------------------
# What a config produces: loaders, plans, batches, the trainer's objective
# --------------------------------------------------------------------------------------------------


def make_loader(cfg: RunConfig, split: str = "train"):
    return build_loader(cfg.data, cfg.aug, cfg.mix, split=split, rank=0, world_size=1, device=CPU,
                        seed=cfg.train.seed, num_epochs=cfg.train.epochs if split == "train" else None,
                        channels_last=False)


@functools.lru_cache(maxsize=64)
def plans(cfg: RunConfig) -> tuple:
    """Every training plan of every epoch of the run, from the planner build_loader made."""
    loader = make_loader(cfg)
    try:
        return tuple(loader.planner.plan(e, b) for e in range(cfg.train.epochs) for b in range(len(loader)))
    finally:
        loader.close()


def column(cfg: RunConfig, name: str, *, mixed_only: bool = False) -> np.ndarray:
    rows = [p[name][p["mixed"].astype(bool)] if mixed_only else p[name] for p in plans(cfg)]
    return np.concatenate(rows)


def first_batch(cfg: RunConfig, epoch: int = 0, batch: int = 0, split: str = "train"):
    loader = make_loader(cfg, split)
    try:
        loader.set_epoch(epoch, batch)
        return next(iter(loader)), loader
    finally:
        loader.close()


def first_mixed(cfg: RunConfig):
    return next(p for p in plans(cfg) if p.mixed)


class _Captured(Exception):
    pass


@functools.lru_cache(maxsize=16)
def trainer_parts(cfg: RunConfig) -> dict:
    """What trainer.train builds from cfg before its first step: build_loader's arguments and the Objective."""
    seen: dict = {"loaders": []}
    real_build = train_module.build_loader

    def build(*args, **kwargs):
        seen["loaders"].append((args, kwargs))
        return real_build(*args, **kwargs)

    def step(model, sgd, objective, **kwargs):
        seen.update(objective=objective, sgd=sgd)
        raise _Captured

    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "build_loader", build)
        mp.setattr(train_module, "TrainStep", step)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=tmp))
        with pytest.raises(_Captured):
            train_module.train(cfg)
    return seen


# Fixed network outputs for the loss: 2 views of 24 pairs, 10 classes, mixed pairs with distinct labels.
_G = torch.Generator().manual_seed(7)
B, C = 24, len(DEMO_CLASSES)
Y_F = torch.randint(0, C, (B,), generator=_G)
Y_B = torch.randint(0, C, (B,), generator=_G)
LAM = 0.2 + 0.6 * torch.rand(B, generator=_G)
LOGITS = 2 * torch.randn(2 * B, C, generator=_G)
Z = F.normalize(torch.randn(2 * B, 16, generator=_G), dim=1)


class FixedOutputs(torch.nn.Module):
    def forward(self, images):
        return LOGITS, Z


def loss_parts(cfg: RunConfig) -> tuple[float, float, float]:
    """(loss, ce, smc) of the trainer's own Objective for cfg on the fixed outputs."""
    objective = trainer_parts(cfg)["objective"]
    loss, ce, smc = objective(FixedOutputs(), torch.zeros(2 * B, 3, 4, 4), Y_F, Y_B, LAM)
    return float(loss), float(ce), float(smc)


def soft_ce(log_prior: torch.Tensor | None) -> float:
    """−mean Σ ỹ·log softmax(logits + log prior), written here from the paper's Eq. 5."""
    target = LAM[:, None] * F.one_hot(Y_F, C) + (1 - LAM[:, None]) * F.one_hot(Y_B, C)
    logits = LOGITS if log_prior is None else LOGITS + log_prior
    return float(-(target.repeat(2, 1) * logits.log_softmax(1)).sum(1).mean())


def reference_smc(**kw) -> float:
    return float(reference_smc_loss(Z, Y_F.repeat(2), Y_B.repeat(2), LAM.repeat(2), **kw))


# --------------------------------------------------------------------------------------------------
# Decoding plan columns
# --------------------------------------------------------------------------------------------------

_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def colour_factors(cfg: RunConfig, name: str = "bg0") -> dict[str, np.ndarray]:
    """Brightness, contrast, saturation, hue (turns) and grayscale of every row, recovered from the plan's
    x' = M·x + t. Contrast c works around grey 0.5, so t = 0.5·(1 − c)·(1, 1, 1); in YIQ space M is
    b·c·diag(1, s·R(2π·hue)), or, for a grayscale row, every output channel is b·c·luma. Rows without colour
    columns in the plan are the identity."""
    ps = plans(cfg)
    if f"{name}.colour_m" not in ps[0].layout:
        n = sum(len(p) for p in ps)
        one = np.ones(n)
        return {"brightness": one, "contrast": one, "saturation": one, "hue": np.zeros(n), "gray": np.zeros(n, bool)}
    m = column(cfg, f"{name}.colour_m").reshape(-1, 3, 3).astype(np.float64)
    t = column(cfg, f"{name}.colour_t").astype(np.float64)
    contrast = 1 - 2 * t[:, 0]
    gray = np.abs(m - m[:, :1]).max(axis=(1, 2)) < 1e-6  # three equal rows
    q = _YIQ @ m @ np.linalg.inv(_YIQ)
    bc = np.where(gray, m[:, 0, 0] / _YIQ[0, 0], q[:, 0, 0])
    sat = np.where(gray, np.nan, np.hypot(q[:, 1, 1], q[:, 2, 1]) / bc)
    hue = np.where(gray, np.nan, np.arctan2(q[:, 2, 1], q[:, 1, 1]) / (2 * math.pi))
    return {"brightness": bc / contrast, "contrast": contrast, "saturation": sat, "hue": hue, "gray": gray}


def pixel_windows(cfg: RunConfig, name: str = "bg0") -> np.ndarray:
    """(rows, 4) crop windows in pixels of the S×S demo images: top, left, height, width."""
    return column(cfg, f"{name}.crop").astype(np.float64) * cfg.data.image_size


def mixed_epochs(cfg: RunConfig) -> list[int]:
    return sorted({p.epoch for p in plans(cfg) if p.mixed})


def class_freq(labels: np.ndarray) -> np.ndarray:
    return np.bincount(labels, minlength=C) / len(labels)


# --------------------------------------------------------------------------------------------------
# The checks, one per row: (default config, changed config) -> assertions on both
# --------------------------------------------------------------------------------------------------

Check = Callable[[RunConfig, RunConfig], None]


def check_dataset_folder(d, c):
    """The fixture tree's test split (3 classes, 6 images) instead of the demo's."""
    default, demo = first_batch(d, split="test")
    changed, loader = first_batch(c, split="test")
    assert demo.classes == DEMO_CLASSES
    assert loader.classes == ["class_a", "class_b", "class_c"] and len(changed.y_f) == 6
    assert len(default.y_f) == 1000  # the demo's whole test set in one batch of eval_batch_size 2000


def check_dataset_converted(d, c):
    """data.dataset=converted reads a `mixtail convert` output (of the fixture tree: the folder row's check)."""
    import dataclasses
    import tempfile

    from mixtail.commands.convert import main as convert

    out = Path(tempfile.mkdtemp(prefix="mixtail_wiring_")) / "converted"
    assert convert([str(FIXTURE_TREE), "--to", "dali", "--out", str(out)]) in (0, None)
    check_dataset_folder(d, dataclasses.replace(c, data=dataclasses.replace(c.data, root=str(out), imbalance_ratio=1.0)))


def check_imbalance_ratio(d, c):
    for cfg in (d, c):
        loader = make_loader(cfg)
        np.testing.assert_array_equal(loader.class_counts, demo_counts(cfg.data.imbalance_ratio))
        loader.close()
    assert not np.array_equal(demo_counts(d.data.imbalance_ratio), demo_counts(c.data.imbalance_ratio))


def _image_set(images: torch.Tensor) -> set[bytes]:
    return {x.numpy().tobytes() for x in images}


def check_val_per_class(d, c):
    """k images of each class leave the training loader (the head class from its subset: the demo's 300 →
    280) and form the validation loader, none of them among the training images."""
    n_k = demo_counts(d.data.imbalance_ratio)
    train_d, train_c = make_loader(d), make_loader(c)
    np.testing.assert_array_equal(train_d.class_counts, n_k)
    np.testing.assert_array_equal(train_c.class_counts, n_k - np.where(n_k == DEMO_TRAIN_PER_CLASS, 20, 0))
    val = make_loader(c, "val")
    np.testing.assert_array_equal(np.bincount(val.planner.labels, minlength=C), np.full(C, 20))
    assert not _image_set(val.executor.images) & _image_set(train_c.executor.images)
    assert _image_set(val.executor.images) & _image_set(train_d.executor.images)  # head images, trained on before
    for loader in (train_d, train_c, val):
        loader.close()
    with pytest.raises(ConfigError, match="val_per_class"):
        make_loader(d, "val")


def check_val_seed(d, c):
    """Another seed holds out other images, with the same counts."""
    loaders = [make_loader(cfg, "val") for cfg in (d, c)]
    assert _image_set(loaders[0].executor.images) != _image_set(loaders[1].executor.images)
    np.testing.assert_array_equal(loaders[0].planner.labels, loaders[1].planner.labels)
    for loader in loaders:
        loader.close()


def check_lt_subset_first(d, c):
    ds = demo_dataset("train")
    n_k = demo_counts(d.data.imbalance_ratio)
    first = np.concatenate([ds.images[ds.labels == k][:n] for k, n in enumerate(n_k)])  # (N, H, W, 3)
    first = torch.from_numpy(first).permute(0, 3, 1, 2)
    got = {}
    for name, cfg in (("default", d), ("changed", c)):
        loader = make_loader(cfg)
        got[name] = loader.executor.images
        np.testing.assert_array_equal(loader.class_counts, n_k)  # the same n_k, other images
        loader.close()
    assert torch.equal(got["changed"], first)
    assert not torch.equal(got["default"], first)


def check_backend(library: str, module: str, executor: str) -> Check:
    def check(d, c):
        assert type(make_loader(d).executor).__name__ == "TorchExecutor"
        try:
            importlib.import_module(library)
        except ImportError:
            with pytest.raises(ConfigError, match="data.backend"):
                make_loader(c)
            return
        loader = make_loader(c)
        try:
            assert type(loader.executor).__module__ == module and type(loader.executor).__name__ == executor
        finally:
            loader.close()
    return check


def check_batch_size(d, c):
    for cfg in (d, c):
        loader = make_loader(cfg)
        n = cfg.data.batch_size
        assert len(loader) == demo_counts(cfg.data.imbalance_ratio).sum() // n
        assert len(loader.planner.plan(0, 0)) == n
        loader.close()


def check_eval_batch_size(d, c):
    for cfg, sizes in ((d, [1000]), (c, [100] * 10)):
        loader = make_loader(cfg, "test")
        assert [len(b.y_f) for b in loader] == sizes
        loader.close()


def check_image_size(d, c):
    for cfg in (d, c):
        s = cfg.data.image_size
        train, _ = first_batch(cfg)
        test, _ = first_batch(cfg, split="test")
        assert train.images.shape == (64, 3, s, s) and test.images.shape[1:] == (3, s, s)


def check_fg_classes(expected_default: np.ndarray, expected_changed: Callable[[RunConfig], np.ndarray]) -> Check:
    """Foreground class frequencies of the mixed pairs against q(k), within 0.05 (about 4.5 standard errors
    at the ~1,800 foregrounds of the window); the two expectations differ by far more."""
    def check(d, c):
        want_c = expected_changed(c)
        assert np.abs(expected_default - want_c).max() > 0.2
        for cfg, want in ((d, expected_default), (c, want_c)):
            freq = class_freq(column(cfg, "y_f", mixed_only=True))
            assert np.abs(freq - want).max() < 0.05, (cfg.data.fg_sampling, cfg.data.fg_gamma, freq.round(3))
    return check


BALANCED = np.full(C, 1.0 / C)  # instance sampling with γ = 1 (the default): class-balanced


def reversed_tail(cfg):  # fg_sampling=class, γ = 1: q(k) ∝ 1/n_k (Eq. 2 read literally)
    inv = 1.0 / demo_counts(cfg.data.imbalance_ratio)
    return inv / inv.sum()


def dataset_prior(cfg):  # instance sampling with γ = 0: every image alike, so q = P_Y
    n = demo_counts(cfg.data.imbalance_ratio)
    return n / n.sum()


def check_num_views(d, c):
    for cfg, views in ((d, 2), (c, 1)):
        batch, _ = first_batch(cfg)
        assert batch.images.shape[0] == views * 32 and batch.num_views == views
        assert ("bg1.crop" in plans(cfg)[0].layout) is (views == 2)


def check_normalization(d, c):
    """The same pixels under another mean/std: x·std + mean is the raw image for both, x itself differs."""
    def raw(cfg):
        batch, _ = first_batch(cfg)
        mean, std = (torch.tensor(v or default).view(1, 3, 1, 1) for v, default in
                     ((cfg.data.mean, (0.4914, 0.4822, 0.4465)), (cfg.data.std, (0.2470, 0.2435, 0.2616))))
        return batch.images, batch.images * std + mean
    xd, rd = raw(d)
    xc, rc = raw(c)
    torch.testing.assert_close(rc, rd, rtol=0, atol=1e-5)
    assert (xc - xd).abs().max() > 0.1


def check_policy(d, c):
    ps_d, ps_c = plans(d), plans(c)
    assert "bg0.aa_op" not in ps_d[0].layout and "bg0.cutout" not in ps_d[0].layout
    cut = column(c, "bg0.cutout")
    fired = (column(c, "bg0.aa_op") >= 0).any(axis=1)
    chose = cut[:, 2] > 0
    if c.aug.policy == "autoaugment":
        assert chose.all() and (cut[:, 2:] >= c.aug.cutout_px // 2).all()  # a square clipped at most to half
    else:  # cmo_randaug: AutoAugment + Cutout on about half the rows
        assert 0.45 < chose.mean() < 0.55, chose.mean()
        assert not fired[~chose].any()
    assert fired[chose].mean() > 0.5
    # AutoAugment rows carry no colour jitter and no grayscale (the policy replaces them).
    f = colour_factors(c)
    assert np.allclose(f["contrast"][chose], 1) and np.allclose(f["brightness"][chose], 1)
    assert not f["gray"][chose].any()
    if c.aug.policy == "cmo_randaug":
        assert (np.abs(f["contrast"][~chose] - 1) > 1e-3).mean() > 0.6
    # The executor applies it: the Cutout square of view 0 is black before normalization.
    batch, _ = first_batch(c)  # epoch 0 is outside the mixing window: view 0 is bg0 itself
    box = ps_c[0]["bg0.cutout"]
    mean = torch.tensor((0.4914, 0.4822, 0.4465)).view(3, 1, 1)
    std = torch.tensor((0.2470, 0.2435, 0.2616)).view(3, 1, 1)
    for i in np.flatnonzero(box[:, 2] > 0)[:8]:
        top, left, h, w = box[i]
        patch = batch.images[i, :, top:top + h, left:left + w]
        torch.testing.assert_close(patch, (-mean / std).expand_as(patch), rtol=0, atol=1e-5)


def check_cutout_px(d, c):
    for cfg in (d, c):
        side = column(cfg, "bg0.cutout")[:, 2:]
        assert side.max() == cfg.aug.cutout_px and side.min() >= cfg.aug.cutout_px // 2


def check_crop_resized(d, c):
    pad = pixel_windows(d)
    assert (pad[:, 2:] == 32).all() and set(np.unique(pad[:, :2])) == set(range(-4, 5))
    win = pixel_windows(c)
    top, left, h, w = win.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = h * w / 32**2
    assert area.min() < 0.2 and area.max() > 0.9 and (h != w).mean() > 0.5


def check_pad_px(d, c):
    for cfg in (d, c):
        off = pixel_windows(cfg)[:, :2]
        pad = cfg.aug.pad_px
        assert np.abs(off).max() == pad and set(np.unique(off)) == set(range(-pad, pad + 1))


def check_scale(d, c):
    def areas(cfg):
        win = pixel_windows(cfg)
        return win[:, 2] * win[:, 3] / 32**2
    lo, hi = c.aug.scale
    a = areas(c)
    assert a.min() > lo - 0.04 and a.max() < hi + 0.04  # whole pixels move the area by a few hundredths
    assert areas(d).min() < lo - 0.2


def check_ratio(d, c):
    assert (pixel_windows(c)[:, 2] == pixel_windows(c)[:, 3]).all()  # aspect 1: square windows
    aspect = pixel_windows(d)[:, 3] / pixel_windows(d)[:, 2]
    assert aspect.min() < 0.8 and aspect.max() > 1.25


def check_flip(d, c):
    for p in ("bg0", "bg1", "fg0"):
        assert 0.4 < column(d, f"{p}.flip", mixed_only=p.startswith("fg")).mean() < 0.6
        assert not column(c, f"{p}.flip").any()


def check_color_jitter(d, c):
    s = c.aug.color_jitter
    for key in ("brightness", "contrast", "saturation"):
        dv, cv = colour_factors(d)[key], colour_factors(c)[key]
        dv, cv = dv[~np.isnan(dv)], cv[~np.isnan(cv)]
        assert dv.min() < 0.65 and dv.max() > 1.35, key
        assert cv.min() > 1 - s - 1e-4 and cv.max() < 1 + s + 1e-4 and np.abs(cv - 1).max() > s / 2, key


def check_hue(d, c):
    hd, hc = colour_factors(d)["hue"], colour_factors(c)["hue"]
    hd, hc = hd[~np.isnan(hd)], hc[~np.isnan(hc)]
    assert 0.09 < np.abs(hd).max() <= 0.1 + 1e-5
    assert np.abs(hc).max() < 1e-5


def check_color_prob(d, c):
    def jittered(cfg):
        return np.abs(colour_factors(cfg)["contrast"] - 1) > 1e-6
    assert 0.75 < jittered(d).mean() < 0.85
    assert not jittered(c).any()
    assert 0.15 < colour_factors(c)["gray"].mean() < 0.25  # grayscale is drawn on its own


def check_grayscale_prob(d, c):
    assert 0.15 < colour_factors(d)["gray"].mean() < 0.25
    assert colour_factors(c)["gray"].all()


def check_alpha(d, c):
    """λ' = lo + (hi − lo)·Beta(α, α) has variance (hi − lo)²/(4(2α + 1)): 0.030 at α = 1, 0.064 at 0.2."""
    for cfg in (d, c):
        lam = column(cfg, "lam", mixed_only=True)
        lo, hi = cfg.mix.ratio_range
        want = (hi - lo) ** 2 / (4 * (2 * cfg.mix.alpha + 1))
        assert abs(lam.var() / want - 1) < 0.15, (cfg.mix.alpha, lam.var(), want)
        assert abs(lam.mean() - (lo + hi) / 2) < 0.02


def check_ratio_range(d, c):
    lam_d, lam_c = column(d, "lam", mixed_only=True), column(c, "lam", mixed_only=True)
    lo, hi = c.mix.ratio_range
    # λ is the pasted area after rounding the box side to whole pixels: a few hundredths around the range.
    assert lam_c.min() > lo - 0.03 and lam_c.max() < hi + 0.03
    assert lam_d.min() < 0.25 and lam_d.max() > 0.75


def check_mix_op_crop(d, c):
    """CutMix: inside the box the pixels are the foreground view's own; outside, both are the background."""
    plan = first_mixed(d)
    epoch, b = plan.epoch, plan.batch
    resize, _ = first_batch(d, epoch, b)
    crop, loader = first_batch(c, epoch, b)
    images = loader.executor.images
    fg = render_component(images[torch.from_numpy(plan["fg_index"].astype(np.int64))], plan.to(CPU), "fg0", 32)
    mean = torch.tensor((0.4914, 0.4822, 0.4465)).view(1, 3, 1, 1)
    std = torch.tensor((0.2470, 0.2435, 0.2616)).view(1, 3, 1, 1)
    fg = (fg - mean) / std
    n = len(plan)
    inside = torch.zeros(n, 1, 32, 32, dtype=torch.bool)
    for i, (top, left, h, w) in enumerate(plan["box"]):
        inside[i, :, top:top + h, left:left + w] = True
    inside = inside.expand(-1, 3, -1, -1)
    view0_crop, view0_resize = crop.images[:n], resize.images[:n]
    torch.testing.assert_close(view0_crop[inside], fg[inside], rtol=0, atol=1e-5)
    torch.testing.assert_close(view0_crop[~inside], view0_resize[~inside], rtol=0, atol=0)
    assert (view0_resize[inside] - fg[inside]).abs().mean() > 0.1  # resize shrinks the whole foreground instead


def check_aug_order(d, c):
    layout_d, layout_c = plans(d)[0].layout, plans(c)[0].layout
    assert "fg0.crop" in layout_d and "mx0.crop" not in layout_d
    pad = pixel_windows(d)
    assert (pad[:, :2] != 0).any()
    if c.mix.aug_order == "after_mix":  # the mixed image of each view is augmented
        assert "mx0.crop" in layout_c and "mx1.crop" in layout_c and "bg0.crop" not in layout_c
        assert (pixel_windows(c, "mx0")[:, :2] != 0).any()
    else:  # none: no cropping, flip and colour kept (Table 5's "No cropping")
        for p in ("bg0", "bg1"):
            windows = column(c, f"{p}.crop")
            np.testing.assert_array_equal(windows, np.tile([0, 0, 1, 1], (len(windows), 1)))
            assert 0.4 < column(c, f"{p}.flip").mean() < 0.6
        assert 0.75 < (np.abs(colour_factors(c)["contrast"] - 1) > 1e-6).mean() < 0.85


def check_mix_prob(d, c):
    window = [p for p in plans(d) if d.mix.active(p.epoch, EPOCHS)]
    frac = np.mean([p.mixed for p in window])
    assert 0.3 < frac < 0.7  # one draw per batch, probability 0.5
    mixed = [p for p in plans(c) if c.mix.active(p.epoch, EPOCHS)]
    if c.mix.mix_prob == 0:
        assert not any(p.mixed for p in plans(c))
    else:
        assert all(p["mixed"].all() for p in mixed)
        assert not any(p.mixed for p in plans(c) if not c.mix.active(p.epoch, EPOCHS))


def check_mix_per_sample(d, c):
    assert all(p["mixed"].all() or not p["mixed"].any() for p in plans(d))
    partial = [p for p in plans(c) if 0 < p["mixed"].mean() < 1]
    window = [p for p in plans(c) if c.mix.active(p.epoch, EPOCHS)]
    assert len(partial) > 0.9 * len(window)
    assert 0.4 < np.mean([p["mixed"].mean() for p in window]) < 0.6


def check_box_clipped(d, c):
    """CutMix's clipped box: boxes at the border are cut (not square), and the foreground's mean share drops."""
    box_d, box_c = column(d, "box", mixed_only=True), column(c, "box", mixed_only=True)
    assert (box_d[:, 2] == box_d[:, 3]).all() and (box_c[:, 2] != box_c[:, 3]).mean() > 0.2
    assert column(c, "lam", mixed_only=True).mean() < column(d, "lam", mixed_only=True).mean() - 0.1


def check_box_per_batch(d, c):
    for cfg, shared in ((d, False), (c, True)):
        boxes = [p["box"][p["mixed"].astype(bool)] for p in plans(cfg) if p.mixed]
        assert all((b == b[0]).all() for b in boxes) == shared


def check_drop_last(d, c):
    """false: one more batch an epoch, the short rest of the samples, so every sample is seen once."""
    for cfg, keep in ((d, False), (c, True)):
        epoch = [p for p in plans(cfg) if p.epoch == 0]
        n = int(demo_counts(cfg.data.imbalance_ratio).sum())
        assert n % cfg.data.batch_size
        assert sum(len(p) for p in epoch) == (n if keep else n // cfg.data.batch_size * cfg.data.batch_size)
        assert (len(epoch[-1]) < cfg.data.batch_size) == keep


def check_window(d, c):
    for cfg in (d, c):
        want = list(range(cfg.mix.start_epoch, EPOCHS - cfg.mix.unmixed_last_epochs))
        assert mixed_epochs(cfg) == want
        assert all(p["mixed"].all() for p in plans(cfg) if p.epoch in want)  # mix_prob = 1 here


def check_eta(d, c):
    loss_d, ce_d, smc_d = loss_parts(d)
    loss_c, ce_c, smc_c = loss_parts(c)
    assert ce_c == pytest.approx(ce_d, rel=1e-6)
    assert loss_d == pytest.approx(ce_d + 0.1 * smc_d, rel=1e-6)
    if c.loss.eta == 0:
        assert smc_c == 0 and loss_c == pytest.approx(ce_c, rel=1e-6)
    else:
        assert smc_c == pytest.approx(smc_d, rel=1e-6)
        assert loss_c == pytest.approx(ce_c + c.loss.eta * smc_c, rel=1e-6)
    assert abs(loss_c - loss_d) > 0.01


def check_tau(d, c):
    _, _, smc_d = loss_parts(d)
    _, _, smc_c = loss_parts(c)
    assert smc_d == pytest.approx(reference_smc(tau=0.1), rel=1e-5)
    assert smc_c == pytest.approx(reference_smc(tau=c.loss.tau), rel=1e-5)
    assert abs(smc_c - smc_d) > 0.05


def check_weighting(d, c):
    _, _, smc_d = loss_parts(d)
    _, _, smc_c = loss_parts(c)
    assert smc_d == pytest.approx(reference_smc(weighting="weighted"), rel=1e-5)
    assert smc_c == pytest.approx(reference_smc(weighting=c.loss.weighting), rel=1e-5)
    assert abs(smc_c - smc_d) > 0.01


def check_impl(d, c):
    """The same value either way; the reference only runs when impl resolves to it (auto on the CPU)."""
    if c.loss.impl == "triton" and not smc_module.INTERPRET:
        pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1 (tests/conftest.py sets it where no GPU is)")
    calls = []
    real = smc_module.reference_smc_loss

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(smc_module, "reference_smc_loss", spy)
        _, _, smc_d = loss_parts(d)
        assert len(calls) == 1  # auto on CPU tensors is the reference
        _, _, smc_c = loss_parts(c)
    assert len(calls) == (2 if c.loss.impl == "reference" else 1)
    assert smc_c == pytest.approx(smc_d, rel=1e-5, abs=1e-6)


def check_logit_adjust(d, c):
    n = demo_counts(d.data.imbalance_ratio)
    log_py = torch.from_numpy(np.log(n / n.sum())).float()
    _, ce_d, _ = loss_parts(d)
    _, ce_c, _ = loss_parts(c)
    assert trainer_parts(c)["objective"].log_prior is None
    assert ce_d == pytest.approx(soft_ce(log_py), rel=1e-5)
    assert ce_c == pytest.approx(soft_ce(None), rel=1e-5)
    assert abs(ce_c - ce_d) > 0.1


def check_prior_mixed(d, c):
    """π(k) = p·(E[λ]·q(k) + (1 − E[λ])·P_Y(k)) + (1 − p)·P_Y(k) inside the mixing window
    (docs/method.md, "Logit adjustment and the mixed prior"), with p = 0.5, E[λ] = 0.5 and q uniform
    (instance sampling, γ = 1); P_Y outside it."""
    n = demo_counts(d.data.imbalance_ratio)
    p_y = n / n.sum()
    pi = 0.5 * (0.5 * BALANCED + 0.5 * p_y) + 0.5 * p_y
    for mixing in (False, True):
        np.testing.assert_allclose(train_module.adjustment_prior(d, n, mixing), p_y, rtol=1e-12)
        np.testing.assert_allclose(train_module.adjustment_prior(c, n, mixing), pi if mixing else p_y, rtol=1e-12)
    # The trainer starts at epoch 0, outside the window: both objectives adjust by log P_Y there
    # (test_loss_prior_follows_the_window_in_the_loop checks the epochs inside it).
    for cfg in (d, c):
        np.testing.assert_allclose(trainer_parts(cfg)["objective"].log_prior.numpy(), np.log(p_y), rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------


def expert_loss(cfg: RunConfig) -> float:
    """The trainer's multi-expert objective for cfg at the last epoch, on fixed images: its loss
    holds the diversity term, which the diversity keys shape (tests/test_experts.py checks it by hand)."""
    from mixtail.trainer.train import build_training, refresh_diversity

    counts = demo_counts(20.0)
    torch.manual_seed(0)
    run = build_training(cfg, len(counts), counts, CPU)
    refresh_diversity(run.objective, cfg, counts, EPOCHS - 1)
    images = torch.randn(2 * len(Y_F), 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float(run.objective(run.raw_model, images, Y_F, Y_B, LAM)[0])


def check_diversity(d, c):
    assert abs(expert_loss(c) - expert_loss(d)) > 1e-4



@dataclass(frozen=True)
class Row:
    value: object  # a non-default value of the key
    check: Check  # (default cfg, cfg with the value) -> assertions
    context: tuple[str, ...] = ()  # overrides applied to both, for a key that acts only beside another
    xfail: str | None = None  # a known wiring bug: strict, so fixing it makes the row pass and flags the mark


RESIZED = ("--aug.crop=resized",)
AUTOAUG = ("--aug.policy=autoaugment",)
ALWAYS_MIX = ("--mix.mix_prob=1.0",)

ROWS: dict[str, list[Row]] = {
    "data.dataset": [Row("folder", check_dataset_folder, (f"--data.root={FIXTURE_TREE}",)),
                     # the check converts the fixture tree and points data.root at the output
                     Row("converted", check_dataset_converted, (f"--data.root={FIXTURE_TREE}",))],
    "data.imbalance_ratio": [Row(10.0, check_imbalance_ratio)],
    "data.lt_subset": [Row("first", check_lt_subset_first)],
    "data.backend": [
        Row("dali", check_backend("nvidia.dali", "mixtail.pipelines.backends.dali_executor", "DaliExecutor"),
            ("--data.num_threads=1",)),
        Row("ffcv", check_backend("ffcv", "mixtail.pipelines.backends.ffcv_executor", "FfcvExecutor"),
            ("--data.num_threads=1",)),
    ],
    "data.batch_size": [Row(16, check_batch_size)],
    "data.drop_last": [Row(False, check_drop_last)],
    "data.eval_batch_size": [Row(100, check_eval_batch_size)],
    "data.image_size": [Row(24, check_image_size)],
    "data.fg_sampling": [Row("class", check_fg_classes(BALANCED, reversed_tail))],
    "data.fg_gamma": [Row(0.0, check_fg_classes(BALANCED, dataset_prior))],
    "data.num_views": [Row(1, check_num_views)],
    "data.val_per_class": [Row(20, check_val_per_class)],
    "data.val_seed": [Row(1, check_val_seed, ("--data.val_per_class=20",))],
    "data.mean": [Row([0.5, 0.4, 0.3], check_normalization)],
    "data.std": [Row([0.5, 0.25, 0.125], check_normalization)],
    "aug.policy": [Row("autoaugment", check_policy), Row("cmo_randaug", check_policy)],
    "aug.crop": [Row("resized", check_crop_resized)],
    "aug.pad_px": [Row(8, check_pad_px)],
    "aug.scale": [Row([0.5, 0.6], check_scale, RESIZED)],
    "aug.ratio": [Row([1.0, 1.0], check_ratio, RESIZED)],
    "aug.flip": [Row(False, check_flip)],
    "aug.color_jitter": [Row(0.1, check_color_jitter)],
    "aug.hue": [Row(0.0, check_hue)],
    "aug.color_prob": [Row(0.0, check_color_prob)],
    "aug.grayscale_prob": [Row(1.0, check_grayscale_prob)],
    "aug.cutout_px": [Row(8, check_cutout_px, AUTOAUG)],
    "mix.alpha": [Row(0.2, check_alpha)],
    "mix.ratio_range": [Row([0.4, 0.5], check_ratio_range)],
    "mix.mix_op": [Row("crop", check_mix_op_crop)],
    "mix.aug_order": [Row("after_mix", check_aug_order), Row("none", check_aug_order)],
    "mix.mix_prob": [Row(0.0, check_mix_prob), Row(1.0, check_mix_prob)],
    "mix.mix_per": [Row("sample", check_mix_per_sample)],
    "mix.box": [Row("clipped", check_box_clipped)],
    "mix.box_per": [Row("batch", check_box_per_batch)],
    "mix.start_epoch": [Row(2, check_window, ALWAYS_MIX)],
    "mix.unmixed_last_epochs": [Row(0, check_window, ALWAYS_MIX)],
    "loss.eta": [Row(0.5, check_eta), Row(0.0, check_eta)],
    "loss.tau": [Row(0.5, check_tau)],
    "loss.weighting": [Row("average", check_weighting), Row("assign_larger", check_weighting)],
    "loss.impl": [Row("reference", check_impl), Row("triton", check_impl)],
    "loss.logit_adjust": [Row(False, check_logit_adjust)],
    "loss.prior": [Row("mixed", check_prior_mixed)],
    # RIDE's diversity term acts only with several experts.
    "loss.diversity_weight": [Row(0.0, check_diversity, ("--model.experts=2",))],
    "loss.diversity_temperature": [Row(2.0, check_diversity, ("--model.experts=2",))],
    "loss.diversity_reweight_epoch": [Row(1, check_diversity, ("--model.experts=2",))],
    "loss.diversity_reweight_factor": [Row(0.5, check_diversity, ("--model.experts=2",
                                                                  "--loss.diversity_reweight_epoch=1"))],
}

# Keys that cannot change a batch or a loss on in-memory demo data, and where they are tested instead.
EXEMPT: dict[str, str] = {
    "data.root": "a path: where the dataset lives (its readers are tested in test_datasets.py, test_file_lists.py)",
    "data.download": "lets torchvision fetch CIFAR: needs the internet, and changes no pixel once the data is there",
    "data.test_dir": "a path: the held-out folder's name (test_datasets.py reads trees with it)",
    "data.train_list": "a path: ImageNet-LT / iNaturalist list file (test_file_lists.py)",
    "data.test_list": "a path: ImageNet-LT / iNaturalist list file (test_file_lists.py)",
    "data.val_list": "a path: ImageNet-LT / iNaturalist validation list (test_validation.py reads fixture lists)",
    "data.num_threads": "DALI/FFCV CPU threads: speed only; the backends' tests compare their batches to torch's",
    "data.on_error": "acts on bad image files, which the demo has none of (test_datasets.py, test_images.py)",
    "data.image_check": "how image files are checked (header or full decode): the demo has no files (test_images.py)",
    "data.strict_root": "acts on list entries outside data.root: the demo has no list (test_file_lists.py)",
}

# Non-default Literal choices without a row, and why.
CHOICES_EXEMPT: dict[str, dict[str, str]] = {
    "data.dataset": {
        "cifar10": "needs the CIFAR files (test_train.py trains on them where the shared data has them)",
        "cifar100": "needs the CIFAR files (test_datasets.py reads them where the shared data has them)",
        "imagenet_lt": "needs the ImageNet-LT lists and images (test_file_lists.py, on fixtures)",
        "inat2018": "needs the iNaturalist JSON and images (test_file_lists.py, on fixtures)",
    },
}


def all_keys() -> dict[str, dataclasses.Field]:
    return {f"{s}.{f.name}": f for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def _override(key: str, value) -> str:
    return f"--{key}={value if isinstance(value, str) else json.dumps(value)}"


def _value(cfg: RunConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def test_every_key_has_a_row_or_a_reason():
    keys = set(all_keys())
    assert not keys - set(ROWS) - set(EXEMPT), "keys with neither a wiring check nor an exemption"
    assert not (set(ROWS) | set(EXEMPT)) - keys, "rows or exemptions for keys that no longer exist"
    assert not set(ROWS) & set(EXEMPT), "a key both checked and exempt"


def test_every_choice_of_a_literal_key_has_a_row():
    hints = {s: typing.get_type_hints(cls) for s, cls in SECTIONS.items()}
    base = cfg_with()
    for key in all_keys():
        if key in EXEMPT:
            continue
        section, name = key.split(".")
        tp = hints[section][name]
        if typing.get_origin(tp) is typing.Literal:
            choices = set(typing.get_args(tp))
        elif tp is bool:
            choices = {True, False}
        else:
            continue
        covered = {r.value for r in ROWS.get(key, [])} | set(CHOICES_EXEMPT.get(key, {})) | {_value(base, key)}
        assert choices <= covered, f"{key}: no row for {sorted(map(str, choices - covered))}"


CASES = [pytest.param(key, row, id=f"{key}={row.value}",
                      marks=[pytest.mark.xfail(strict=True, reason=row.xfail)] if row.xfail else [])
         for key, rows in ROWS.items() for row in rows]


@pytest.mark.parametrize("key,row", CASES)
def test_key_changes_what_it_promises(key, row):
    default = cfg_with(*row.context)
    changed = cfg_with(*row.context, _override(key, row.value))
    assert _value(changed, key) != _value(default, key), "the row's value is the default"
    row.check(default, changed)


# --------------------------------------------------------------------------------------------------
# The trainer hands each section to its component, and applies the prior of each epoch
# --------------------------------------------------------------------------------------------------


def test_trainer_builds_its_loaders_and_loss_from_the_config():
    cfg = cfg_with("--aug.pad_px=2", "--mix.alpha=0.5", "--data.fg_sampling=class", "--train.seed=3",
                   "--loss.eta=0.3", "--loss.tau=0.2", "--loss.weighting=average", "--loss.impl=reference",
                   "--optim.momentum=0.8", "--optim.weight_decay=0.001", "--optim.nesterov=true")
    seen = trainer_parts(cfg)
    splits = {}
    for args, kwargs in seen["loaders"]:
        assert args[:3] == (cfg.data, cfg.aug, cfg.mix) and kwargs["seed"] == 3
        splits[kwargs["split"]] = kwargs
    assert set(splits) == {"train", "test"}
    assert splits["train"]["num_epochs"] == cfg.train.epochs  # closes the mixing window
    o = seen["objective"]
    assert (o.eta, o.tau, o.weighting, o.impl, o.num_classes) == (0.3, 0.2, "average", "reference", C)
    sgd = seen["sgd"]
    assert (sgd.momentum, sgd.weight_decay, sgd.nesterov) == (0.8, 0.001, True)


def _priors_of_three_epochs(tmp_path, monkeypatch, prior: str) -> tuple[list[torch.Tensor], np.ndarray, np.ndarray]:
    """Train three one-step epochs with the mix keys' window [1, 2); (the log prior each step's loss
    used, P_Y, π)."""
    seen = []

    class Recording(Objective):
        def __call__(self, *args):
            seen.append(self.log_prior.clone())
            return super().__call__(*args)

    monkeypatch.setattr(train_module, "Objective", Recording)
    cfg = load_config("smoke_cpu", [f"--train.out_dir={tmp_path}", "--train.epochs=3", "--train.max_steps_per_epoch=1",
                                    "--mix.start_epoch=1", "--mix.unmixed_last_epochs=1", f"--loss.prior={prior}",
                                    "--train.eval_every_epochs=10"])
    train_module.train(cfg)
    n = demo_counts(cfg.data.imbalance_ratio)
    p_y = n / n.sum()
    return seen, p_y, 0.5 * (0.5 * BALANCED + 0.5 * p_y) + 0.5 * p_y


@pytest.mark.parametrize("prior", ["dataset", "mixed"])
@pytest.mark.slow
def test_loss_prior_follows_the_window_in_the_loop(tmp_path, monkeypatch, prior):
    """Three one-step epochs with the window [1, 2): the loss adjusts by log π in epoch 1 only (mixed), by
    log P_Y everywhere else."""
    seen, p_y, pi = _priors_of_three_epochs(tmp_path, monkeypatch, prior)
    assert len(seen) == 3
    for got, w in zip(seen, [p_y, pi if prior == "mixed" else p_y, p_y]):
        np.testing.assert_allclose(got.numpy(), np.log(w), rtol=1e-6)


def test_the_loops_prior_takes_the_window_from_the_planner(tmp_path, monkeypatch):
    """The mixing window is decided by the training loader's planner alone: a planner that mixes only in
    epoch 2 moves the loss's mixed prior there too, whatever the mix keys say ([1, 2) here)."""
    from mixtail.pipelines.plan import Planner

    monkeypatch.setattr(Planner, "mixing_on", lambda self, epoch: epoch == 2)
    seen, p_y, pi = _priors_of_three_epochs(tmp_path, monkeypatch, "mixed")
    assert len(seen) == 3
    for got, w in zip(seen, [p_y, p_y, pi]):
        np.testing.assert_allclose(got.numpy(), np.log(w), rtol=1e-6)
