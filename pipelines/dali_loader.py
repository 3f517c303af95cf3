"""The NVIDIA DALI backend: decode, per-component augmentation, resize-and-paste mixing and normalization
in a DALI pipeline, on the GPU (`mixed` decode, GPU ops) or, with device_id=None, on the CPU.

It implements the `Loader` interface of base.py with the torch loader's semantics, and draws every random
number from the same place as the torch loader, so both backends produce the same batch up to
interpolation:

- Sampling: `sampling.sample_order` gives this rank's uniform background stream and weighted foreground
  stream for an epoch (DALI has no weighted reader: DALI issues 1356, 3047 and 3811 point to
  external_source fed by your own sampler, which is what this is).
- Parameters: each batch's λ, box, crop windows, flips and colour matrices come from
  `mixing.sample_batch_params(sampling.batch_generator(seed, epoch, rank, batch), ...)`, the draw the
  torch loader makes, and reach the pipeline per sample as external_source argument inputs.
- One `fn.external_source(parallel=True, batch=True)` callback (`_BatchSource`) runs in Python worker
  processes and computes whole batches ahead (its `prefetch_queue_depth`): the indices, what they point
  to (image paths, or the uint8 pixels of an in-memory dataset) and the parameters. Paths are read by
  `fn.io.file.read` in DALI's own C++ threads, so JPEG bytes never pass through Python or shared memory.
  Sampling never stalls the device: workers stay `prefetch_queue_depth` batches ahead and DALI's
  pipeline a further `prefetch_queue_depth` iterations.

Per pair and view, on the device (SPEC "augment before mixing", Eq. 3):

    decode ─┬─ view v: crop window (fn.slice) → resize to S×S with the flip folded into the ROI
            │          (fn.resize roi_start > roi_end mirrors) → colour (fn.coord_transform with the
            │          per-image 3×3 M and offset T of augment.colour_matrices) → clamp
            └─ foreground view → fn.resize (antialias=False) with a ROI that shrinks the whole image
               into its box on an S×S canvas → fn.multi_paste of that box onto the background view
               → fn.crop_mirror_normalize (mean/std·255, HWC float)

The crop window is cut out first and then resized, as the reference does (augment.sampling_grid clamps to
the window: crop-then-resize, never blending pixels outside the window); fn.resize's own ROI would clamp
at the image border instead. fn.multi_paste does not scale (ENV.md), hence the explicit resize before it.
Both paste inputs are S×S and no paste region is ever empty (a pair without a box is fed its background
as foreground too, with a full-canvas box): see `_paste` and `covered` for the GPU kernel reasons.

Crop windows and files. The windows are drawn on the S×S canvas, as the torch loader sees every image
(datasets.decode_images squashes a file to S×S). For an image file of another size the window is applied
in relative coordinates of the decoded original (fn.slice rel_start/rel_end), which is the same geometry
as the torch loader's squash-then-crop, without the intermediate resampling. Consequences: every batch is
reproducible from (seed, epoch, rank, batch) alone, independent of threads, workers and device, and no
image size is needed on the host; the aspect-ratio range of RandomResizedCrop applies to the squashed
image, exactly as in the torch loader (not to the original photo as torchvision's transform on a PIL
image would). We do not use the fused `decoders.image_random_crop`: it draws from DALI's own RNG, and
both views need their own crop of the same image, so it would decode every image twice.

Epochs. The callback serves an endless stream of batches: stream position g is batch (b0 + g) mod L of
epoch e0 + (b0 + g) div L, where (e0, b0) is where the pipeline was started. Iterating an epoch takes
exactly len(self) − start_batch batches; the next epoch continues the same stream with no pipeline
reset. Only when set_epoch asks for something other than the next batch of the stream (a resume, or an
epoch abandoned part-way) is the pipeline rebuilt at the requested position.

    python -m mixtail.pipelines.dali_loader --photos ../shared/data/photos --size 64 --batches 5
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, fields
from typing import Any, Iterator

import numpy as np
import torch

try:
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import Pipeline
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
except ImportError as err:  # build_loader turns this into an install hint
    raise ImportError(f"the DALI backend needs nvidia-dali (pip install 'mixtail[dali]'): {err}") from err

from mixtail.pipelines.augment import AugParams, colour_matrices
from mixtail.pipelines.base import Batch, rank_batch_size
from mixtail.pipelines.datasets import ImageArrays, ImageFiles, build_dataset
from mixtail.pipelines.mixing import BatchParams, mixing_active, sample_batch_params
from mixtail.pipelines.sampling import (batch_generator, batches_per_epoch, class_counts, foreground_weights,
                                        sample_order, samples_per_rank)

# --------------------------------------------------------------------------------------------------
# The graph: which per-sample inputs it needs, how a BatchParams becomes those inputs, and the ops
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphSpec:
    """Everything static about a pipeline graph (the per-batch values arrive through external_source)."""

    size: int  # S: side of the square canvas and of the output
    num_views: int
    source: str  # "arrays": uint8 (S, S, 3) pixels; "files": paths of encoded images
    crop: str  # aug.crop: "pad" (CIFAR pad-and-crop) | "resized" (RandomResizedCrop)
    aug_order: str  # mix.aug_order: before_mix | after_mix | none
    mix_op: str  # mix.mix_op: resize | crop
    colour: bool  # whether any colour augmentation can happen (else the colour ops are left out)
    mean: tuple[float, float, float]  # in [0, 1] units, as trainer.config.normalization gives them
    std: tuple[float, float, float]
    gpu: bool  # ops on the GPU, decoding "mixed"; False: everything on the CPU

    @property
    def relative_crops(self) -> bool:
        """Crop windows applied in relative coordinates of the decoded file (see the module docstring)."""
        return self.source == "files" and self.crop == "resized" and self.aug_order == "before_mix"

    def augmented_components(self) -> list[str]:
        """Prefixes of the per-view augmented images: fg0, bg0, fg1, ... (after_mix: the mixed image)."""
        if self.aug_order == "none":
            return []
        if self.aug_order == "after_mix":
            return [f"mx{v}" for v in range(self.num_views)]
        return [f"{c}{v}" for v in range(self.num_views) for c in ("fg", "bg")]


_U8, _I32, _I64, _F32 = types.UINT8, types.INT32, types.INT64, types.FLOAT


def input_spec(spec: GraphSpec, train: bool) -> list[tuple[str, Any, int]]:
    """(name, DALI dtype, per-sample ndim) of every external_source output, in callback order."""
    src_ndim = 3 if spec.source == "arrays" else 1  # HWC pixels or a 1-D encoded path
    out = [("fg", _U8, src_ndim), ("bg", _U8, src_ndim)] if train else [("img", _U8, src_ndim)]
    out += [("y_f", _I64, 0), ("y_b", _I64, 0), ("lam", _F32, 0)] if train else [("y", _I64, 0)]
    if not train:
        return out
    for p in spec.augmented_components():
        if spec.crop == "pad":
            out += [(f"{p}_start", _I32, 1), (f"{p}_flip", _I32, 0)]
        elif spec.relative_crops:
            out += [(f"{p}_rel_start", _F32, 1), (f"{p}_rel_end", _F32, 1),
                    (f"{p}_roi_start", _F32, 1), (f"{p}_roi_end", _F32, 1)]
        else:
            out += [(f"{p}_start", _I32, 1), (f"{p}_shape", _I32, 1),
                    (f"{p}_roi_start", _F32, 1), (f"{p}_roi_end", _F32, 1)]
        if spec.colour:
            out += [(f"{p}_M", _F32, 2), (f"{p}_T", _F32, 1)]
    out += [("paste_shapes", _I32, 2), ("paste_anchors", _I32, 2)]
    if spec.mix_op == "resize":
        out += [("box_roi_start", _F32, 1), ("box_roi_end", _F32, 1)]
    return out


def covered(params: BatchParams) -> np.ndarray:
    """(n,) bool: pairs whose foreground box is non-empty.

    The others (unmixed pairs, and a mixed pair whose box rounded to zero size) must come out as their
    augmented background. The graph gets them with no empty paste region: the loader feeds the background
    as the foreground too, with the background's augmentation and a full-canvas box, so region 1 repaints
    the same pixels. (Empty regions are avoided on purpose: fn.multi_paste's GPU kernel splits the canvas
    into patches by an event sweep over region edges, and by our reading of kernels/imgproc/paste/
    paste_gpu.h a zero-extent region is opened and never closed, so it would cover later patches. The CPU
    operator copies region by region and handles empty regions fine; the GPU one is unverified here.)
    """
    box = params.mix.box
    return (box[:, 2] > 0) & (box[:, 3] > 0)


def _aug_arrays(spec: GraphSpec, p: AugParams, prefix: str) -> dict[str, np.ndarray]:
    """One view's augmentation of one component as per-sample argument arrays."""
    s = spec.size
    top, left, h, w = (p.crop[:, k].astype(np.float64) for k in range(4))
    flip = p.flip.astype(np.float32)
    out: dict[str, np.ndarray] = {}
    if spec.crop == "pad":
        out[f"{prefix}_start"] = np.stack([top, left], 1).astype(np.int32)
        out[f"{prefix}_flip"] = p.flip.astype(np.int32)
    else:
        if spec.relative_crops:
            out[f"{prefix}_rel_start"] = np.clip(np.stack([top, left], 1) / s, 0, 1).astype(np.float32)
            out[f"{prefix}_rel_end"] = np.clip(np.stack([top + h, left + w], 1) / s, 0, 1).astype(np.float32)
        else:
            out[f"{prefix}_start"] = np.stack([top, left], 1).astype(np.int32)
            out[f"{prefix}_shape"] = np.stack([h, w], 1).astype(np.int32)
        # The flip is folded into the resize: a ROI whose start exceeds its end is mirrored (fn.resize docs).
        zeros, ones = np.zeros_like(flip), np.ones_like(flip)
        out[f"{prefix}_roi_start"] = np.stack([zeros, flip], 1)
        out[f"{prefix}_roi_end"] = np.stack([ones, 1 - flip], 1)
    if spec.colour:
        m, t = colour_matrices(p)
        out[f"{prefix}_M"] = np.ascontiguousarray(m, dtype=np.float32)
        out[f"{prefix}_T"] = (t * 255.0).astype(np.float32)  # the pipeline works in 0..255 units
    return out


