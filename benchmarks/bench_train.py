"""Loader + step together: how much of the step's own rate (`mixtail bench step`) training reaches, per backend.

For each backend (torch; dali where NVIDIA DALI is installed; ffcv where pipelines/backends/ffcv_executor.py and FFCV
exist: the others are skipped with the reason), the config's training loader (pipelines/loader.py
`loader_for_dataset`) feeds the config's training step (trainer/train.build_training, the mode that
`mixtail train` would use: CUDA graphs on a GPU by default) for `--warmup` steps and then `--windows`
timed windows of `--window-steps` steps, from epoch `--epoch` (default: the first mixed epoch,
mix.start_epoch), with the loop's lr schedule. The same process first times the step alone on synthetic
batches already on the device (bench_step.time_steps, the same timer), so `of_step` = loader+step rate /
step rate is measured in one run: 1.0 means the loader is fully hidden.

Data: the config's training set (`--data.root=...`, e.g. the CIFAR-10 JPEG tree as `--data.dataset=folder`;
the torch backend decodes it into memory once, excluded and reported as `data_s`), or with `--synthetic N`
N random images with long-tailed labels in memory (torch and dali; ffcv needs files).

`--baseline classic` adds the classic loop (benchmarks/classic_baseline.py: PIL transforms in a DataLoader
with `--workers` processes, eager fp32 CE on one view, torch.optim.SGD) on the same images, model, batch
size and device, once per worker count. Every row gives images/s (views the model processed), steps/s and
the time of one epoch (batches per epoch × time per step; both loops see len(train set) // batch size
batches), and `classic_speedup` = the fastest classic epoch time / the row's epoch time.

    mixtail bench train --config cifar10_lt_r100 --data.dataset=folder --data.root=/data/cifar10 --baseline classic
    mixtail bench train --config imagenet_lt_rn50 --data.root=/data/imagenet --backend dali torch
    mixtail bench train --config smoke_cpu --synthetic 64 --data.batch_size=8 --baseline classic --workers 0 2

Writes <out>/train_<gpu-or-cpu>_<yyyymmdd>.json (rows, resolved config, skipped backends, environment).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import time
from typing import Any

import numpy as np
import torch

from mixtail.benchmarks.bench_step import (bench_parser, build, describe_run, num_classes_for, split_argv,
                                           synthetic_batches, time_steps)
from mixtail.benchmarks.common import environment, format_table, nonnegative_int, synchronize, write_json
from mixtail.errors import MixtailError

BACKENDS = ("torch", "dali", "ffcv")
KEYS = ["backend", "workers", "mode", "arch", "size_px", "pairs", "views", "device"]
METRICS = ["images_per_s", "ms_per_step", "epoch_s", "of_step"]


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a missing parent package (nvidia)
        return False


def backend_unavailable(backend: str, synthetic: bool) -> str | None:
    """Why `backend` cannot run here, or None."""
    if backend == "dali" and not _importable("nvidia.dali"):
        return "NVIDIA DALI is not installed (pip install 'mixtail[dali]')"
    if backend == "ffcv":
        if not _importable("mixtail.pipelines.backends.ffcv_executor"):
            return "pipelines/backends/ffcv_executor.py (the FFCV executor) does not exist in this version"
        if not _importable("ffcv"):
            return "FFCV is not installed (pip install 'mixtail[ffcv]')"
        if synthetic:
            return "the FFCV executor reads image files; give the dataset with --data.root instead of --synthetic"
    return None


def synthetic_dataset(cfg, num_images: int, num_classes: int, seed: int = 0):
    """`num_images` random S×S RGB images in memory with long-tailed labels (data.imbalance_ratio)."""
    from mixtail.pipelines.sources.types import ImageArrays
    from mixtail.pipelines.sources.subsets import long_tailed_counts

    def counts(n_max: int) -> np.ndarray:
        return np.maximum(long_tailed_counts(n_max, num_classes, cfg.data.imbalance_ratio), 1)

    n_max = num_images
    while n_max > 1 and counts(n_max).sum() > num_images:
        n_max -= 1
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(num_classes), counts(n_max))).astype(np.int64)
    s = cfg.data.image_size
    images = rng.integers(0, 256, (len(labels), s, s, 3), dtype=np.uint8)
    return ImageArrays(images, labels, [f"c{k}" for k in range(num_classes)])


def _endless(loader, epoch: int):
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def mode_name(run) -> str:
    return "graphs" if run.step.cuda_graphs else ("compile" if run.net is not run.raw_model else "eager")


def bench_backend(cfg, dataset, backend: str, *, device: torch.device, epoch: int, timing: dict) -> dict[str, Any]:
    """Our loader on `backend` feeding the training step; the row without the ratios."""
    from mixtail.pipelines.loader import loader_for_dataset
    from mixtail.trainer.train import lr_at

    data = dataclasses.replace(cfg.data, backend=backend)
    t0 = time.perf_counter()
    loader = loader_for_dataset(dataset, data, cfg.aug, cfg.mix, split="train", rank=0, world_size=1, device=device,
                                seed=cfg.train.seed, num_epochs=cfg.train.epochs, channels_last=cfg.train.channels_last)
    data_s = time.perf_counter() - t0
    run = build(cfg, loader.num_classes, loader.class_counts, device)
    steps_per_epoch = len(loader)
    batches = _endless(loader, epoch)
    step = [epoch * steps_per_epoch]

    def run_step() -> None:
        run.step(next(batches), lr_at(cfg.optim, step[0], steps_per_epoch))
        step[0] += 1

    stats = time_steps(run_step, device=device, images_per_step=cfg.data.batch_size * cfg.data.num_views, **timing)
    row = {"backend": backend, "workers": None, "mode": mode_name(run), **stats, "steps_per_epoch": steps_per_epoch,
           "data_s": data_s}
    del batches
    loader.close()
    return row


def bench_step_alone(cfg, num_classes: int, counts: np.ndarray, device: torch.device, timing: dict) -> dict[str, Any]:
    """The step's own rate on synthetic batches on the device, in the same mode and with the same timer."""
    run = build(cfg, num_classes, counts, device)
    batches = synthetic_batches(cfg, num_classes, device)
    i = [0]

    def run_step() -> None:
        i[0] += 1
        run.step(batches[i[0] % len(batches)], cfg.optim.lr)

    stats = time_steps(run_step, device=device, images_per_step=cfg.data.batch_size * cfg.data.num_views, **timing)
    return {"backend": "none (step alone)", "workers": None, "mode": mode_name(run), **stats}


