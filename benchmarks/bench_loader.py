"""Loader throughput: mixed two-view SMC samples per second at steady state, per backend, on real photos.

Each backend loads the same job: weighted foreground + uniform background sampling, per-component
RandomResizedCrop/flip/colour before mixing (the paper's Eq. 3), resize-and-paste into a λ-sized box, two views,
normalization, at `--size` px (224 by default), batches of `--batch-size` pairs. A "sample" is one mixed
pair with both views, what one row of the trainer's batch needs.

- dali: decodes the JPEGs every time (pipelines/backends/dali_executor.py; `mixed` nvJPEG decode and GPU ops on
  --device cuda, everything on the CPU otherwise).
- torch: the photos are decoded once, up front, at --size px into memory (datasets.decode_images), as the
  torch backend keeps CIFAR-scale data; its rate excludes decoding. The table says so.
- ffcv: the photos are first converted to a temporary .beton (ffcv_io.write_beton, `--beton-mode`, jpg by
  default, longer side at most the executor's canvas: ffcv_loader.canvas_cap), outside the timing, as
  `mixtail convert --to ffcv --max-resolution` would; FFCV then decodes every batch and the shared torch ops
  crop, mix and normalize (pipelines/backends/ffcv_executor.py). The table says so. Those ops are the reference
  itself, so there is no graph to verify first; tests/test_ffcv_loader.py checks the decoding.

The photos (by default photos/ in the project's shared data directory beside the repository: 334 ImageNet JPEGs, one
per class) get fake long-tailed labels: class k holds n_k = n_max·(1/ρ)^(k/(C−1)) consecutive photos (sorted by
name), as CIFAR-LT is built.

Before timing, the DALI graph is checked against the torch reference (mixing.render_views) on random images
with drawn parameters, on the benchmark's device and size. Then per backend: `--warmup` batches, then
`--windows` timed windows of `--window-batches` batches each (device synchronized around each window);
the table gives the median and p20/p80 over windows. Results go to
<out>/loader_<gpu-or-cpu>_<yyyymmdd>.json with the environment.

    python -m mixtail.benchmarks.bench_loader --backend dali torch --device cuda --photos PHOTOS_DIR
    mixtail bench loader --backend dali --device cpu --num-photos 32 --size 64 --batch-size 16
    mixtail bench loader --backend ffcv torch --device cpu --num-photos 16 --size 64 --batch-size 8
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mixtail.benchmarks.common import (REAL_DATA, REAL_DATA_HELP, argument_parser, cuda_device_or_error, environment,
                                       format_table, nonnegative_int, out_dir_argument, positive_float, positive_int,
                                       synchronize, write_json)
from mixtail.errors import UsageError
from mixtail.pipelines.sources.types import ImageArrays, ImageFiles
from mixtail.pipelines.sources.images import decode_images
from mixtail.pipelines.sources.subsets import long_tailed_counts
from mixtail.pipelines.config import IMAGENET_MEAN, IMAGENET_STD, AugConfig, MixConfig

BACKENDS = ("dali", "torch", "ffcv")
_MODULES = {"dali": "mixtail.pipelines.backends.dali_executor", "torch": "mixtail.pipelines.backends.torch_executor",
            "ffcv": "mixtail.pipelines.backends.ffcv_executor"}
DEFAULT_PHOTOS = REAL_DATA / "photos"
VERIFY_TOL_GREY = 0.02  # grey levels; tests/helpers/dali_parity.py (TOL_INSIDE) explains the value


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def photo_dataset(photos: Path, num_photos: int, num_classes: int, imbalance_ratio: float) -> ImageFiles:
    """The photos with fake long-tailed labels (see the module docstring)."""
    files = sorted(str(p) for p in Path(photos).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise UsageError(f"no JPEG/PNG photos in {photos} (give --photos FOLDER)")
    if num_photos:
        files = files[:num_photos]
    num_classes = min(num_classes, len(files))
    n_max = len(files)
    while n_max > 1 and long_tailed_counts(n_max, num_classes, imbalance_ratio).sum() > len(files):
        n_max -= 1
    counts = np.maximum(long_tailed_counts(n_max, num_classes, imbalance_ratio), 1)
    labels = np.repeat(np.arange(num_classes), counts)[:len(files)]
    return ImageFiles(files[:len(labels)], labels.astype(np.int64), [f"c{k}" for k in range(num_classes)])


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a missing parent package (nvidia)
        return False


def available_backends() -> list[str]:
    """Backends whose module exists here (and, for DALI, whose library is installed)."""
    libraries = {"dali": "nvidia.dali", "ffcv": "ffcv"}
    return [b for b in BACKENDS if _importable(_MODULES[b]) and (b not in libraries or _importable(libraries[b]))]


BENCH_AUG = AugConfig(crop="resized")
BENCH_MIX = MixConfig(mix_prob=1.0, start_epoch=0)  # every batch mixed: the loader's full job


def photos_to_beton(ds: ImageFiles, folder: Path, args) -> tuple["object", str]:
    """The photos written to a .beton in `folder` as the FFCV backend reads them: (BetonDataset, note)."""
    from mixtail.pipelines.sources.beton import write_beton
    from mixtail.pipelines.backends.ffcv_executor import canvas_cap
    from mixtail.pipelines.sources.beton import beton_dataset
    from mixtail.pipelines.sources.images import load_rgb

    t0 = time.perf_counter()
    side = canvas_cap(args.size)
    samples = ((load_rgb(f), int(y), i) for i, (f, y) in enumerate(zip(ds.files, ds.labels)))
    path = write_beton(folder / "photos.beton", samples, num_samples=len(ds), write_mode=args.beton_mode,
                       max_resolution=side)
    mib = path.stat().st_size / 2**20
    note = (f"converted once to a {args.beton_mode} .beton, longer side <= {side} px ({mib:.1f} MiB, "
            f"{time.perf_counter() - t0:.1f} s, excluded); FFCV decode every batch")
    return beton_dataset(path, ds.classes), note


def make_loader(backend: str, ds: ImageFiles, args, device: torch.device, cleanup: contextlib.ExitStack):
    """The backend's loader over the photos and the table's note on its data; temporary files go on `cleanup`."""
    from mixtail.pipelines.loader import loader_for_dataset
    from mixtail.pipelines.config import DataConfig

    data = DataConfig(backend=backend, batch_size=args.batch_size, image_size=args.size, mean=IMAGENET_MEAN,
                      std=IMAGENET_STD, num_threads=args.threads)
    note = "JPEG decode every batch"
    if backend == "torch":
        t0 = time.perf_counter()
        ds = ImageArrays(decode_images(ds.files, args.size, desc="decoding photos"), ds.labels, ds.classes)
        note = f"decoded once in memory at {args.size} px ({time.perf_counter() - t0:.1f} s, excluded)"
    elif backend == "ffcv":
        folder = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="mixtail_bench_beton_")))
        ds, note = photos_to_beton(ds, folder, args)
    loader = loader_for_dataset(ds, data, BENCH_AUG, BENCH_MIX, split="train", rank=0, world_size=1, device=device,
                                seed=0)
    return loader, note


def _endless(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def time_loader(loader, device: torch.device, warmup: int, windows: int, window_batches: int) -> list[float]:
    """Pairs per second in each timed window (warmup excluded)."""
    batches = _endless(loader)
    for _ in range(warmup):
        next(batches)
    synchronize(device)  # every stream, DALI's included
    rates = []
    for _ in range(windows):
        t0 = time.perf_counter()
        n = 0
        for _ in range(window_batches):
            n += next(batches).y_f.numel()
        synchronize(device)  # every stream, DALI's included
        rates.append(n / (time.perf_counter() - t0))
    return rates


def verify_dali(size: int, device: torch.device) -> float:
    """Max |DALI − torch reference| in grey levels on random images with a drawn plan (raises if off)."""
    from mixtail.pipelines.batch import normalize_views
    from mixtail.pipelines.backends.dali_executor import run_plan_once
    from mixtail.pipelines.ops.mixing import render_views
    from mixtail.pipelines.plan import Planner
    from mixtail.pipelines.sampling import foreground_weights

    n = 8
    mix = MixConfig(mix_prob=0.8, mix_per="sample", start_epoch=0)
    labels = np.arange(2 * n) % 4
    planner = Planner.for_training(labels, None, aug=BENCH_AUG, mix=mix, image_size=size, batch_size=n,
                                   num_views=2, fg_weights=foreground_weights(labels, 4, "instance", 1.0), seed=0,
                                   rank=0, world_size=1, num_epochs=None)
    plan = planner.plan(0, 0)
    images = np.random.default_rng(0).integers(0, 256, (2 * n, size, size, 3), dtype=np.uint8)
    views = run_plan_once(images, plan, aug=BENCH_AUG, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                          device_id=(device.index or 0) if device.type == "cuda" else None)
    t = torch.from_numpy(images).permute(0, 3, 1, 2)
    dp = plan.to("cpu")
    ref = render_views(t[dp["fg_index"].long()], t[dp["bg_index"].long()], dp, out_size=size)
    err = 0.0
    for v, r in zip(views, ref):
        r = normalize_views([r], IMAGENET_MEAN, IMAGENET_STD).permute(0, 2, 3, 1).numpy()
        err = max(err, float(np.abs(v - r).max()) * 255 * min(IMAGENET_STD))
    if err > VERIFY_TOL_GREY:
        raise RuntimeError(f"DALI mixing on {device} differs from the torch reference by {err:.4f} grey levels "
                         f"(tolerance {VERIFY_TOL_GREY}); not timing a wrong pipeline")
    return err


def main(argv: list[str] | None = None) -> list[dict]:
    p = argument_parser("mixtail bench loader", __doc__)
    p.add_argument("--backend", nargs="+", default=["dali", "torch"], choices=BACKENDS)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--photos", default=str(DEFAULT_PHOTOS),
                   help=f"folder of JPEGs (default: photos/ in {REAL_DATA_HELP})")
    p.add_argument("--num-photos", type=nonnegative_int, default=0, help="use the first N photos (0: all)")
    p.add_argument("--classes", type=positive_int, default=50, help="fake long-tailed classes over the photos")
    p.add_argument("--imbalance-ratio", type=positive_float, default=10.0)
    p.add_argument("--size", type=positive_int, default=224)
    p.add_argument("--batch-size", type=positive_int, default=256, help="mixed pairs per batch")
    p.add_argument("--warmup", type=nonnegative_int, default=5, help="batches before timing")
    p.add_argument("--windows", type=positive_int, default=5)
    p.add_argument("--window-batches", type=positive_int, default=10)
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 4, help="DALI CPU threads, FFCV decoding threads")
    p.add_argument("--beton-mode", default="jpg", choices=["raw", "jpg", "smart"],
                   help="ffcv: how the photos are stored in the temporary .beton (default jpg)")
    out_dir_argument(p)
    args = p.parse_args(argv)

    missing = [b for b in args.backend if b not in available_backends()]
    if missing:
        modules = ", ".join(_MODULES[b] for b in missing)
        raise UsageError(f"backend(s) {', '.join(missing)} not available here: {modules} does not exist or its "
                         f"library is not installed (available: {', '.join(available_backends())})")
    device = cuda_device_or_error(args.device)
    ds = photo_dataset(Path(args.photos), args.num_photos, args.classes, args.imbalance_ratio)
    if len(ds) < args.batch_size:
        raise UsageError(f"{len(ds)} photos do not fill one batch of {args.batch_size} pairs; lower --batch-size")
    print(f"{len(ds)} photos, {len(ds.classes)} fake LT classes ({np.bincount(ds.labels).max()}.."
          f"{np.bincount(ds.labels).min()}), {args.size} px, batch {args.batch_size} pairs x 2 views, {device}")

    verify_err = verify_dali(args.size, device) if "dali" in args.backend else None
    if verify_err is not None:
        print(f"dali graph vs torch reference on {device}: max error {verify_err:.4f} grey levels")
    rows = []
    for backend in args.backend:
        with contextlib.ExitStack() as cleanup:
            loader, note = make_loader(backend, ds, args, device, cleanup)
            cleanup.callback(loader.close)  # before the temporary files go (callbacks run last-in first-out)
            rates = time_loader(loader, device, args.warmup, args.windows, args.window_batches)
        rows.append({"backend": backend, "device": str(device), "pairs_per_s": float(np.median(rates)),
                     "p20": float(np.percentile(rates, 20)), "p80": float(np.percentile(rates, 80)),
                     "windows_pairs_per_s": rates, "note": note})
        del loader
    print(format_table([{"backend": r["backend"], "device": r["device"], "pairs/s (median)": round(r["pairs_per_s"]),
                         "p20": round(r["p20"]), "p80": round(r["p80"]), "views/s": round(2 * r["pairs_per_s"]),
                         "data": r["note"]} for r in rows]))
    config = {**vars(args), "num_photos_used": len(ds), "dali_verify_max_err_grey": verify_err,
              "metric": "mixed two-view pairs per second (median over windows)"}
    path = write_json("loader", rows, config=config, env=environment({"device": str(device)}), out_dir=args.out)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