def _rows(take: np.ndarray, a: AugParams, b: AugParams) -> AugParams:
    """a's parameters, with b's in the rows where `take` is True."""
    return AugParams(**{f.name: np.where(take.reshape((-1,) + (1,) * (getattr(a, f.name).ndim - 1)),
                                         getattr(b, f.name), getattr(a, f.name)) for f in fields(AugParams)})


def param_arrays(spec: GraphSpec, params: BatchParams) -> dict[str, np.ndarray]:
    """The per-sample argument inputs of one batch: every random value comes from `params`.

    The caller feeds the background as the foreground of the pairs that are not `covered`.
    """
    if params.aug_order != spec.aug_order or params.mix_op != spec.mix_op:
        raise ValueError(f"params were drawn for aug_order={params.aug_order!r}, mix_op={params.mix_op!r}; "
                         f"the graph has {spec.aug_order!r}, {spec.mix_op!r}")
    n, s = len(params.mix.lam), spec.size
    cover = covered(params)
    out: dict[str, np.ndarray] = {}
    for prefix in spec.augmented_components():
        kind, v = prefix[:2], int(prefix[2:])
        if kind == "fg":
            p = _rows(~cover, params.fg_aug[v], params.bg_aug[v])
        else:  # bg, or after_mix's mixed image, which takes the background's draw as mixing.mix_views does
            p = params.bg_aug[v]
        out.update(_aug_arrays(spec, p, prefix))
    box = np.where(cover[:, None], params.mix.box, np.array([0, 0, s, s]))  # (n, 4) top, left, h, w
    shapes = np.zeros((n, 2, 2), np.int32)
    shapes[:, 0] = s  # region 0: the whole background
    shapes[:, 1] = box[:, 2:4]  # region 1: the foreground box, pasted last so it wins
    anchors = np.zeros((n, 2, 2), np.int32)
    anchors[:, 1] = box[:, 0:2]  # read from and written to the same place (see _paste)
    out["paste_shapes"], out["paste_anchors"] = shapes, anchors
    if spec.mix_op == "resize":
        # The ROI that makes fn.resize(fg, size=[S, S]) put the whole foreground, shrunk, exactly into the
        # box: output pixel y reads source (y − top + ½)·S/h − ½, mixing.resize_into_boxes' sampling.
        # The ROI reaches outside the image; fn.resize clamps there, as grid_sample's border padding does.
        top, left, h, w = (box[:, k].astype(np.float64) for k in range(4))
        start = np.stack([-top * s / h, -left * s / w], 1)
        out["box_roi_start"] = start.astype(np.float32)
        out["box_roi_end"] = (start + np.stack([s * s / h, s * s / w], 1)).astype(np.float32)
    return out


