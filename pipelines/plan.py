"""The batch plan: everything random about one batch, drawn on the host, laid out in one typed table.

A `Planner` turns (seed, epoch, rank, batch) into a frozen `BatchPlan`: the foreground and background
sample indices, y_f, y_b, λ, whether pairs are mixed, the paste boxes, and every augmentation parameter of
every component view. The plan is one (B, K) array of 4-byte cells whose columns are declared once, in
`plan_layout`, and read by name (`plan["bg0.crop"]`) by every executor: the torch executor copies the whole
table to the device in one transfer; the DALI executor turns columns into per-sample pipeline inputs; the
FFCV executor reads the index columns to build its traversal order. So every backend builds the same batch
from the same plan, and a batch is a pure function of (seed, epoch, rank, batch): resume, DDP and
cross-backend tests rely on that.

Randomness, per docs/method.md, "Foreground sampling" and "Mixing":
- background indices: a shuffled pass over the dataset per epoch, strided over ranks (`sampling.sample_order`);
- whether a batch is mixed (mix.mix_per=batch): one draw per global batch, shared by every rank, so a global
  batch is mixed or not as a whole, as in CMO's single-process code; only inside the epoch window;
- foreground indices: this rank's weighted stream of the epoch (`sampling.sample_order` with the weights),
  read by a batch only if it mixes: an unmixed batch has no foreground, so no executor decodes, resizes or
  pastes one;
- boxes, λ and augmentation parameters: `sampling.batch_generator(seed, epoch, rank, batch)`.

Crop windows are stored relative to each image's own height and width (top, left, height, width as
fractions), so they mean the same on a 32 px CIFAR image in device memory, a 500×375 JPEG decoded by DALI,
and the same photo stored smaller in a .beton: executors scale them by the size of the image they hold.
RandomResizedCrop draws its window on the image's true size, so its aspect-ratio range applies to the photo
itself (never to a squashed copy); test images are resized on the shorter side and centre-cropped.

    planner = Planner.for_training(labels, sizes, aug=AugConfig(), mix=MixConfig(), image_size=32,
                                   batch_size=128, num_views=2, fg_weights=w, seed=0, rank=0, world_size=1,
                                   num_epochs=200)
    plan = planner.plan(epoch=5, batch=0)
    plan["lam"], plan["bg0.crop"], plan.mixed
"""

from __future__ import annotations

from dataclasses import dataclass, field
from threading import Lock
from typing import get_args

import numpy as np

from mixtail.pipelines.config import AugOrder, MixOp
from mixtail.pipelines.ops.augment import AugParams, colour_matrices, sample_aug_params
from mixtail.pipelines.ops.autoaugment import PolicyParams, cutout_boxes, sample_policy_params, without_colour
from mixtail.pipelines.ops.mixing import MixParams, sample_mix_params, shared_mix_params
from mixtail.pipelines.sampling import (batch_box_generator, batch_generator, batch_mixed, batches_per_epoch,
                                        sample_order)

_I4, _F4 = np.dtype(np.int32), np.dtype(np.float32)
AUG_ORDERS, MIX_OPS = get_args(AugOrder), get_args(MixOp)


# --------------------------------------------------------------------------------------------------
# The layout: columns declared once
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    name: str
    width: int  # cells per row; a width-1 column reads as shape (B,)
    dtype: np.dtype  # int32 or float32: every cell is 4 bytes, so the whole table is one buffer


