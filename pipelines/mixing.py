"""SMC's resize-and-paste mixing (ResizeMix with a normalized ratio), as batched torch ops.

This is the reference every backend is tested against. Per batch:

1. `sample_batch_params` draws, on the host, each pair's λ and box and each component's augmentation
   (numpy, seeded per batch, so any backend can reproduce a batch exactly);
2. `mix_views` runs on the device of the images: augment foreground and background separately
   (aug_order: before_mix), resize the whole foreground into its box, paste it into the background,
   and do this for every view with the same pair, λ and box (SPEC, Eq. 3).

The label ratio is the exact pasted area after rounding: λ = box_h·box_w / (H·W).

    rng = np.random.default_rng(0)
    params = sample_batch_params(rng, n=128, size=32, aug=AugConfig(), mix=MixConfig(), mixing_on=True)
    views = mix_views(fg_uint8, bg_uint8, params, out_size=32)    # list of (128, 3, 32, 32) floats
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mixtail.pipelines.augment import AugParams, augment, identity_aug_params, sample_aug_params


@dataclass(frozen=True)
class MixParams:
    """Per-pair mixing parameters (numpy)."""

    lam: np.ndarray  # (n,) float32: pasted area / (H·W); 1 where the pair is not mixed
    box: np.ndarray  # (n, 4) int64: top, left, height, width of the pasted box; zero size when not mixed
    mixed: np.ndarray  # (n,) bool


@dataclass(frozen=True)
class BatchParams:
    mix: MixParams
    fg_aug: list[AugParams]  # one per view (before_mix); unused otherwise
    bg_aug: list[AugParams]  # one per view; with after_mix, the augmentation of the mixed image
    mix_op: str
    aug_order: str


def sample_mix_params(rng: np.random.Generator, n: int, height: int, width: int, cfg, mixing_on: bool) -> MixParams:
    """λ' ~ lo + (hi − lo)·Beta(α, α); box side √λ'·(H, W) rounded; position uniform inside the image."""
    lo, hi = cfg.ratio_range
    lam_raw = lo + (hi - lo) * rng.beta(cfg.alpha, cfg.alpha, n)
    # CMO mixes a whole batch or none of it (one draw); `sample` decides per pair.
    draws = rng.random(1 if cfg.mix_per == "batch" else n)
    mixed = np.broadcast_to(draws < cfg.mix_prob, (n,)).copy() & mixing_on
    side = np.sqrt(lam_raw)
    bh = np.floor(side * height + 0.5).astype(np.int64)
    bw = np.floor(side * width + 0.5).astype(np.int64)
    top = np.floor(rng.random(n) * (height - bh + 1)).astype(np.int64)
    left = np.floor(rng.random(n) * (width - bw + 1)).astype(np.int64)
    box = np.stack([top, left, bh, bw], axis=1) * mixed[:, None]
    lam = np.where(mixed, (bh * bw) / (height * width), 1.0).astype(np.float32)
    return MixParams(lam, box.astype(np.int64), mixed)


def mixing_active(cfg, epoch: int, num_epochs: int | None) -> bool:
    """Mixing runs for start_epoch <= epoch < num_epochs − unmixed_last_epochs (CMO's window); with
    num_epochs=None (a loader used outside a run) the window has no end."""
    return cfg.active(epoch, num_epochs if num_epochs is not None else 1 << 62)


def sample_batch_params(rng: np.random.Generator, n: int, size: int, aug, mix, mixing_on: bool,
                        num_views: int = 2) -> BatchParams:
    """Everything random about one batch of n pairs on a size×size canvas, drawn in a fixed order."""
    mp = sample_mix_params(rng, n, size, size, mix, mixing_on)
    if mix.aug_order == "none":
        fg = bg = [identity_aug_params(n, size, size) for _ in range(num_views)]
    else:
        fg = [sample_aug_params(rng, n, size, size, aug) for _ in range(num_views)]
        bg = [sample_aug_params(rng, n, size, size, aug) for _ in range(num_views)]
    return BatchParams(mp, fg, bg, mix.mix_op, mix.aug_order)


def box_mask(box: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(n, 1, H, W) bool: True inside each sample's box."""
    i = torch.arange(height, device=box.device)
    j = torch.arange(width, device=box.device)
    top, left, bh, bw = (box[:, k, None] for k in range(4))
    rows = (i[None] >= top) & (i[None] < top + bh)  # (n, H)
    cols = (j[None] >= left) & (j[None] < left + bw)  # (n, W)
    return (rows[:, :, None] & cols[:, None, :])[:, None]


def resize_into_boxes(fg: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Each foreground resized (bilinear, whole image) to its box and placed at the box; undefined outside.

    Output pixel (y, x) of the box reads source ((y − top + ½)·H/h − ½, (x − left + ½)·W/w − ½),
    the same sampling as F.interpolate(mode="bilinear", align_corners=False).
    """
    n, _, height, width = fg.shape
    dev = fg.device
    top, left, bh, bw = (box[:, k, None].float() for k in range(4))
    i = torch.arange(height, device=dev, dtype=torch.float32)
    j = torch.arange(width, device=dev, dtype=torch.float32)
    ys = (i[None] - top + 0.5) * (height / bh.clamp(min=1)) - 0.5  # (n, H) source rows
    xs = (j[None] - left + 0.5) * (width / bw.clamp(min=1)) - 0.5  # (n, W) source cols
    gy = (2 * ys + 1) / height - 1
    gx = (2 * xs + 1) / width - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    return F.grid_sample(fg, grid, mode="bilinear", padding_mode="border", align_corners=False)


def paste(fg: torch.Tensor, bg: torch.Tensor, box: torch.Tensor, mix_op: str = "resize") -> torch.Tensor:
    """x̃ = M ⊙ R(x_f) + (1 − M) ⊙ x_b for float (n, C, H, W) batches; box is (n, 4) long on their device.

    mix_op="resize" shrinks the whole foreground into the box (ResizeMix, SMC's default);
    mix_op="crop" copies the foreground's own pixels under the box (CutMix, the Table 5 ablation).
    """
    mask = box_mask(box, fg.shape[2], fg.shape[3])
    if mix_op == "resize":
        source = resize_into_boxes(fg, box)
    elif mix_op == "crop":
        source = fg
    else:
        raise ValueError(f"mix_op must be 'resize' or 'crop', got {mix_op!r}")
    return torch.where(mask, source, bg)


def mix_views(fg: torch.Tensor, bg: torch.Tensor, params: BatchParams, out_size: int) -> list[torch.Tensor]:
    """The mixed views of a batch of pairs: uint8 (n, 3, S, S) foregrounds and backgrounds in, one float
    (n, 3, out_size, out_size) tensor in [0, 1] per view out. The canvas size S must equal out_size."""
    if fg.shape[-1] != out_size or fg.shape[-2] != out_size:
        raise ValueError(f"images are {tuple(fg.shape[-2:])}, the canvas is {out_size}x{out_size}")
    box = torch.from_numpy(params.mix.box).to(fg.device, non_blocking=True)
    views = []
    if params.aug_order == "after_mix":
        mixed = paste(fg.float() / 255.0, bg.float() / 255.0, box, params.mix_op)
        for bg_aug in params.bg_aug:
            views.append(augment(mixed, bg_aug, out_size))
        return views
    for fg_aug, bg_aug in zip(params.fg_aug, params.bg_aug):
        views.append(paste(augment(fg, fg_aug, out_size), augment(bg, bg_aug, out_size), box, params.mix_op))
    return views