def _load(spec: GraphSpec, src):
    """Decoded uint8 HWC images on the pipeline's device."""
    if spec.source == "files":
        encoded = fn.io.file.read(src)
        return fn.decoders.image(encoded, device="mixed" if spec.gpu else "cpu", output_type=types.RGB)
    return src.gpu() if spec.gpu else src


def _canvas(spec: GraphSpec, img, dtype=None):
    """The image on the S×S canvas (files are squashed, antialiased, as datasets.decode_images does)."""
    if spec.source == "files":
        kw = {"dtype": dtype} if dtype is not None else {}
        return fn.resize(img, size=[spec.size, spec.size], antialias=True, **kw)
    return fn.cast(img, dtype=dtype) if dtype is not None else img


def _augment(spec: GraphSpec, img, inp: dict, prefix: str, on_canvas: bool):
    """Crop window, flip and colour of one component view: float32 (S, S, 3) in 0..255."""
    s = spec.size
    if spec.crop == "pad":
        x = img if on_canvas else _canvas(spec, img)
        # Pad-and-crop is an integer shift with zero fill: exact, no resampling.
        x = fn.slice(x, start=inp[f"{prefix}_start"], shape=[s, s], axis_names="HW", out_of_bounds_policy="pad")
        x = fn.flip(x, horizontal=inp[f"{prefix}_flip"])
        x = fn.cast(x, dtype=_F32)
    else:
        if spec.relative_crops and not on_canvas:
            x = fn.slice(img, rel_start=inp[f"{prefix}_rel_start"], rel_end=inp[f"{prefix}_rel_end"],
                         axis_names="HW")
        else:
            x = fn.slice(img, start=inp[f"{prefix}_start"], shape=inp[f"{prefix}_shape"], axis_names="HW")
        # antialias=True only matters when a file's window is larger than S (downscaling); canvas windows
        # are never larger than S, so they are plain bilinear, as the reference's grid_sample.
        x = fn.resize(x, size=[s, s], roi_start=inp[f"{prefix}_roi_start"], roi_end=inp[f"{prefix}_roi_end"],
                      roi_relative=True, antialias=True, interp_type=types.INTERP_LINEAR, dtype=_F32)
    if spec.colour:
        x = fn.coord_transform(x, M=inp[f"{prefix}_M"], T=inp[f"{prefix}_T"], dtype=_F32)
        x = dmath.clamp(x, 0.0, 255.0)
    return x