@dataclass(frozen=True)
class PlanLayout:
    """Named columns over a (B, K) table of 4-byte cells (stored as float32; int32 columns are bit views), and
    how a training plan's components become its views: aug_order (which components there are: fg/bg per view,
    or one mixed image per view), mix_op (how a foreground goes into its box) and num_views.

    Executors read those three here and take no arguments for them, so a plan is always rendered the way it
    was drawn: a CutMix plan can never be pasted as ResizeMix by a backend configured apart from its planner.
    """

    columns: tuple[Column, ...]
    aug_order: str = "before_mix"  # mix.aug_order: before_mix | after_mix | none
    mix_op: str = "resize"  # mix.mix_op: resize (ResizeMix, the paper) | crop (CutMix)
    num_views: int = 1
    offsets: dict[str, tuple[int, int, np.dtype]] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        offsets, at = {}, 0
        for c in self.columns:
            if c.name in offsets:
                raise ValueError(f"plan column {c.name!r} is declared twice")
            offsets[c.name] = (at, c.width, c.dtype)
            at += c.width
        object.__setattr__(self, "offsets", offsets)
        if self.aug_order not in AUG_ORDERS:
            raise ValueError(f"aug_order must be one of {', '.join(AUG_ORDERS)}, got {self.aug_order!r}")
        if self.mix_op not in MIX_OPS:
            raise ValueError(f"mix_op must be one of {', '.join(MIX_OPS)}, got {self.mix_op!r}")
        if self.num_views < 1:
            raise ValueError(f"num_views must be at least 1, got {self.num_views}")

    @property
    def width(self) -> int:
        return sum(c.width for c in self.columns)

    def components(self) -> list[str]:
        """The augmented component images of a training plan (component_names of its aug_order and views)."""
        return component_names(self.aug_order, self.num_views)

    @property
    def carries_colour(self) -> bool:
        """Whether the plan has colour columns (else no component's colour changes)."""
        return any(c.name.endswith(".colour_m") for c in self.columns)

    @property
    def carries_policy(self) -> bool:
        """Whether the plan has AutoAugment and Cutout columns (aug.policy autoaugment or cmo_randaug)."""
        return any(c.name.endswith(".aa_op") for c in self.columns)

    def __contains__(self, name: str) -> bool:
        return name in self.offsets

    def empty(self, rows: int) -> np.ndarray:
        return np.zeros((rows, self.width), dtype=np.float32)

    def _slot(self, name: str) -> tuple[int, int, np.dtype]:
        try:
            return self.offsets[name]
        except KeyError:
            raise KeyError(f"the plan has no column {name!r} (it has {', '.join(self.offsets)})") from None

    def read(self, table, name: str):
        """The column `name` of a numpy or torch table, in its dtype: (B,) or (B, width)."""
        at, width, dtype = self._slot(name)
        cells = table[:, at:at + width]
        if dtype == _I4:
            cells = cells.view(np.int32) if isinstance(table, np.ndarray) else cells.view(_torch_int32())
        return cells[:, 0] if width == 1 else cells

    def write(self, table: np.ndarray, name: str, values) -> None:
        at, width, dtype = self._slot(name)
        values = np.asarray(values).astype(dtype, copy=False).reshape(table.shape[0], width)
        table[:, at:at + width] = values.view(np.float32)


def _torch_int32():
    import torch

    return torch.int32


def component_names(aug_order: str, num_views: int) -> list[str]:
    """The augmented component images of a training batch: fg0, bg0, fg1, bg1 (before_mix and none: each
    component of each view), or mx0, mx1 (after_mix: the mixed image of each view)."""
    if aug_order == "after_mix":
        return [f"mx{v}" for v in range(num_views)]
    return [f"{c}{v}" for v in range(num_views) for c in ("fg", "bg")]