TABLE_COLUMNS = ["backend", "workers", "mode", "precision", "images_per_s", "images_per_s_p20", "images_per_s_p80",
                 "ms_per_step", "epoch_s", "of_step", "classic_speedup"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from mixtail.benchmarks.classic_baseline import bench_classic
    from mixtail.pipelines.sources.build import build_dataset
    from mixtail.pipelines.sampling import class_counts
    from mixtail.trainer.config import config_to_dict, load_config
    from mixtail.trainer.dist import resolve_device

    p = bench_parser("mixtail bench train", __doc__, windows=5)
    p.add_argument("--backend", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--synthetic", type=nonnegative_int, default=0, metavar="N", help="N random in-memory images instead of data")
    p.add_argument("--baseline", choices=["classic"], default=None, help="also time the classic loop")
    p.add_argument("--workers", type=nonnegative_int, nargs="+", default=[4],
                   help="DataLoader workers of the classic loop, one row each (default 4: LDAM-DRW's and CMO's)")
    p.add_argument("--epoch", type=nonnegative_int, default=None, help="epoch to start in (default: mix.start_epoch)")
    args, overrides = split_argv(p, argv)
    cfg = load_config(args.config, overrides)
    device = resolve_device(cfg.train.device)
    timing = {"warmup": args.warmup, "windows": args.windows, "window_steps": args.window_steps}
    epoch = min(cfg.mix.start_epoch if args.epoch is None else args.epoch, cfg.train.epochs - 1)

    t0 = time.perf_counter()
    if args.synthetic:
        dataset = synthetic_dataset(cfg, args.synthetic, num_classes_for(cfg, args.classes), cfg.train.seed)
        source = f"synthetic: {len(dataset)} random {cfg.data.image_size} px images in memory"
    else:
        dataset = build_dataset(cfg.data, "train", decoded=False)
        source = f"data.dataset={cfg.data.dataset} under {cfg.data.root!r}: {len(dataset)} training images"
    scan_s = time.perf_counter() - t0
    num_classes = len(dataset.classes)
    counts = class_counts(dataset.labels, num_classes)
    print(f"{source}, {num_classes} classes; {cfg.model.arch} at {cfg.data.image_size} px, {cfg.data.batch_size} pairs "
          f"x {cfg.data.num_views} views, {device}, from epoch {epoch}")

    shared = describe_run(cfg, device)
    step_row = {**bench_step_alone(cfg, num_classes, counts, device, timing), **shared}
    print(f"  step alone ({step_row['mode']}): {step_row['images_per_s']:,.0f} images/s")
    rows, skipped = [step_row], {}
    for backend in args.backend:
        why = backend_unavailable(backend, bool(args.synthetic))
        if why is None:
            try:
                row = bench_backend(cfg, dataset, backend, device=device, epoch=epoch, timing=timing)
            except (MixtailError, ImportError, ValueError) as err:  # a backend that cannot run this config
                why = f"{type(err).__name__}: {err}"
        if why is not None:
            skipped[backend] = why
            print(f"  skipping {backend}: {why}")
            continue
        row.update(shared, of_step=row["images_per_s"] / step_row["images_per_s"])
        rows.append(row)
        print(f"  {backend} + step: {row['images_per_s']:,.0f} images/s ({row['of_step']:.2f} of the step alone)")
    if args.baseline == "classic":
        for workers in args.workers:
            stats = bench_classic(cfg, dataset, num_classes=num_classes, device=device, workers=workers, **timing)
            rows.append({"backend": "classic", "workers": workers, "mode": "eager", **stats, **shared, "views": 1,
                         "precision": "fp32", "loss_impl": "ce"})
            print(f"  classic, {workers} workers: {stats['images_per_s']:,.0f} images/s")
    synchronize(device)
    for row in rows:
        if "steps_per_epoch" in row:
            row["epoch_s"] = row["steps_per_epoch"] * row["ms_per_step"] / 1e3
    classic = [r["epoch_s"] for r in rows if r["backend"] == "classic"]
    for row in rows:
        if classic and "epoch_s" in row:
            row["classic_speedup"] = min(classic) / row["epoch_s"]
    print()
    print(format_table(rows, TABLE_COLUMNS))
    config = {"bench_args": vars(args), "overrides": overrides, "run_config": config_to_dict(cfg), "data": source,
              "num_classes": num_classes, "scan_s": scan_s, "start_epoch": epoch, "skipped": skipped, "keys": KEYS,
              "metrics": METRICS}
    path = write_json("train", rows, config=config, env=environment({"device": str(device)}), out_dir=args.out)
    print(f"wrote {path}")
    return {"rows": rows, "path": str(path), "skipped": skipped}


if __name__ == "__main__":
    main(sys.argv[1:])