def _paste(spec: GraphSpec, fg, bg, inp: dict):
    """x̃ = M ⊙ R(x_f) + (1 − M) ⊙ x_b: background as region 0, the foreground box as region 1.

    Both inputs are S×S: resize mode resizes the foreground onto the whole canvas with a ROI that puts
    the shrunk image at the box (param_arrays), and region 1 copies the box from there. Equal input
    shapes keep us safe from fn.multi_paste's multi-input GPU setup, which in the DALI source we read
    (operators/image/paste/multipaste.cu, after PR 5331) takes every input's shapes, hence row pitches,
    from input 0: a smaller foreground input would be read with the background's pitch.
    """
    s = spec.size
    if spec.mix_op == "resize":
        # antialias=False: the reference (mixing.resize_into_boxes) is plain bilinear grid sampling with
        # align_corners=False semantics; DALI's antialiased downscale would low-pass the foreground.
        fg = fn.resize(fg, size=[s, s], roi_start=inp["box_roi_start"], roi_end=inp["box_roi_end"],
                       antialias=False, interp_type=types.INTERP_LINEAR, dtype=_F32)
    return fn.multi_paste(bg, fg, in_anchors=inp["paste_anchors"], shapes=inp["paste_shapes"],
                          out_anchors=inp["paste_anchors"], output_size=[s, s])


def _normalize(spec: GraphSpec, x):
    mean = [255.0 * m for m in spec.mean]
    std = [255.0 * v for v in spec.std]
    return fn.crop_mirror_normalize(x, mean=mean, std=std, output_layout="HWC", dtype=_F32)