def plan_layout(*, train: bool, aug_order: str = "before_mix", num_views: int = 2, colour: bool = True,
                policy: str = "simclr", mix_op: str = "resize") -> PlanLayout:
    """The layout of a training or test plan. `colour`: whether colour parameters are carried at all;
    `policy` (aug.policy): autoaugment and cmo_randaug add each component's AutoAugment ops and Cutout box.
    A test plan is one unmixed, uncropped-but-centred view: it ignores the training arguments."""
    if not train:
        return PlanLayout((Column("index", 1, _I4), Column("y", 1, _I4), Column("crop", 4, _F4)))
    cols = [Column("fg_index", 1, _I4), Column("bg_index", 1, _I4), Column("y_f", 1, _I4), Column("y_b", 1, _I4),
            Column("lam", 1, _F4), Column("mixed", 1, _I4),
            Column("box", 4, _I4)]  # top, left, height, width of the pasted box on the S×S output; 0 if unmixed
    for p in component_names(aug_order, num_views):
        cols += [Column(f"{p}.crop", 4, _F4),  # top, left, height, width: fractions of the image's own size
                 Column(f"{p}.flip", 1, _I4)]
        if colour:
            cols += [Column(f"{p}.colour_m", 9, _F4), Column(f"{p}.colour_t", 3, _F4)]  # x' = M·x + t in [0, 1]
        if policy != "simclr":  # pipelines/ops/autoaugment.py: two op slots applied in order, then Cutout
            cols += [Column(f"{p}.aa_op", 2, _I4),  # op ids, -1 where a slot does not fire
                     Column(f"{p}.aa_mag", 2, _F4),  # signed magnitudes in each op's own units
                     Column(f"{p}.aa_affine", 12, _F4),  # per slot the 2×3 destination-to-source map
                     Column(f"{p}.cutout", 4, _I4)]  # top, left, height, width on the S×S view; 0 if none
    return PlanLayout(tuple(cols), aug_order=aug_order, mix_op=mix_op, num_views=num_views)


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class BatchPlan:
    """One batch, fully decided. `table` is (B, layout.width) float32 storage; read columns by name.

    Training columns: fg_index, bg_index (sample indices), y_f, y_b, lam, mixed, box (top, left, height,
    width on the S×S view) and, per component view (fg0, bg0, fg1, bg1; mx0, mx1 under after_mix), its
    crop (relative to the image's own size), flip and colour transform. Test columns: index, y, crop.
    `plan.layout.columns` lists them; `render_plan` turns a plan into its images.

    >>> import numpy as np, mixtail
    >>> cfg = mixtail.load_config("demo")
    >>> planner = mixtail.build_planner(np.repeat(np.arange(4), [40, 20, 10, 5]), cfg.data, cfg.aug, cfg.mix,
    ...                                 split="train", seed=0)
    >>> plan = planner.plan(epoch=5, batch=0)
    >>> plan.mixed, len(plan), plan["y_f"].dtype, plan["box"].shape
    (True, 64, dtype('int32'), (64, 4))
    >>> bool(np.all(plan["lam"][plan["mixed"] == 1] < 1))  # a mixed pair's label ratio is its pasted area
    True
    """

    epoch: int
    batch: int
    train: bool
    mixed: bool  # whether any pair of the batch is mixed (host-known: executors skip foreground work otherwise)
    colour: bool  # whether any component has a non-identity colour transform
    table: np.ndarray
    layout: PlanLayout

    def __getitem__(self, name: str) -> np.ndarray:
        return self.layout.read(self.table, name)

    def __len__(self) -> int:
        return self.table.shape[0]

    def to(self, device, table=None) -> "DevicePlan":
        """This plan with its table on `device` (one copy; pass `table` if it is already there)."""
        import torch

        if table is None:
            table = torch.from_numpy(self.table).to(device, non_blocking=True)
        return DevicePlan(self, table)


@dataclass(frozen=True, eq=False)
class DevicePlan:
    """A plan whose table is a torch tensor on the device: columns read as torch views, flags from the host."""

    host: BatchPlan
    table: "object"  # torch.Tensor (B, K) float32

    @property
    def mixed(self) -> bool:
        return self.host.mixed

    @property
    def colour(self) -> bool:
        return self.host.colour

    @property
    def layout(self) -> PlanLayout:
        return self.host.layout

    def __getitem__(self, name: str):
        return self.host.layout.read(self.table, name)

    def __len__(self) -> int:
        return len(self.host)


@dataclass(frozen=True)
class _EpochOrders:
    epoch: int
    bg: np.ndarray  # this rank's shuffled pass over the dataset
    fg: np.ndarray  # this rank's weighted draws; batch b reads its slice only if it mixes


