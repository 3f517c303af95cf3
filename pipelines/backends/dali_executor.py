"""The NVIDIA DALI executor: decode, per-component augmentation, resize-and-paste mixing and normalization
in a DALI pipeline, on the GPU (`mixed` decode, GPU ops) or, with no CUDA device, on the CPU.

It executes batch plans (pipelines/plan.py) like every backend, so it builds the same batch as the torch
reference (mixing.render_views) from the same plan, up to interpolation. DALI has no weighted reader (its
maintainers point to external_source fed by your own sampler, github.com/NVIDIA/DALI/issues/1356, which is
what this is): the loader's plan stream feeds one batch-mode `fn.external_source` callback, which turns
each plan into the graph's per-sample inputs (`plan_inputs`, the one place they are defined). Paths are read by
`fn.io.file.read` in DALI's own C++ threads, so JPEG bytes never pass through Python. The plans themselves
are built ahead on the loader's side thread, and DALI's pipeline runs `prefetch` iterations further ahead;
the labels and λ of each batch come from the plan it was fed (a FIFO), not through the pipeline.

Per pair and view, on the device (the paper's Eq. 3; docs/method.md, "Augmentation before mixing"):

    decode ─┬─ view v: crop window (fn.slice, relative to the decoded image for files) → resize to S×S with
            │          the flip folded into the ROI (fn.resize roi_start > roi_end mirrors) → colour
            │          (fn.coord_transform with the plan's per-image 3×3 M and offset t) → clamp
            └─ only for pairs whose box is non-empty (DALI conditional execution: an unmixed pair never reads,
               decodes or resizes a foreground): the foreground view, then fn.resize (antialias=False) with a
               ROI that shrinks the whole image into its box on an S×S canvas → fn.multi_paste of that box
               onto the background view → fn.crop_mirror_normalize (mean/std·255, HWC float)

The crop window is cut out first and then resized, as the reference does (augment.sampling_grid clamps to the
window: crop-then-resize, never blending pixels outside the window); fn.resize's own ROI would clamp at the
image border instead. fn.multi_paste does not scale (it copies a region at its own size), hence the explicit
resize before it.
Windows are relative to each image (plan.py), so a file is cropped on its own size and aspect ratio;
test images get the plan's centre window (resize the shorter side, centre-crop; docs/method.md, "The test-time view").

AutoAugment and Cutout (aug.policy autoaugment, cmo_randaug): after a component's crop, flip and colour,
each sample applies the plan's two AutoAugment slots, then its Cutout box (fn.erase), as the reference does;
the slots' ops in the graph, and where they can differ from the reference, are in `dali_autoaugment.py`.

Cost on the 2-core CPU (loaded), a mixed two-view batch of 32 at 32 px (4 component views): about 10 ms
without a policy, about 50 ms with autoaugment (the per-sample `if` trees' splits and merges are most of it).

    mixtail bench loader --backend dali --device cpu --num-photos 32 --size 64 --batch-size 16   # time it
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

try:
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import Pipeline, pipeline_def
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
except ImportError as err:  # build_loader turns this into an install hint
    raise ImportError(f"the DALI backend needs nvidia-dali (pip install 'mixtail[dali]'): {err}") from err

from mixtail.errors import DataError
from mixtail.pipelines.batch import Batch
from mixtail.pipelines.backends.dali_autoaugment import autoaugment_slot
from mixtail.pipelines.ops.autoaugment import NO_OP
from mixtail.pipelines.plan import BatchPlan, component_names
from mixtail.pipelines.sources.types import ImageArrays, ImageFiles

# --------------------------------------------------------------------------------------------------
# The graph: what is static about it, how a plan becomes its inputs, and the ops
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphSpec:
    """Everything static about a pipeline graph (the per-batch values arrive through external_source)."""

    size: int  # S: side of the square output
    num_views: int
    train: bool
    source: str  # "arrays": uint8 (S, S, 3) pixels; "files": paths of encoded images
    crop: str  # aug.crop: "pad" (CIFAR pad-and-crop, on the S×S canvas) | "resized" (windows on the image)
    aug_order: str  # mix.aug_order: before_mix | after_mix | none
    mix_op: str  # mix.mix_op: resize | crop
    colour: bool  # whether plans carry colour columns (else the colour ops are left out)
    policy: bool  # whether plans carry AutoAugment and Cutout columns (aug.policy autoaugment, cmo_randaug)
    mean: tuple[float, float, float]  # in [0, 1] units, as pipelines.config.normalization gives them
    std: tuple[float, float, float]
    gpu: bool  # ops on the GPU, decoding "mixed"; False: everything on the CPU

    @classmethod
    def of_layout(cls, layout, *, size: int, train: bool, source: str, crop: str, mean, std,
                  gpu: bool) -> "GraphSpec":
        """The graph that executes plans of `layout`: which components there are, how they combine and which
        columns exist all come from the plan layout (the planner's), never from separate arguments."""
        return cls(size=size, num_views=layout.num_views if train else 1, train=train, source=source, crop=crop,
                   aug_order=layout.aug_order, mix_op=layout.mix_op, colour=train and layout.carries_colour,
                   policy=train and layout.carries_policy, mean=tuple(mean), std=tuple(std), gpu=gpu)

    def components(self) -> list[str]:
        return component_names(self.aug_order, self.num_views) if self.train else []

    def window_in_pixels(self, component: str) -> bool:
        """Whether a component's window is cut in pixels of an S×S canvas (arrays, pad-and-crop, the mixed
        image of after_mix) rather than relative to a decoded file."""
        return self.source == "arrays" or self.crop == "pad" or component.startswith("mx")


def _encode_paths(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All paths as one uint8 blob plus offsets: each sample is a zero-copy view (the 1-D byte array
    fn.io.file.read expects)."""
    encoded = [f.encode("utf-8") for f in files]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(e) for e in encoded])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


class Sources:
    """The images of a dataset as DALI source samples: uint8 HWC arrays, or encoded paths."""

    def __init__(self, dataset: ImageArrays | ImageFiles):
        self.images = dataset.images if isinstance(dataset, ImageArrays) else None
        self.blob, self.offsets = _encode_paths(dataset.files) if isinstance(dataset, ImageFiles) else (None, None)

    def __call__(self, idx: np.ndarray):
        if self.images is not None:
            return self.images[idx]  # (n, S, S, 3): a batch in one array
        return [self.blob[self.offsets[i]:self.offsets[i + 1]] for i in idx]


def covered(plan: BatchPlan) -> np.ndarray:
    """(n,) bool: pairs whose foreground box is non-empty, the only ones whose foreground branch runs.

    The others (unmixed pairs, and a mixed pair whose box rounded to zero size) come out as their augmented
    background. Empty paste regions are never fed: fn.multi_paste's GPU kernel splits the canvas into
    patches by an event sweep over region edges, and by our reading of kernels/imgproc/paste/paste_gpu.h a
    zero-extent region is opened and never closed, so it would cover later patches.
    """
    box = plan["box"]
    return (box[:, 2] > 0) & (box[:, 3] > 0)


def _window_inputs(spec: GraphSpec, rel: np.ndarray, flip: np.ndarray | None, prefix: str,
                   resized: bool) -> dict[str, np.ndarray]:
    """A component's crop window (and flip) as graph inputs. `rel`: (n, 4) relative windows."""
    s = spec.size
    out: dict[str, np.ndarray] = {}
    top, left, h, w = (rel[:, k].astype(np.float64) for k in range(4))
    if spec.window_in_pixels(prefix):
        out[f"{prefix}_start"] = np.rint(np.stack([top, left], 1) * s).astype(np.int32)
        if resized:  # pad-and-crop always cuts S×S
            out[f"{prefix}_shape"] = np.rint(np.stack([h, w], 1) * s).astype(np.int32)
    else:
        out[f"{prefix}_rel_start"] = np.clip(np.stack([top, left], 1), 0, 1).astype(np.float32)
        out[f"{prefix}_rel_end"] = np.clip(np.stack([top + h, left + w], 1), 0, 1).astype(np.float32)
    if resized:
        f = np.zeros(len(rel), np.float32) if flip is None else flip.astype(np.float32)
        # The flip is folded into the resize: a ROI whose start exceeds its end is mirrored (fn.resize docs).
        out[f"{prefix}_roi_start"] = np.stack([np.zeros_like(f), f], 1)
        out[f"{prefix}_roi_end"] = np.stack([np.ones_like(f), 1 - f], 1)
    elif flip is not None:
        out[f"{prefix}_flip"] = flip.astype(np.int32)
    return out


def _policy_inputs(plan: BatchPlan, prefix: str, cover: np.ndarray) -> dict[str, np.ndarray]:
    """A component's two AutoAugment slots (op id, magnitude, 2×3 destination-to-source map, each per sample)
    and its Cutout box (anchor and shape in pixels of the S×S view) as graph inputs."""
    op = plan[f"{prefix}.aa_op"].astype(np.int32)
    if prefix.startswith("fg"):
        # A batch that mixes nothing leaves its foreground columns unwritten (zeros: op 0 with a zero matrix);
        # the foreground branch never runs for those pairs, but no slot should claim an op there.
        op = np.where(cover[:, None], op, NO_OP).astype(np.int32)
    mag = plan[f"{prefix}.aa_mag"].astype(np.float32)
    affine = plan[f"{prefix}.aa_affine"].reshape(-1, 2, 2, 3).astype(np.float32)
    box = plan[f"{prefix}.cutout"].astype(np.float32)  # top, left, height, width
    out = {}
    for k in (0, 1):
        out[f"{prefix}_aa{k}_op"] = np.ascontiguousarray(op[:, k])
        out[f"{prefix}_aa{k}_mag"] = np.ascontiguousarray(mag[:, k])
        out[f"{prefix}_aa{k}_affine"] = np.ascontiguousarray(affine[:, k])
    out[f"{prefix}_cut_anchor"] = np.ascontiguousarray(box[:, 0:2])
    out[f"{prefix}_cut_shape"] = np.ascontiguousarray(box[:, 2:4])
    return out


def plan_inputs(spec: GraphSpec, plan: BatchPlan, sources: Sources) -> dict[str, object]:
    """Every per-sample input of the graph for one plan, by name: the one place the inputs are defined."""
    if not spec.train:
        # The test protocol resizes then centre-crops (docs/method.md, "The test-time view"): one fn.resize whose
        # relative ROI is the plan's fractional window, so neither a whole-pixel slice nor an edge clamp moves it.
        top, left, h, w = (plan["crop"][:, k] for k in range(4))
        return {"img": sources(plan["index"].astype(np.int64)),
                "test_roi_start": np.stack([top, left], 1).astype(np.float32),
                "test_roi_end": np.stack([top + h, left + w], 1).astype(np.float32)}
    n, s = len(plan), spec.size
    cover = covered(plan)
    bg_idx = plan["bg_index"].astype(np.int64)
    # A pair with no box still needs a foreground sample in the batch: its background (never decoded).
    fg_idx = np.where(cover, plan["fg_index"], bg_idx).astype(np.int64)
    bg = sources(bg_idx)
    out: dict[str, object] = {"bg": bg, "fg": sources(fg_idx) if cover.any() else bg, "covered": cover}
    pad = spec.crop == "pad"
    for p in spec.components():
        out.update(_window_inputs(spec, plan[f"{p}.crop"], plan[f"{p}.flip"], p, resized=not pad))
        if spec.colour:
            out[f"{p}_M"] = np.ascontiguousarray(plan[f"{p}.colour_m"].reshape(n, 3, 3))
            out[f"{p}_T"] = (plan[f"{p}.colour_t"] * 255.0).astype(np.float32)  # the graph works in 0..255
        if spec.policy:
            out.update(_policy_inputs(plan, p, cover))
    box = np.where(cover[:, None], plan["box"], np.array([0, 0, s, s])).astype(np.int64)  # top, left, h, w
    shapes = np.zeros((n, 2, 2), np.int32)
    shapes[:, 0] = s  # region 0: the whole background
    shapes[:, 1] = box[:, 2:4]  # region 1: the foreground box, pasted last so it wins
    anchors = np.zeros((n, 2, 2), np.int32)
    anchors[:, 1] = box[:, 0:2]  # read from and written to the same place (see _paste)
    out["paste_shapes"], out["paste_anchors"] = shapes, anchors
    if spec.mix_op == "resize":
        # The ROI that makes fn.resize(fg, size=[S, S]) put the whole foreground, shrunk, exactly into the box:
        # output pixel y reads source (y − top + ½)·S/h − ½, mixing.resize_into_boxes' sampling. The ROI
        # reaches outside the image; fn.resize clamps there, as grid_sample's border padding does.
        top, left, h, w = (box[:, k].astype(np.float64) for k in range(4))
        start = np.stack([-top * s / h, -left * s / w], 1)
        out["box_roi_start"] = start.astype(np.float32)
        out["box_roi_end"] = (start + np.stack([s * s / h, s * s / w], 1)).astype(np.float32)
    return out


def input_types(values: dict[str, object]) -> list[tuple[str, object, int]]:
    """(name, DALI dtype, per-sample ndim) of each input, read off one batch of values."""
    dtypes = {np.uint8: types.UINT8, np.int32: types.INT32, np.int64: types.INT64, np.float32: types.FLOAT,
              np.bool_: types.BOOL}
    out = []
    for name, v in values.items():
        a = np.asarray(v[0])  # one sample of a list of samples or of a dense (n, ...) batch
        out.append((name, dtypes[a.dtype.type], a.ndim))
    return out


def _load(spec: GraphSpec, src):
    """Decoded uint8 HWC images on the pipeline's device."""
    if spec.source == "files":
        encoded = fn.io.file.read(src)
        return fn.decoders.image(encoded, device="mixed" if spec.gpu else "cpu", output_type=types.RGB)
    return src.gpu() if spec.gpu else src


def _canvas(spec: GraphSpec, img, dtype=None):
    """The image on the S×S canvas (files are resized whole, antialiased): pad-and-crop and after_mix work there."""
    if spec.source == "files":
        kw = {"dtype": dtype} if dtype is not None else {}
        return fn.resize(img, size=[spec.size, spec.size], antialias=True, **kw)
    return fn.cast(img, dtype=dtype) if dtype is not None else img


def _augment(spec: GraphSpec, img, inp: dict, prefix: str, on_canvas: bool = False):
    """Crop window, flip and colour of one component view: float32 (S, S, 3) in 0..255."""
    s = spec.size
    if spec.crop == "pad":
        x = img if on_canvas else _canvas(spec, img)
        # Pad-and-crop is an integer shift with zero fill: exact, no resampling.
        x = fn.slice(x, start=inp[f"{prefix}_start"], shape=[s, s], axis_names="HW", out_of_bounds_policy="pad")
        x = fn.flip(x, horizontal=inp[f"{prefix}_flip"])
        x = fn.cast(x, dtype=types.FLOAT)
    else:
        if spec.window_in_pixels(prefix):
            x = img if on_canvas or spec.source == "arrays" else _canvas(spec, img)
            x = fn.slice(x, start=inp[f"{prefix}_start"], shape=inp[f"{prefix}_shape"], axis_names="HW")
        else:
            x = fn.slice(img, rel_start=inp[f"{prefix}_rel_start"], rel_end=inp[f"{prefix}_rel_end"], axis_names="HW")
        # antialias=True only matters when a file's window is larger than S (downscaling); canvas windows are
        # never larger than S, so they are plain bilinear, as the reference's grid_sample.
        x = fn.resize(x, size=[s, s], roi_start=inp[f"{prefix}_roi_start"], roi_end=inp[f"{prefix}_roi_end"],
                      roi_relative=True, antialias=True, interp_type=types.INTERP_LINEAR, dtype=types.FLOAT)
    if spec.colour:
        x = fn.coord_transform(x, M=inp[f"{prefix}_M"], T=inp[f"{prefix}_T"], dtype=types.FLOAT)
        x = dmath.clamp(x, 0.0, 255.0)
    if spec.policy:
        for k in (0, 1):
            x = autoaugment_slot(spec, x, inp[f"{prefix}_aa{k}_op"], inp[f"{prefix}_aa{k}_mag"],
                                  inp[f"{prefix}_aa{k}_affine"])
        # Cutout last, before normalization (autoaugment.apply_cutout); a zero-size box erases nothing.
        x = fn.erase(x, anchor=inp[f"{prefix}_cut_anchor"], shape=inp[f"{prefix}_cut_shape"], axes=[0, 1],
                     fill_value=0.0)
    return x


def _paste(spec: GraphSpec, fg, bg, inp: dict):
    """x̃ = M ⊙ R(x_f) + (1 − M) ⊙ x_b: background as region 0, the foreground box as region 1.

    Both inputs are S×S: resize mode resizes the foreground onto the whole canvas with a ROI that puts the
    shrunk image at the box (plan_inputs), and region 1 copies the box from there. Equal input shapes keep us
    safe from fn.multi_paste's multi-input GPU setup, which in the DALI source we read
    (operators/image/paste/multipaste.cu, after PR 5331) takes every input's shapes, hence row pitches, from
    input 0: a smaller foreground input would be read with the background's pitch.
    """
    s = spec.size
    if spec.mix_op == "resize":
        # antialias=False: the reference (mixing.resize_into_boxes) is plain bilinear grid sampling with
        # align_corners=False semantics; DALI's antialiased downscale would low-pass the foreground.
        fg = fn.resize(fg, size=[s, s], roi_start=inp["box_roi_start"], roi_end=inp["box_roi_end"],
                       antialias=False, interp_type=types.INTERP_LINEAR, dtype=types.FLOAT)
    return fn.multi_paste(bg, fg, in_anchors=inp["paste_anchors"], shapes=inp["paste_shapes"],
                          out_anchors=inp["paste_anchors"], output_size=[s, s])


def _normalize(spec: GraphSpec, x):
    mean = [255.0 * m for m in spec.mean]
    std = [255.0 * v for v in spec.std]
    return fn.crop_mirror_normalize(x, mean=mean, std=std, output_layout="HWC", dtype=types.FLOAT)


def train_graph(spec: GraphSpec, inp: dict) -> list:
    """Outputs: view 0..V−1 as normalized float (S, S, 3). Needs a pipeline with enable_conditionals."""
    bg = _load(spec, inp["bg"])
    cover = inp["covered"]
    if spec.aug_order == "after_mix":
        mixed = _canvas(spec, bg, types.FLOAT)
        if cover:  # per-sample: only pairs with a box read and decode their foreground
            mixed = _paste(spec, _canvas(spec, _load(spec, inp["fg"]), types.FLOAT), mixed, inp)
        views = [_augment(spec, mixed, inp, f"mx{v}", on_canvas=True) for v in range(spec.num_views)]
    else:
        views = [_augment(spec, bg, inp, f"bg{v}") for v in range(spec.num_views)]
        if cover:
            fg = _load(spec, inp["fg"])
            views = [_paste(spec, _augment(spec, fg, inp, f"fg{v}"), b, inp) for v, b in enumerate(views)]
    return [_normalize(spec, x) for x in views]


def eval_graph(spec: GraphSpec, inp: dict) -> list:
    """Output: the normalized (S, S, 3) test view (the plan's centre window, resized to S)."""
    s = spec.size
    x = fn.resize(_load(spec, inp["img"]), size=[s, s], roi_start=inp["test_roi_start"], roi_end=inp["test_roi_end"],
                  roi_relative=True, antialias=True, interp_type=types.INTERP_LINEAR, dtype=types.FLOAT)
    return [_normalize(spec, x)]


def build_pipeline(spec: GraphSpec, source, names_types, *, batch_size: int, num_threads: int,
                   device_id: int | None, prefetch: int, seed: int) -> Pipeline:
    """A pipeline of `spec`'s graph fed by one batch-mode callable returning the inputs in names_types order."""
    # Conditional execution (the per-sample `if cover:` of train_graph) needs a pipeline_def pipeline.
    @pipeline_def(enable_conditionals=True)
    def graph():
        nodes = fn.external_source(source=source, num_outputs=len(names_types), batch=True,
                                   dtype=[d for _, d, _ in names_types], ndim=[k for _, _, k in names_types],
                                   layout=["HWC" if spec.source == "arrays" and name in ("fg", "bg", "img") else ""
                                           for name, _, _ in names_types])
        inp = dict(zip([name for name, _, _ in names_types], nodes))
        return tuple(train_graph(spec, inp) if spec.train else eval_graph(spec, inp))

    pipe = graph(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                 prefetch_queue_depth=prefetch)
    pipe.build()
    return pipe


# --------------------------------------------------------------------------------------------------
# The executor
# --------------------------------------------------------------------------------------------------


class DaliExecutor:
    """Executes plans in a DALI pipeline (see the module docstring)."""

    def __init__(self, dataset: ImageArrays | ImageFiles, *, planner, device: torch.device | str, image_size: int,
                 mean, std, train: bool, channels_last: bool = True, num_threads: int = 4, prefetch: int = 2):
        if isinstance(dataset, ImageArrays):
            n, h, w, c = dataset.images.shape
            if h != image_size or w != image_size or c != 3 or getattr(dataset, "sizes", None) is not None:
                raise ValueError(f"in-memory images are (N, H, W, C) = {dataset.images.shape}; the DALI backend needs "
                                 f"(N, {image_size}, {image_size}, 3) for data.image_size={image_size}")
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
        self.target = torch.device(device)
        if self.target.type not in ("cpu", "cuda"):
            raise ValueError(f"the DALI backend runs on cpu or cuda, got device {self.target}")
        self.device = None  # plans are read on the host
        self.planner = planner
        self.channels_last = channels_last
        self.num_threads, self.prefetch = num_threads, prefetch
        # The graph is built once, so it is built from the planner's layout: every plan it is fed has that layout.
        self.spec = GraphSpec.of_layout(planner.layout, size=image_size, train=train, source=source,
                                        crop=planner.aug.crop if planner.aug is not None else "resized",
                                        mean=mean, std=std, gpu=self.target.type == "cuda")
        self.sources = Sources(dataset)
        probe = plan_inputs(self.spec, planner.plan(0, 0), self.sources)
        self.names_types = input_types(probe)
        self._pipe: Pipeline | None = None
        self._iter: DALIGenericIterator | None = None
        self._stream = None
        self._fed: deque[BatchPlan] = deque()

    def _feed(self):
        """The external_source callback: the next plan of the stream, as the graph's inputs."""
        plan = next(self._stream)
        built = self.planner.layout  # the graph was built for it, and reads nothing else
        if plan.layout is not built and plan.layout != built:  # a planner's plans share its layout object
            def shown(layout) -> str:
                return f"aug_order {layout.aug_order}, mix_op {layout.mix_op}, {layout.num_views} views"
            raise ValueError(f"a plan of epoch {plan.epoch}, batch {plan.batch} has another layout "
                             f"({shown(plan.layout)}) than the planner this DALI graph was built for ({shown(built)})")
        self._fed.append(plan)
        values = plan_inputs(self.spec, plan, self.sources)
        return tuple(values[name] for name, _, _ in self.names_types)

    def _start(self) -> None:
        device_id = (self.target.index or 0) if self.spec.gpu else None
        seed = (self.planner.seed * 1_000_003 + self.planner.rank) % (2 ** 31)
        self._pipe = build_pipeline(self.spec, self._feed, self.names_types, batch_size=self.planner.batch_size,
                                    num_threads=self.num_threads, device_id=device_id, prefetch=self.prefetch,
                                    seed=seed)
        self._iter = DALIGenericIterator([self._pipe], output_map=[f"view{v}" for v in range(self.spec.num_views)],
                                         size=-1, auto_reset=False, prepare_first_batch=False)

    def batches(self, stream, count: int) -> Iterator[Batch]:
        if self._stream is not stream:
            self.reset()
            self._stream = stream
        if self._pipe is None:
            self._start()
        for _ in range(count):
            try:
                out = next(self._iter)[0]
            except (RuntimeError, StopIteration) as err:
                raise self._failure(err) from None
            yield self._to_batch(out, self._fed.popleft())

    def _failure(self, err: Exception) -> Exception:
        """DALI's error for a failed batch names no file ("Failed to decode sample #11"): name the files of the
        batch it was decoding, drop the pipeline (so nothing waits on it), and say what to do."""
        plan = self._fed[0] if self._fed else None
        self.reset()
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if plan is None or self.sources.blob is None:
            return DataError(f"the DALI pipeline failed: {first}")
        cols = ("bg_index", "fg_index") if plan.train else ("index",)
        idx = np.unique(np.concatenate([plan[c] for c in cols]).astype(np.int64))
        paths = [bytes(self.sources(np.array([i]))[0]).decode() for i in idx]
        shown = ", ".join(paths[:6]) + (f" and {len(paths) - 6} more" if len(paths) > 6 else "")
        return DataError(f"DALI failed on epoch {plan.epoch}, batch {plan.batch}, whose images are {shown}: {first} "
                         f"(a file changed since the run checked it? data.image_check=decode checks every pixel)")

    def reset(self) -> None:
        """Drop the pipeline and whatever it prefetched (a later iteration starts a new one)."""
        self._iter = None
        self._pipe = None  # the last reference: DALI tears the pipeline down
        self._stream = None
        self._fed.clear()

    close = reset

    def _to_batch(self, out: dict[str, torch.Tensor], plan: BatchPlan) -> Batch:
        dev = self.target
        # The iterator's tensors may share DALI's buffers (valid until the next iteration per the plugin docs):
        # everything handed out is a copy (torch.cat, or clone).
        views = [out[f"view{v}"] for v in range(self.spec.num_views)]
        x = torch.cat(views) if len(views) > 1 else views[0].clone()  # (V·B, S, S, 3), view-major
        images = x.to(dev, non_blocking=True).permute(0, 3, 1, 2)  # NHWC memory = channels_last NCHW
        images = images.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        if self.spec.train:
            # One transfer for the labels and λ of the batch.
            cols = np.stack([plan["y_f"].astype(np.float32), plan["y_b"].astype(np.float32), plan["lam"]])
            cols = torch.from_numpy(cols).to(dev, non_blocking=True)
            return Batch(images, cols[0].long(), cols[1].long(), cols[2].clone(), plan=plan)
        y = torch.from_numpy(plan["y"].astype(np.int64)).to(dev, non_blocking=True)
        return Batch(images, y, y, torch.ones(len(y), device=dev), plan=plan)


# --------------------------------------------------------------------------------------------------
# A functional entry point: run the graph once on given images and a plan (tests, debugging)
# --------------------------------------------------------------------------------------------------


def run_plan_once(images: np.ndarray, plan: BatchPlan, *, aug, mean, std, device_id: int | None = None,
                  num_threads: int = 2) -> list[np.ndarray]:
    """Run the training graph once on in-memory uint8 (N, S, S, 3) images and one plan (whose indices point
    into `images`; its layout says how the components combine). Returns the normalized views as float
    (n, S, S, 3) numpy arrays."""
    spec = GraphSpec.of_layout(plan.layout, size=images.shape[1], train=True, source="arrays", crop=aug.crop,
                               mean=mean, std=std, gpu=device_id is not None)
    sources = Sources(ImageArrays(images, np.zeros(len(images), np.int64), ["x"]))
    values = plan_inputs(spec, plan, sources)
    names_types = input_types(values)
    batch = tuple(values[name] for name, _, _ in names_types)
    pipe = build_pipeline(spec, lambda: batch, names_types, batch_size=len(plan), num_threads=num_threads,
                          device_id=device_id, prefetch=1, seed=0)
    outs = pipe.run()
    views = []
    for o in outs:
        o = o.as_cpu() if hasattr(o, "as_cpu") else o
        views.append(np.stack([np.array(o[i]) for i in range(len(plan))]))
    del pipe
    return views
