"""The FFCV executor: batch plans (pipelines/plan.py) executed over a `.beton`, FFCV decoding and the shared
torch ops (mixing.render_views) doing everything else on the device.

FFCV only decodes, in an order it is given (pipelines/sources/beton.py: `BetonReader` puts each image on an S×S
canvas and never draws anything). The executor knows each epoch's plans ahead (`Planner.indices`), so per
stream it hands FFCV the whole rest of the epoch at once:

    background reader  order = bg indices of batches b, b+1, ..., len−1            (one FFCV batch per plan)
    foreground reader  order = fg indices of the *mixed* batches among them only   (an unmixed batch decodes
                                                                                    no foreground at all)

and walks both readers in lockstep with the loader's plan stream: each plan takes the next background batch
and, if it mixes, the next foreground batch. Each canvas batch goes to the device in one copy (from FFCV's
buffers, which FFCV pins when CUDA is present, on a side stream so the copy never waits for the training
step), and the plan is executed there by the same ops as the torch executor: render_views with each image's
valid (h, w) on the canvas, render_test_view for test plans, normalize_views. So the FFCV and torch backends
build the same batch from the same plan, up to the resampling of images larger than the canvas.

Epochs, resume and DDP come from the plans: a stream positioned mid-epoch (a resume) starts FFCV's order at
that batch; the order is this rank's (the planner shards), never FFCV's `distributed=True`; every rank has
the planner's number of batches. Each reader compiles its decoders with numba on its first batch (seconds),
so readers live as long as the executor; `reset()` only stops the epochs in flight.

The dataset is a `BetonDataset` (`beton_dataset(path)`, from the .beton's own metadata table). An in-memory
`ImageArrays` (the demo set, CIFAR) is also accepted: it is written once to a temporary raw .beton, removed
when the executor is closed, so `data.backend=ffcv` runs on any small dataset. File datasets must be
converted first (`mixtail convert --to ffcv`, or ffcv_io.write_beton).

How `datasets.build_dataset` should return a .beton (for the data-source wiring): a source that
names a .beton per split, e.g. `data.dataset: beton` with `data.root` holding `train.beton` and `test.beton`
(or the manifest `mixtail convert` writes, which also gives the class names), builds
`beton_dataset(path, classes=manifest_classes)`; the train split then goes through `subset(long_tailed_indices
(...))` as the other sources do (a subset only selects .beton positions, nothing is rewritten).

    mixtail bench loader --backend ffcv --device cpu --num-photos 16 --size 64 --batch-size 8   # time it
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from mixtail.errors import ConfigError
from mixtail.pipelines.batch import Batch, normalize_views
from mixtail.pipelines.ops.mixing import render_test_view, render_views
from mixtail.pipelines.sources.beton import (
    BetonDataset,
    BetonReader,
    arrays_to_beton,
    fit_size,
)
from mixtail.pipelines.sources.types import ImageArrays, ImageFiles

# --------------------------------------------------------------------------------------------------
# The dataset: a .beton as a data source
# --------------------------------------------------------------------------------------------------


def canvas_cap(image_size: int) -> int:
    """The largest canvas for S px outputs: the torch backend's in-memory scale (datasets.decode_in_memory:
    the shorter side at S, or at S·8/7 above 64 px, the longer side at most 3/2 of that), so crops read as
    many pixels as there. Also the `max_resolution` worth writing a .beton at for S px training."""
    short = image_size if image_size <= 64 else round(image_size * 8 / 7)
    return round(short * 3 / 2)


def canvas_side(image_size: int, sizes: np.ndarray) -> int:
    """The side of the square canvas FFCV decodes onto: canvas_cap, or the largest stored side if smaller."""
    return int(min(canvas_cap(image_size), int(np.max(sizes))))


# --------------------------------------------------------------------------------------------------
# The executor
# --------------------------------------------------------------------------------------------------


class _Stream:
    """One reader (made on first use: numba compiles it then) and the epoch it is traversing."""

    def __init__(self, dataset: BetonDataset, batch_size: int, canvas: int, num_threads: int):
        self._args = dict(batch_size=batch_size, canvas=canvas, num_threads=num_threads)
        self.path = dataset.path
        self.reader: BetonReader | None = None
        self.order = np.empty(0, np.int64)  # .beton positions of the epoch in flight
        self._batches = None
        self._copied: torch.cuda.Event | None = None  # the last batch's device copy (its buffer is FFCV's)

    def start(self, order: np.ndarray) -> None:
        self.stop()
        self.order = order
        if len(order):
            if self.reader is None:
                self.reader = BetonReader(self.path, **self._args)
            self._batches = self.reader.epoch(order)

    def next(self, device: torch.device, copy_stream) -> torch.Tensor:
        """The next canvas batch on `device`: (B, 3, S, S) uint8, an NCHW view of NHWC memory."""
        if self._batches is None:
            raise RuntimeError("the FFCV stream has no epoch in flight (the plan stream and the readers diverged)")
        if self._copied is not None:
            # FFCV refills the previous batch's buffer once the next is requested: its copy must be done.
            self._copied.synchronize()
            self._copied = None
        images = next(self._batches).images  # (B, S, S, 3) uint8
        if device.type == "cuda":
            out = torch.empty(images.shape, dtype=images.dtype, device=device)  # allocated on the compute stream
            with torch.cuda.stream(copy_stream):
                out.copy_(images, non_blocking=True)
                self._copied = copy_stream.record_event()
            torch.cuda.current_stream(device).wait_stream(copy_stream)
            images = out
        elif device.type != "cpu":
            images = images.to(device)
        # On the CPU the canvas is read in place: the batch is rendered before the next one is requested.
        return images.permute(0, 3, 1, 2)

    def stop(self) -> None:
        if self._batches is not None:
            self._batches.close()  # stops FFCV's producer thread (ffcv_io.BetonReader._batches)
            self._batches = None
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None


class FfcvExecutor:
    """Executes plans over a .beton (see the module docstring)."""

    def __init__(self, dataset: BetonDataset | ImageArrays, *, planner, device: torch.device | str, image_size: int,
                 mean, std, train: bool, channels_last: bool = True, num_threads: int = 4,
                 canvas: int | None = None):
        self._tmp = None
        if isinstance(dataset, ImageArrays):
            tmp = tempfile.mkdtemp(prefix="mixtail_ffcv_")
            self._tmp = weakref.finalize(self, shutil.rmtree, tmp, ignore_errors=True)
            dataset = arrays_to_beton(dataset, Path(tmp) / "data.beton")
        elif isinstance(dataset, ImageFiles):
            raise ConfigError("key 'data.backend': ffcv reads a .beton; convert the image files first "
                              "(mixtail convert SOURCE --to ffcv) or use data.backend=torch or dali")
        elif not isinstance(dataset, BetonDataset):
            raise TypeError(f"dataset must be a BetonDataset or ImageArrays, got {type(dataset).__name__}")
        if len(dataset) != planner.num_samples:
            raise ValueError(f"the planner plans {planner.num_samples} samples, the dataset has {len(dataset)}")
        self.target = torch.device(device)
        self.device = self.target  # plans are staged there: the ops read their columns on the device
        self.planner, self.dataset = planner, dataset
        self.image_size, self.mean, self.std, self.channels_last = image_size, mean, std, channels_last
        self.train = train
        self.canvas = canvas or canvas_side(image_size, dataset.sizes)
        # Each sample's valid (h, w) on the canvas, on the device; None when every image fills it exactly
        # (CIFAR at 32 px), which is what the torch executor gets for such data.
        fitted = np.array([fit_size(int(h), int(w), self.canvas) for h, w in dataset.sizes], np.int32).reshape(-1, 2)
        self.hw = None if (fitted == self.canvas).all() else torch.from_numpy(fitted).to(self.target)
        # numba refuses more threads than cores ("The number of threads must be between 1 and N").
        kw = dict(batch_size=planner.batch_size, canvas=self.canvas, num_threads=max(1, min(num_threads, os.cpu_count() or 1)))
        self.streams = {"bg": _Stream(dataset, **kw), "fg": _Stream(dataset, **kw)}
        self._copy_stream = torch.cuda.Stream(self.target) if self.target.type == "cuda" else None
        self._stream = None  # the plan stream being executed
        self._next: tuple[int, int] | None = None  # the (epoch, batch) the readers deliver next

    # -- the Executor protocol --------------------------------------------------------------------

    def batches(self, stream, count: int) -> Iterator[Batch]:
        if stream is not self._stream:
            self.reset()
            self._stream = stream
        for _ in range(count):
            plan = next(stream)
            at = (plan.host.epoch, plan.host.batch)
            if at != self._next:
                self._start(*at)
            bg = self.streams["bg"].next(self.target, self._copy_stream)
            fg = self.streams["fg"].next(self.target, self._copy_stream) if plan.mixed else None
            self._next = (at[0], at[1] + 1) if at[1] + 1 < len(self.planner) else None
            yield self.run(plan, fg, bg)

    def reset(self) -> None:
        """Stop the epochs in flight (the readers, compiled, are kept for the next stream)."""
        for s in self.streams.values():
            s.stop()
        self._stream, self._next = None, None

    def close(self) -> None:
        self.reset()
        for s in self.streams.values():
            s.reader = None
        if self._tmp is not None:
            self._tmp()  # removes the temporary .beton of an in-memory dataset

    # -- orders -----------------------------------------------------------------------------------

    def epoch_orders(self, epoch: int, start: int) -> tuple[np.ndarray, np.ndarray]:
        """.beton positions the background and foreground readers decode for batches start.. of `epoch`."""
        bg, fg = [], []
        for b in range(start, len(self.planner)):
            bg_idx, fg_idx = self.planner.indices(epoch, b)
            bg.append(bg_idx)
            if fg_idx is not None:
                fg.append(fg_idx)
        pos = self.dataset.positions
        join = lambda parts: pos[np.concatenate(parts)] if parts else np.empty(0, np.int64)  # noqa: E731
        return join(bg), join(fg)

    def _start(self, epoch: int, b: int) -> None:
        bg, fg = self.epoch_orders(epoch, b)
        self.streams["bg"].start(bg)
        self.streams["fg"].start(fg)

    # -- executing one plan -----------------------------------------------------------------------

    def _hw(self, idx: torch.Tensor) -> torch.Tensor | None:
        return None if self.hw is None else self.hw[idx]

    def run(self, plan, fg: torch.Tensor | None, bg: torch.Tensor) -> Batch:
        """One batch from a device plan and its decoded canvases ((B, 3, S, S) uint8 on the device, in plan order)."""
        if not self.train:
            idx = plan["index"].long()
            x = render_test_view(bg, plan, self.image_size, self._hw(idx))
            y = plan["y"].long()
            return Batch(normalize_views([x], self.mean, self.std, self.channels_last), y, y,
                         torch.ones(len(y), device=self.target), plan=plan.host)
        fg_hw = self._hw(plan["fg_index"].long()) if plan.mixed else None
        views = render_views(fg, bg, plan, out_size=self.image_size, fg_hw=fg_hw,
                             bg_hw=self._hw(plan["bg_index"].long()))
        images = normalize_views(views, self.mean, self.std, self.channels_last)
        return Batch(images, plan["y_f"].long(), plan["y_b"].long(), plan["lam"].float(), plan=plan.host)