class Planner:
    """(epoch, batch) -> BatchPlan for one rank. Pure: the same arguments always give the same plan.

    Use `build_planner` (from the typed configs) or `for_training` / `for_testing`. Thread-safe (the loader
    builds plans ahead on a side thread). `len(planner)` is the number of batches per epoch on this rank.

    >>> import numpy as np, mixtail
    >>> cfg = mixtail.load_config("demo")
    >>> planner = mixtail.build_planner(np.repeat(np.arange(4), [40, 20, 10, 5]), cfg.data, cfg.aug, cfg.mix,
    ...                                 split="train", seed=0, num_epochs=cfg.train.epochs)
    >>> a, b = planner.plan(epoch=5, batch=0), planner.plan(epoch=5, batch=0)
    >>> np.array_equal(a.table, b.table)  # a pure function of (seed, epoch, rank, batch)
    True
    >>> planner.mixing_on(0), planner.mixing_on(5)  # CMO's window: no mixing in the first epochs
    (False, True)
    """

    def __init__(self, *, train: bool, labels: np.ndarray, sizes: np.ndarray | None, image_size: int,
                 batch_size: int, seed: int, rank: int, world_size: int, aug=None, mix=None, num_views: int = 1,
                 fg_weights: np.ndarray | None = None, num_epochs: int | None = None,
                 test_resize_ratio: float = 1.0, drop_last: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.train = train
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_samples = len(self.labels)
        # (N, 2) true height and width of every image; None: every image is image_size × image_size.
        self.sizes = None if sizes is None else np.asarray(sizes, dtype=np.float64).reshape(self.num_samples, 2)
        self.image_size, self.batch_size = image_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.aug, self.mix, self.num_views = aug, mix, num_views
        self.num_epochs = num_epochs
        self.test_resize_ratio = test_resize_ratio
        self.drop_last = drop_last  # training: whether the partial last batch of an epoch is dropped
        if train:
            if fg_weights is None or aug is None or mix is None:
                raise ValueError("a training planner needs aug, mix and fg_weights")
            w = np.asarray(fg_weights, dtype=np.float64)
            if w.shape != (self.num_samples,):
                raise ValueError(f"fg_weights has shape {w.shape}, expected ({self.num_samples},)")
            self.fg_weights = w
            self.layout = plan_layout(train=True, aug_order=mix.aug_order, num_views=num_views,
                                      colour=colour_possible(aug), policy=aug.policy, mix_op=mix.mix_op)
        else:
            self.layout = plan_layout(train=False)
        self._orders: _EpochOrders | None = None
        self._lock = Lock()

    @classmethod
    def for_training(cls, labels, sizes, *, aug, mix, image_size: int, batch_size: int, num_views: int,
                     fg_weights, seed: int, rank: int, world_size: int, num_epochs: int | None,
                     drop_last: bool = True) -> "Planner":
        return cls(train=True, labels=labels, sizes=sizes, image_size=image_size, batch_size=batch_size,
                   seed=seed, rank=rank, world_size=world_size, aug=aug, mix=mix, num_views=num_views,
                   fg_weights=fg_weights, num_epochs=num_epochs, drop_last=drop_last)

    @classmethod
    def for_testing(cls, labels, sizes, *, image_size: int, batch_size: int, rank: int, world_size: int,
                    test_resize_ratio: float = 1.0) -> "Planner":
        return cls(train=False, labels=labels, sizes=sizes, image_size=image_size, batch_size=batch_size,
                   seed=0, rank=rank, world_size=world_size, test_resize_ratio=test_resize_ratio)

    def __len__(self) -> int:
        """Exact batches per epoch on this rank (training drops the partial last batch unless drop_last is
        False; the last batch of a kept tail is shorter, and as long on every rank)."""
        return batches_per_epoch(self.num_samples, self.batch_size, rank=self.rank, world_size=self.world_size,
                                 train=self.train, drop_last=self.drop_last)

    # -- indices ------------------------------------------------------------------------------------

    def _epoch_orders(self, epoch: int) -> _EpochOrders:
        """The epoch's streams from `sampling.sample_order`, the one function every backend samples with."""
        with self._lock:
            if self._orders is None or self._orders.epoch != epoch:
                kw = dict(epoch=epoch, seed=self.seed, rank=self.rank, world_size=self.world_size,
                          num_samples=self.num_samples)
                self._orders = _EpochOrders(epoch, sample_order(None, **kw), sample_order(self.fg_weights, **kw))
            return self._orders

    def mixing_on(self, epoch: int) -> bool:
        """Whether `epoch` lies in the mixing window (with num_epochs=None the window has no end)."""
        return self.mix.active(epoch, self.num_epochs if self.num_epochs is not None else 1 << 62)

    def _mixed_pairs(self, epoch: int, b: int, n: int, rng: np.random.Generator) -> np.ndarray:
        if not self.mixing_on(epoch) or self.mix.mix_prob == 0:
            return np.zeros(n, bool)
        if self.mix.mix_per == "batch":
            return np.full(n, batch_mixed(self.seed, epoch, b, self.mix.mix_prob))
        return rng.random(n) < self.mix.mix_prob

    def indices(self, epoch: int, b: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(background indices, foreground indices or None when the batch mixes nothing): what the FFCV
        executor needs to build its traversal order without drawing whole plans."""
        if not 0 <= b < len(self):
            raise IndexError(f"batch {b} is outside the {len(self)} batches of an epoch")
        if not self.train:
            return np.arange(self.rank, self.num_samples, self.world_size)[b * self.batch_size:(b + 1) * self.batch_size], None
        # Only the batch's first draw (whether pairs mix) is taken, not its boxes and augmentations: a whole
        # epoch's indices then cost a few ms, where drawing every plan twice cost seconds (3 ms a batch of 256).
        bg_idx, fg_idx, mixed = self._train_indices(epoch, b, batch_generator(self.seed, epoch, self.rank, b))
        return bg_idx.astype(np.int64), (fg_idx.astype(np.int64) if mixed.any() else None)

    def _train_indices(self, epoch: int, b: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bg indices, fg indices, mixed pairs) of a training batch, from the first draws of its generator."""
        n = self.batch_size
        orders = self._epoch_orders(epoch)
        bg_idx = orders.bg[b * n:(b + 1) * n]  # shorter for the kept tail (drop_last false)
        mixed = self._mixed_pairs(epoch, b, len(bg_idx), rng)
        # An unmixed batch reads no foreground: no executor decodes, resizes or pastes one.
        fg_idx = np.where(mixed, orders.fg[b * n:(b + 1) * n], bg_idx) if mixed.any() else bg_idx
        return bg_idx, fg_idx, mixed

    # -- plans --------------------------------------------------------------------------------------

    def _size_of(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.sizes is None:
            s = np.full(len(idx), float(self.image_size))
            return s, s.copy()
        return self.sizes[idx, 0], self.sizes[idx, 1]

    def plan(self, epoch: int, batch: int) -> BatchPlan:
        """The plan of batch `batch` (0 .. len − 1) of `epoch` on this rank (test plans ignore the epoch)."""
        if not 0 <= batch < len(self):
            raise IndexError(f"batch {batch} is outside the {len(self)} batches of an epoch")
        return self._train_plan(epoch, batch) if self.train else self._test_plan(batch)

    def _test_plan(self, b: int) -> BatchPlan:
        idx = np.arange(self.rank, self.num_samples, self.world_size)[b * self.batch_size:(b + 1) * self.batch_size]
        table = self.layout.empty(len(idx))
        h, w = self._size_of(idx)
        self.layout.write(table, "index", idx)
        self.layout.write(table, "y", self.labels[idx])
        self.layout.write(table, "crop", centre_crop_windows(h, w, self.test_resize_ratio))
        return BatchPlan(epoch=0, batch=b, train=False, mixed=False, colour=False, table=table, layout=self.layout)

    def _train_plan(self, epoch: int, b: int) -> BatchPlan:
        s = self.image_size
        rng = batch_generator(self.seed, epoch, self.rank, b)
        bg_idx, fg_idx, mixed = self._train_indices(epoch, b, rng)
        n = len(bg_idx)
        if self.mix.box_per == "batch":  # one box for the global batch, from its own stream: the same on every rank
            mp = shared_mix_params(batch_box_generator(self.seed, epoch, b), s, s, self.mix, mixed)
        else:
            mp = sample_mix_params(rng, n, s, s, self.mix, mixed)
        augs, sizes, policies = {}, {}, {}
        for p in self.layout.components():
            if p.startswith("fg") and not mixed.any():
                continue
            # Pad-and-crop shifts by whole output pixels, so it is drawn on the S×S canvas; after_mix augments
            # the mixed image, which lives there too. RandomResizedCrop draws on the image's true size.
            if p.startswith("mx") or self.aug.crop == "pad":
                sizes[p] = (np.full(n, float(s)), np.full(n, float(s)))
            else:
                sizes[p] = self._size_of(fg_idx if p.startswith("fg") else bg_idx)
            augs[p] = sample_aug_params(rng, n, *sizes[p], self.aug, crop=self.mix.aug_order != "none")
            if self.aug.policy != "simclr":  # AutoAugment and Cutout act on the S×S view, after the crop
                policies[p] = sample_policy_params(rng, n, s, s, self.aug)
                augs[p] = without_colour(augs[p], policies[p].autoaugment)
        return pack_train_plan(self.layout, epoch=epoch, batch=b, fg_index=fg_idx, bg_index=bg_idx,
                               labels=self.labels, mix=mp, augs=augs, sizes=sizes, policies=policies, view_size=s)


def pack_train_plan(layout: PlanLayout, *, epoch: int, batch: int, fg_index: np.ndarray, bg_index: np.ndarray,
                    labels: np.ndarray, mix: MixParams, augs: dict[str, AugParams],
                    sizes: dict[str, tuple[np.ndarray, np.ndarray]],
                    policies: dict[str, PolicyParams] | None = None, view_size: int = 0) -> BatchPlan:
    """Lay out one training batch's decisions as a plan. augs: the AugParams of each component of the layout,
    with windows in pixels of the image sizes in `sizes` ((heights, widths) per component); policies: each
    component's AutoAugment/Cutout draws when the layout carries them, on view_size × view_size views; a
    foreground component may be left out when no pair mixes (it is never read)."""
    n = len(bg_index)
    table = layout.empty(n)
    write = layout.write
    y_b = labels[bg_index]
    write(table, "fg_index", fg_index)
    write(table, "bg_index", bg_index)
    write(table, "y_f", np.where(mix.mixed, labels[fg_index], y_b))  # an unmixed sample is its background
    write(table, "y_b", y_b)
    write(table, "lam", mix.lam)
    write(table, "mixed", mix.mixed)
    write(table, "box", mix.box)
    colour_any = False
    has_colour = layout.carries_colour
    for p, aug in augs.items():
        h, w = sizes[p]
        write(table, f"{p}.crop", aug.crop / np.stack([h, w, h, w], 1))
        write(table, f"{p}.flip", aug.flip)
        if has_colour:
            m, t = colour_matrices(aug)
            write(table, f"{p}.colour_m", m.reshape(n, 9))
            write(table, f"{p}.colour_t", t)
            colour_any = colour_any or not aug.is_identity_colour()
        if policies and p in policies:
            pol = policies[p]
            write(table, f"{p}.aa_op", pol.aa.op)
            write(table, f"{p}.aa_mag", pol.aa.magnitude)
            write(table, f"{p}.aa_affine", pol.aa.affine.reshape(n, 12))
            write(table, f"{p}.cutout", cutout_boxes(pol.cutout_centre, pol.cutout_px, view_size, view_size))
    return BatchPlan(epoch=epoch, batch=batch, train=True, mixed=bool(mix.mixed.any()), colour=colour_any,
                     table=table, layout=layout)


def colour_possible(aug) -> bool:
    """Whether an AugConfig can produce any colour change (else plans carry no colour columns)."""
    jitter = aug.color_prob > 0 and (aug.color_jitter > 0 or aug.hue > 0)
    return bool(jitter or aug.grayscale_prob > 0)


def centre_crop_windows(height: np.ndarray, width: np.ndarray, resize_ratio: float) -> np.ndarray:
    """Relative windows of the test protocol: resize the shorter side to S·r, centre-crop S
    (docs/method.md, "The test-time view": r = 8/7 for the 224 px datasets). On the original image that is the
    centred square of side min(h, w)/r; r = 1 keeps the largest centred square (the whole image when it is square)."""
    side = np.minimum(height, width) / resize_ratio
    rh, rw = side / height, side / width
    return np.stack([(1 - rh) / 2, (1 - rw) / 2, rh, rw], axis=1)