def train_graph(spec: GraphSpec, inp: dict) -> list:
    """Outputs: view 0..V−1 as normalized float (S, S, 3), then y_f, y_b, lam."""
    fg, bg = _load(spec, inp["fg"]), _load(spec, inp["bg"])
    views = []
    if spec.aug_order == "after_mix":
        mixed = _paste(spec, _canvas(spec, fg, _F32), _canvas(spec, bg, _F32), inp)
        views = [_augment(spec, mixed, inp, f"mx{v}", on_canvas=True) for v in range(spec.num_views)]
    elif spec.aug_order == "none":
        mixed = _paste(spec, _canvas(spec, fg, _F32), _canvas(spec, bg, _F32), inp)
        views = [mixed] * spec.num_views
    else:
        for v in range(spec.num_views):
            f = _augment(spec, fg, inp, f"fg{v}", on_canvas=False)
            b = _augment(spec, bg, inp, f"bg{v}", on_canvas=False)
            views.append(_paste(spec, f, b, inp))
    labels = [inp["y_f"], inp["y_b"], inp["lam"]]
    if spec.gpu:
        labels = [t.gpu() for t in labels]
    return [_normalize(spec, x) for x in views] + labels


def eval_graph(spec: GraphSpec, inp: dict) -> list:
    """Outputs: the normalized (S, S, 3) image, then its label."""
    x = _canvas(spec, _load(spec, inp["img"]))
    return [_normalize(spec, x), inp["y"].gpu() if spec.gpu else inp["y"]]


# --------------------------------------------------------------------------------------------------
# The parallel external_source callback
# --------------------------------------------------------------------------------------------------


