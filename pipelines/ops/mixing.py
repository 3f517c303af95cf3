"""SMC's resize-and-paste mixing (ResizeMix with a normalized ratio), as batched torch ops.

This is the reference every backend is tested against:

1. `sample_mix_params` draws, on the host, each pair's λ and box (the planner, pipelines/plan.py, calls it
   with the pairs it decided to mix);
2. `render_views` runs on the device of the images and executes a plan's augmentation and mixing columns:
   augment foreground and background separately (aug_order: before_mix; `none` keeps them uncropped), resize
   the whole foreground into its box, paste it into the background, and do this for every view with the same
   pair, λ and box (the paper's Eq. 3). The torch executor is this function after a gather; DALI and FFCV
   executors are tested against it;
3. `render_plan` is the same for a whole plan over a dataset's images: it gathers each pair's foreground and
   background by the plan's indices and renders its views (test plans: the one test view), the torch
   backend's batch before normalization.

The label ratio is the exact pasted area after rounding (and clipping): λ = box_h·box_w / (H·W).

    mp = sample_mix_params(np.random.default_rng(0), 128, 32, 32, MixConfig(), mixed=np.ones(128, bool))
    views = render_views(fg_uint8, bg_uint8, plan.to(device), out_size=32)  # list of (B, 3, 32, 32) floats
    views = render_plan(plan, images_uint8, out_size=32)                    # the same, gathered by the plan
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mixtail.pipelines.ops.augment import augment_tensors, box_mask


@dataclass(frozen=True)
class MixParams:
    """Per-pair mixing parameters (numpy)."""

    lam: np.ndarray  # (n,) float32: pasted area / (H·W); 1 where the pair is not mixed
    box: np.ndarray  # (n, 4) int64: top, left, height, width of the pasted box; zero size when not mixed
    mixed: np.ndarray  # (n,) bool


def sample_mix_params(rng: np.random.Generator, n: int, height: int, width: int, cfg, mixed: np.ndarray) -> MixParams:
    """λ' ~ lo + (hi − lo)·Beta(α, α), then each pair's box by mix.box, and λ = the box's exact area / (H·W).

    inside (SMC's ResizeMix): side √λ'·(H, W) rounded half up, position uniform inside the image.
    clipped (CutMix's and CMO's rand_bbox): side int(√λ'·(H, W)), a uniform centre pixel (row, then column),
    the half-side ⌊side/2⌋ on either side of it, clipped at the border; the box is what is left.
    `mixed` (n,) says which pairs mix (the planner decides: per batch or per pair, inside the epoch window);
    the others get λ = 1 and an empty box.
    """
    mixed = np.broadcast_to(np.asarray(mixed, dtype=bool), (n,))
    lo, hi = cfg.ratio_range
    lam_raw = lo + (hi - lo) * rng.beta(cfg.alpha, cfg.alpha, n)
    side = np.sqrt(lam_raw)
    if getattr(cfg, "box", "inside") == "clipped":
        half_h = np.floor(side * height).astype(np.int64) // 2
        half_w = np.floor(side * width).astype(np.int64) // 2
        row = np.floor(rng.random(n) * height).astype(np.int64)
        col = np.floor(rng.random(n) * width).astype(np.int64)
        top, bottom = np.clip(row - half_h, 0, height), np.clip(row + half_h, 0, height)
        left, right = np.clip(col - half_w, 0, width), np.clip(col + half_w, 0, width)
        bh, bw = bottom - top, right - left
    else:
        bh = np.floor(side * height + 0.5).astype(np.int64)
        bw = np.floor(side * width + 0.5).astype(np.int64)
        top = np.floor(rng.random(n) * (height - bh + 1)).astype(np.int64)
        left = np.floor(rng.random(n) * (width - bw + 1)).astype(np.int64)
    box = np.stack([top, left, bh, bw], axis=1) * mixed[:, None]
    lam = np.where(mixed, (bh * bw) / (height * width), 1.0).astype(np.float32)
    return MixParams(lam, box.astype(np.int64), mixed.copy())


def shared_mix_params(rng: np.random.Generator, height: int, width: int, cfg, mixed: np.ndarray) -> MixParams:
    """mix.box_per=batch: one λ' and box drawn from `rng` (a generator of the global batch, the same on every
    rank) for every mixed pair of the batch, as CutMix's and CMO's code draw them; unmixed pairs as above."""
    mixed = np.asarray(mixed, dtype=bool)
    one = sample_mix_params(rng, 1, height, width, cfg, np.ones(1, bool))
    box = np.repeat(one.box, len(mixed), axis=0) * mixed[:, None]
    lam = np.where(mixed, one.lam[0], 1.0).astype(np.float32)
    return MixParams(lam, box.astype(np.int64), mixed.copy())


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


def _pixel_windows(rel: torch.Tensor, valid_hw: torch.Tensor | None, canvas_hw: tuple[int, int]) -> torch.Tensor:
    """Relative (top, left, height, width) windows -> pixels of each image's valid region on its canvas."""
    if valid_hw is None:  # scalars, not a tensor made on the host: a CUDA graph can hold this (PlanRender)
        h, w = canvas_hw
        return torch.stack([rel[:, 0] * h, rel[:, 1] * w, rel[:, 2] * h, rel[:, 3] * w], dim=1)
    hw = valid_hw.to(rel.dtype)
    return rel * torch.cat([hw, hw], dim=1)


def render_component(images: torch.Tensor, plan, name: str, out_size: int, valid_hw: torch.Tensor | None = None,
                     ) -> torch.Tensor:
    """One component view of a plan: uint8 or float (n, 3, H, W) canvas images -> float (n, 3, S, S) in [0, 1]:
    its crop window (relative to each image's valid region `valid_hw`, (n, 2), or the whole canvas), flip,
    and colour transform."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    crop = _pixel_windows(plan[f"{name}.crop"], valid_hw, (x.shape[2], x.shape[3]))
    colour = plan.colour and f"{name}.colour_m" in plan.layout
    m = plan[f"{name}.colour_m"].reshape(-1, 3, 3) if colour else None
    t = plan[f"{name}.colour_t"] if colour else None
    x = augment_tensors(x, crop, plan[f"{name}.flip"], m, t, out_size)
    if f"{name}.aa_op" in plan.layout:
        x = _policy_ops(x, plan, name)
    return x


def _policy_ops(x: torch.Tensor, plan, name: str) -> torch.Tensor:
    """aug.policy's AutoAugment ops, then Cutout, on a cropped and flipped view (pipelines/ops/autoaugment.py;
    AutoAugment rows drew no colour jitter, so jitter-then-policy is the policy's own order). Which rows take
    which op is read from the host copy of the plan, as apply_autoaugment wants."""
    from mixtail.pipelines.ops.autoaugment import AutoAugmentParams, apply_autoaugment

    host = getattr(plan, "host", plan)
    op = host[f"{name}.aa_op"]
    params = AutoAugmentParams(np.full(len(op), -1, np.int8), op.astype(np.int8), host[f"{name}.aa_mag"],
                               host[f"{name}.aa_affine"].reshape(-1, 2, 2, 3))
    x = apply_autoaugment(x, params)
    box = plan[f"{name}.cutout"].long()
    if bool((host[f"{name}.cutout"][:, 2:] > 0).any()):
        x = torch.where(box_mask(box, x.shape[2], x.shape[3]), torch.zeros((), dtype=x.dtype, device=x.device), x)
    return x


def whole_image(images: torch.Tensor, out_size: int, valid_hw: torch.Tensor | None = None) -> torch.Tensor:
    """Each image's valid region resampled to out_size × out_size (after_mix mixes images at the canvas size)."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    n = x.shape[0]
    # The whole valid region, (0, 0, 1, 1), filled on the device: no tensor from host data (PlanRender).
    rel = torch.cat([torch.zeros(n, 2, device=x.device), torch.ones(n, 2, device=x.device)], dim=1)
    crop = _pixel_windows(rel, valid_hw, (x.shape[2], x.shape[3]))
    if valid_hw is None and x.shape[2] == x.shape[3] == out_size:
        return x
    return augment_tensors(x, crop, torch.zeros(n, dtype=torch.bool, device=x.device), None, None, out_size)


def render_test_view(images: torch.Tensor, plan, out_size: int, valid_hw: torch.Tensor | None = None) -> torch.Tensor:
    """A test plan's view: uint8 or float (n, 3, H, W) canvas images -> float (n, 3, S, S) in [0, 1], each
    image's window (the plan's "crop", relative to its valid region `valid_hw` or the whole canvas) resized to
    S. Images that already are S×S, fill their canvas and are asked for whole (CIFAR) are used as they are."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    n, _, h, w = x.shape
    host = getattr(plan, "host", plan)  # the window test reads the host copy: no device sync
    if valid_hw is None and h == w == out_size and np.array_equal(host["crop"], np.tile([0, 0, 1, 1], (n, 1))):
        return x
    crop = _pixel_windows(plan["crop"], valid_hw, (h, w))
    return augment_tensors(x, crop, torch.zeros(n, dtype=torch.bool, device=x.device), None, None, out_size)


def render_views(fg: torch.Tensor | None, bg: torch.Tensor, plan, *, out_size: int,
                 fg_hw: torch.Tensor | None = None, bg_hw: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The mixed views of a batch: gathered foreground and background canvases (uint8 (n, 3, H, W)) and a plan
    on their device in; one float (n, 3, out_size, out_size) tensor in [0, 1] per view out. How the components
    combine (aug_order, mix_op, the number of views) is the plan layout's, as the planner drew it.

    fg may be None when the plan mixes nothing (the planner then drew no foreground). fg_hw / bg_hw: the valid
    (height, width) of each image on its canvas, or None when every image fills the canvas.
    """
    layout = plan.layout
    mix_op, num_views = layout.mix_op, layout.num_views
    box = plan["box"].long()
    views = []
    if layout.aug_order == "after_mix":
        mixed = whole_image(bg, out_size, bg_hw)
        if plan.mixed:
            mixed = paste(whole_image(fg, out_size, fg_hw), mixed, box, mix_op)
        return [render_component(mixed, plan, f"mx{v}", out_size) for v in range(num_views)]
    for v in range(num_views):
        view = render_component(bg, plan, f"bg{v}", out_size, bg_hw)
        if plan.mixed:
            view = paste(render_component(fg, plan, f"fg{v}", out_size, fg_hw), view, box, mix_op)
        views.append(view)
    return views


def render_plan(plan, images: torch.Tensor, *, out_size: int, sizes: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The views a plan describes, made from a whole dataset's images by the reference ops.

    plan: a BatchPlan from a Planner (its table is copied to the images' device) or a DevicePlan.
    images: (N, 3, H, W) uint8 canvases (or floats in [0, 1]) on any device, indexed by the plan's sample
    indices; sizes: (N, 2) valid (height, width) of each image on its canvas, or None when every image fills
    it. The plan's layout says how its components combine (mix.aug_order, mix.mix_op, data.num_views as the
    planner drew them), so nothing here can render it another way. Returns one float (B, 3, out_size,
    out_size) tensor in [0, 1] per view (a test plan: its one view), unnormalized: the torch backend's batch
    before `normalize_views`, and what to look at when checking a plan.

    >>> import numpy as np, torch, mixtail
    >>> cfg = mixtail.load_config("demo")
    >>> labels = np.repeat(np.arange(4), [40, 20, 10, 5])
    >>> images = torch.randint(0, 256, (len(labels), 3, 32, 32), dtype=torch.uint8)
    >>> planner = mixtail.build_planner(labels, cfg.data, cfg.aug, cfg.mix, split="train", seed=0)
    >>> views = mixtail.render_plan(planner.plan(epoch=5, batch=0), images, out_size=32)
    >>> len(views), views[0].shape, bool(views[0].min() >= 0 and views[0].max() <= 1)
    (2, torch.Size([64, 3, 32, 32]), True)
    """
    if not hasattr(plan, "host"):  # a host BatchPlan: its table on the images' device, in one copy
        plan = plan.to(images.device)

    def valid_hw(idx: torch.Tensor) -> torch.Tensor | None:
        return None if sizes is None else sizes[idx]

    if not plan.host.train:
        idx = plan["index"].long()
        return [render_test_view(images[idx], plan, out_size, valid_hw(idx))]
    bg_idx = plan["bg_index"].long()
    fg_idx = plan["fg_index"].long() if plan.mixed else None
    return render_views(images[fg_idx] if plan.mixed else None, images[bg_idx], plan, out_size=out_size,
                        fg_hw=valid_hw(fg_idx) if plan.mixed else None, bg_hw=valid_hw(bg_idx))