def _encode_paths(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All paths as one uint8 blob plus offsets: compact to pickle into spawned workers, and each sample
    is a zero-copy view (the 1-D byte array fn.io.file.read expects)."""
    encoded = [f.encode("utf-8") for f in files]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(e) for e in encoded])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


class _BatchSource:
    """Batch-mode callback for fn.external_source(parallel=True): iteration g -> one batch's inputs.

    It is a pure function of g and what the constructor got (the per-epoch sample orders are memoized
    per worker), as DALI requires of parallel callbacks: any worker can compute any batch.
    """

    def __init__(self, *, spec: GraphSpec, train: bool, names: list[str], images: np.ndarray | None,
                 files: list[str] | None, labels: np.ndarray, fg_weights: np.ndarray | None, batch_size: int,
                 num_batches: int, aug, mix, seed: int, rank: int, world_size: int, epoch0: int, batch0: int):
        self.spec, self.train, self.names = spec, train, names
        self.images = images
        self.path_blob, self.path_offsets = _encode_paths(files) if files is not None else (None, None)
        self.labels = labels
        self.fg_weights = fg_weights
        self.batch_size, self.num_batches = batch_size, num_batches
        self.aug, self.mix = aug, mix
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch0, self.batch0 = epoch0, batch0
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _sources(self, idx: np.ndarray):
        if self.images is not None:
            return self.images[idx]  # (n, S, S, 3): a batch in one array
        blob, off = self.path_blob, self.path_offsets
        return [blob[off[i]:off[i + 1]] for i in idx]

    def _epoch_orders(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self._orders:
            kw = dict(epoch=epoch, seed=self.seed, rank=self.rank, world_size=self.world_size,
                      num_samples=len(self.labels))
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}  # keep at most two
            self._orders[epoch] = (sample_order(None, **kw), sample_order(self.fg_weights, **kw))
        return self._orders[epoch]

    def __call__(self, iteration: int) -> tuple:
        position = self.batch0 + int(iteration)
        epoch, b = self.epoch0 + position // self.num_batches, position % self.num_batches
        bs = self.batch_size
        if not self.train:
            idx = np.arange(self.rank, len(self.labels), self.world_size)[b * bs:(b + 1) * bs]
            values = {"img": self._sources(idx), "y": self.labels[idx]}
            return tuple(values[name] for name in self.names)
        bg_order, fg_order = self._epoch_orders(epoch)
        fg_idx, bg_idx = fg_order[b * bs:(b + 1) * bs], bg_order[b * bs:(b + 1) * bs]
        rng = batch_generator(self.seed, epoch, self.rank, b)
        params = sample_batch_params(rng, bs, self.spec.size, self.aug, self.mix, mixing_active(self.mix, epoch, None),
                                     self.spec.num_views)
        y_b = self.labels[bg_idx]
        values: dict[str, Any] = {
            # Pairs with no box show their background: it is fed as their foreground too (see `covered`).
            "fg": self._sources(np.where(covered(params), fg_idx, bg_idx)), "bg": self._sources(bg_idx),
            "y_f": np.where(params.mix.mixed, self.labels[fg_idx], y_b),  # an unmixed sample is its background
            "y_b": y_b, "lam": params.mix.lam.astype(np.float32),
        }
        values.update(param_arrays(self.spec, params))
        return tuple(values[name] for name in self.names)


# --------------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------------


def _colour_possible(aug, mix) -> bool:
    if mix.aug_order == "none":
        return False
    jitter = aug.color_prob > 0 and (aug.color_jitter > 0 or aug.hue > 0)
    return bool(jitter or aug.grayscale_prob > 0)


class DaliLoader:
    """The Loader interface over a DALI pipeline (see the module docstring)."""

    def __init__(self, dataset: ImageArrays | ImageFiles, *, train: bool, batch_size: int, aug, mix,
                 num_views: int, fg_sampling: str, fg_gamma: float, mean, std, rank: int, world_size: int,
                 device: torch.device | str, seed: int, image_size: int, num_threads: int = 4,
                 py_workers: int | None = None, prefetch: int = 2, channels_last: bool = True,
                 py_start_method: str | None = None):
        if isinstance(dataset, ImageArrays):
            n, h, w, c = dataset.images.shape
            if h != image_size or w != image_size or c != 3:
                raise ValueError(f"in-memory images are (N, H, W, C) = {dataset.images.shape}; the DALI loader "
                                 f"needs (N, {image_size}, {image_size}, 3) for data.image_size={image_size}")
            source = "arrays"
        elif isinstance(dataset, ImageFiles):
            if not dataset.files:
                raise ValueError("the dataset has no files")
            if not os.path.isfile(dataset.files[0]):
                raise FileNotFoundError(f"image {dataset.files[0]} (the first of {len(dataset.files)} in the "
                                        f"dataset) does not exist: check data.root and the file list")
            source = "files"
        else:
            raise TypeError(f"dataset must be ImageArrays or ImageFiles, got {type(dataset).__name__}")
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"the DALI loader runs on cpu or cuda, got device {self.device}")
        self.train = train
        self.batch_size = batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.aug, self.mix, self.num_views = aug, mix, num_views if train else 1
        self.channels_last = channels_last
        self.dataset = dataset
        self.num_samples = len(dataset)
        self.num_classes = len(dataset.classes)
        self.classes = dataset.classes
        self.class_counts = class_counts(dataset.labels, self.num_classes)
        self.fg_weights = foreground_weights(dataset.labels, self.num_classes, fg_sampling, fg_gamma) if train else None
        if train and samples_per_rank(self.num_samples, world_size) < batch_size:
            raise ValueError(f"{self.num_samples} training images over {world_size} ranks do not fill one batch "
                             f"of {batch_size}")
        self.spec = GraphSpec(size=image_size, num_views=self.num_views, source=source, crop=aug.crop,
                              aug_order=mix.aug_order, mix_op=mix.mix_op, colour=train and _colour_possible(aug, mix),
                              mean=tuple(mean), std=tuple(std), gpu=self.device.type == "cuda")
        self.num_threads = num_threads
        # Python workers only draw indices and parameters and slice paths (or gather small arrays): a few
        # keep well ahead of the GPU. DALI's C++ threads do the reading and CPU-side decoding.
        self.py_workers = py_workers if py_workers is not None else max(1, min(4, num_threads // 2))
        self.prefetch = prefetch
        if py_start_method not in (None, "fork", "spawn"):
            raise ValueError(f"py_start_method must be 'fork', 'spawn' or None (auto), got {py_start_method!r}")
        self.py_start_method = py_start_method
        self.epoch, self.start_batch = 0, 0
        self._pipe: Pipeline | None = None
        self._iter: DALIGenericIterator | None = None
        self._next: tuple[int, int] | None = None  # (epoch, batch) the running pipeline delivers next

    @classmethod
    def from_config(cls, data, aug, mix, *, split: str, rank: int, world_size: int, device, seed: int,
                    **kwargs) -> "DaliLoader":
        from mixtail.pipelines.config import normalization

        dataset = build_dataset(data, split, decoded=False)
        mean, std = normalization(data)
        train = split == "train"
        return cls(dataset, train=train, batch_size=rank_batch_size(data, split, world_size),
                   aug=aug, mix=mix, num_views=data.num_views, fg_sampling=data.fg_sampling, fg_gamma=data.fg_gamma,
                   mean=mean, std=std, rank=rank, world_size=world_size, device=device, seed=seed,
                   image_size=data.image_size, num_threads=data.num_threads, **kwargs)

    def __len__(self) -> int:
        return batches_per_epoch(self.num_samples, self.batch_size, rank=self.rank, world_size=self.world_size,
                                 train=self.train)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    # -- pipeline management -------------------------------------------------------------------------

    def _successor(self, epoch: int, b: int) -> tuple[int, int]:
        if b + 1 < len(self):
            return epoch, b + 1
        return (epoch + 1 if self.train else 0), 0

    def close(self) -> None:
        """Stop the pipeline and its Python workers (a later iteration starts a new one)."""
        self._iter = None
        self._pipe = None  # the last reference: DALI tears the pipeline and its workers down
        self._next = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: DALI may already be gone
            pass

    def _start(self, epoch: int, b: int) -> None:
        self.close()
        names_spec = input_spec(self.spec, self.train)
        names = [n for n, _, _ in names_spec]
        arrays = self.dataset.images if isinstance(self.dataset, ImageArrays) else None
        files = self.dataset.files if isinstance(self.dataset, ImageFiles) else None
        source = _BatchSource(spec=self.spec, train=self.train, names=names, images=arrays, files=files,
                              labels=np.asarray(self.dataset.labels, dtype=np.int64), fg_weights=self.fg_weights,
                              batch_size=self.batch_size, num_batches=len(self), aug=self.aug, mix=self.mix,
                              seed=self.seed, rank=self.rank, world_size=self.world_size, epoch0=epoch, batch0=b)
        gpu = self.spec.gpu
        device_id = (self.device.index or 0) if gpu else None
        # fork is cheap but unsafe once a CUDA context exists in this process (DALI Pipeline docs,
        # py_start_method); with a GPU pipeline one always will (ours or torch's), so spawn there.
        start_method = self.py_start_method or ("spawn" if gpu or torch.cuda.is_initialized() else "fork")
        per_sample = 2 * self.spec.size ** 2 * 3 if arrays is not None else 2 * int(np.diff(source.path_offsets).max())
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.num_threads, device_id=device_id,
                        seed=(self.seed * 1_000_003 + self.rank) % (2 ** 31), prefetch_queue_depth=self.prefetch,
                        py_num_workers=self.py_workers, py_start_method=start_method)
        with pipe:
            layouts = ["HWC", "HWC"] if arrays is not None else []
            nodes = fn.external_source(source=source, num_outputs=len(names), batch=True, parallel=True,
                                       prefetch_queue_depth=max(2, self.py_workers),
                                       bytes_per_sample_hint=per_sample + 4096,
                                       dtype=[d for _, d, _ in names_spec], ndim=[k for _, _, k in names_spec],
                                       layout=layouts[:1] if not self.train else layouts)
            inp = dict(zip(names, nodes))
            pipe.set_outputs(*(train_graph(self.spec, inp) if self.train else eval_graph(self.spec, inp)))
        pipe.start_py_workers()  # before build(), which creates the CUDA context
        pipe.build()
        views = [f"view{v}" for v in range(self.num_views)]
        out_names = views + (["y_f", "y_b", "lam"] if self.train else ["y"])
        self._pipe = pipe
        self._iter = DALIGenericIterator([pipe], output_map=out_names, size=-1, auto_reset=False,
                                         prepare_first_batch=False)
        self._next = (epoch, b)

    # -- iteration -----------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch if self.train else 0
        first = self.start_batch
        for b in range(first, len(self)):
            if self._next != (epoch, b):
                self._start(epoch, b)
            out = next(self._iter)[0]
            self._next = self._successor(epoch, b)
            yield self._to_batch(out)
        self.start_batch = 0

    def _to_batch(self, out: dict[str, torch.Tensor]) -> Batch:
        dev = self.device
        # The iterator's tensors may share DALI's buffers (DLPack with the dynamic executor, valid until the
        # next iteration per the plugin docs): everything handed out is a copy (torch.cat, or clone).
        views = [out[f"view{v}"] for v in range(self.num_views)]
        x = torch.cat(views) if len(views) > 1 else views[0].clone()  # (V·B, S, S, 3), view-major
        images = x.to(dev, non_blocking=True).permute(0, 3, 1, 2)  # NHWC memory = channels_last NCHW
        images = images.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        if self.train:
            y_f, y_b, lam = (out[k].to(dev, non_blocking=True).clone() for k in ("y_f", "y_b", "lam"))
            return Batch(images, y_f.long(), y_b.long(), lam.float())
        y = out["y"].to(dev, non_blocking=True).clone().long()
        return Batch(images, y, y, torch.ones(len(y), device=dev))


# --------------------------------------------------------------------------------------------------
# A functional entry point: run the graph once on given images and parameters (tests, debugging)
# --------------------------------------------------------------------------------------------------


def _constant(data):
    return lambda: data  # no parameter: DALI passes the iteration to a source that accepts one


def mix_batch(fg: np.ndarray, bg: np.ndarray, params: BatchParams, *, aug, mix, mean, std,
              device_id: int | None = None, num_threads: int = 2) -> tuple[list[np.ndarray], dict]:
    """Run the training graph once on uint8 (n, S, S, 3) foregrounds/backgrounds and fixed parameters.

    Returns the normalized views as float (n, S, S, 3) numpy arrays and the parameter arrays fed in. This is
    the same graph the loader builds, fed by a plain (non-parallel) external_source.
    """
    n, s = fg.shape[0], fg.shape[1]
    spec = GraphSpec(size=s, num_views=len(params.bg_aug), source="arrays", crop=aug.crop, aug_order=mix.aug_order,
                     mix_op=mix.mix_op, colour=_colour_possible(aug, mix), mean=tuple(mean), std=tuple(std),
                     gpu=device_id is not None)
    fg = np.where(covered(params)[:, None, None, None], fg, bg)  # as the loader feeds pairs with no box
    values = {"fg": fg, "bg": bg, "y_f": np.zeros(n, np.int64), "y_b": np.zeros(n, np.int64),
              "lam": params.mix.lam.astype(np.float32)}
    values.update(param_arrays(spec, params))
    names_spec = input_spec(spec, train=True)
    pipe = Pipeline(batch_size=n, num_threads=num_threads, device_id=device_id, seed=0)
    with pipe:
        inp = {}
        for name, dtype, ndim in names_spec:
            data = values[name]
            inp[name] = fn.external_source(source=_constant(data), batch=True, dtype=dtype, ndim=ndim,
                                           layout="HWC" if name in ("fg", "bg") else None)
        pipe.set_outputs(*train_graph(spec, inp)[:spec.num_views])
    pipe.build()
    outs = pipe.run()
    views = []
    for o in outs:
        o = o.as_cpu() if hasattr(o, "as_cpu") else o
        views.append(np.stack([np.array(o[i]) for i in range(n)]))
    del pipe
    return views, values


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    from mixtail.pipelines.config import AugConfig, MixConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", default="../shared/data/photos", help="a folder of JPEGs (fake LT labels)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    files = sorted(os.path.join(args.photos, f) for f in os.listdir(args.photos)
                   if f.lower().endswith((".jpg", ".jpeg", ".png")))
    if not files:
        raise SystemExit(f"no images in {args.photos}")
    labels = np.minimum(np.floor(np.random.default_rng(0).pareto(1.0, len(files))).astype(np.int64), 9)
    ds = ImageFiles(files, labels, [str(k) for k in range(10)])
    loader = DaliLoader(ds, train=True, batch_size=args.batch_size, aug=AugConfig(crop="resized"), mix=MixConfig(),
                        num_views=2, fg_sampling="class", fg_gamma=1.0, mean=(0.485, 0.456, 0.406),
                        std=(0.229, 0.224, 0.225), rank=0, world_size=1, device=args.device, seed=0,
                        image_size=args.size, num_threads=args.threads)
    done, t0, epoch = 0, None, 0
    while done < args.batches:
        loader.set_epoch(epoch)
        for batch in loader:
            done += 1
            if done == 2:
                t0, n0 = time.perf_counter(), done
            if done >= args.batches:
                break
        epoch += 1
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(f"{(done - n0) * args.batch_size / dt:,.0f} mixed two-view pairs/s at {args.size} px on {args.device} "
          f"({batch.images.shape} per batch)")


if __name__ == "__main__":
    main()
