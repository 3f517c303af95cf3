"""The classic loop over whole epochs, and what its full schedule would take: the other side of every
"N× faster than the usual code" figure (benchmarks/gpu_lease.sh, stage 4).

`mixtail bench train --baseline classic` times the classic loop (benchmarks/classic_baseline.py: PIL transforms
in a DataLoader with workers, an eager fp32 one-view CE step) in steady-state windows. This benchmark runs it
the way a user meets it instead: `--epochs` whole epochs (every batch of the epoch, the DataLoader's workers
started inside the first one), then one pass over the test set (fp32, eval mode, the same per-image PIL
decode; CIFAR-scale images are held decoded in memory, as those repositories hold CIFAR), and extrapolates to
the config's schedule:

    extrapolated_s = train.epochs × (median epoch time) + evaluations × (test pass time)

where `evaluations` is how many the run itself makes (every train.eval_every_epochs and after the last
epoch, as trainer/train.py does). The median is over the epochs after the first when there are two or more
(the first pays the workers' start-up); start-up, dataset scanning and the classic repositories' per-step
`loss.item()` and accuracy are left out, which only flatters the baseline. Every row says it is an
extrapolation and from how many timed epochs. train.max_steps_per_epoch truncates the classic epochs
exactly as it truncates the trainer's, so a shortened rehearsal compares like with like.

    mixtail bench classic --config cifar10_lt_r100 --data.dataset=folder --data.root=/data/cifar10 --epochs 3
    mixtail bench classic --config smoke_cpu --epochs 1 --workers 0 --train.max_steps_per_epoch=2

Writes <out>/classic_<gpu-or-cpu>_<yyyymmdd>.json (rows, resolved config, environment).
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time
from typing import Any

import torch

from mixtail.benchmarks.common import (argument_parser, environment, format_table, nonnegative_int, out_dir_argument,
                                       positive_int, synchronize, write_json)

KEYS = ["workers", "arch", "size_px", "pairs", "device"]
METRICS = ["epoch_s", "test_pass_s", "extrapolated_s"]
TABLE_COLUMNS = ["workers", "arch", "size_px", "pairs", "device", "epochs_timed", "steps_per_epoch", "epoch_s",
                 "first_epoch_s", "test_pass_s", "evaluations", "extrapolated_s"]


def evaluations_in(epochs: int, eval_every: int) -> int:
    """How many evaluations `mixtail train` makes over `epochs` (every eval_every epochs and after the last)."""
    return sum(1 for e in range(1, epochs + 1) if e % eval_every == 0 or e == epochs)


def test_loader(cfg, dataset, *, workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    """The classic test loader: PIL decode + (resize and centre crop above 64 px) + ToTensor + Normalize."""
    from torchvision import transforms as T

    from mixtail.benchmarks.classic_baseline import ClassicDataset
    from mixtail.pipelines.loader import test_resize_ratio
    from mixtail.pipelines.config import normalization

    mean, std = normalization(cfg.data)
    s = cfg.data.image_size
    resize = [] if s <= 64 else [T.Resize(round(s * test_resize_ratio(cfg.data))), T.CenterCrop(s)]
    ds = ClassicDataset(dataset, T.Compose([*resize, T.ToTensor(), T.Normalize(mean, std)]))
    return torch.utils.data.DataLoader(ds, batch_size=cfg.data.eval_batch_size, shuffle=False, num_workers=workers,
                                       pin_memory=device.type == "cuda")


def time_classic_epochs(cfg, train_set, test_set, *, num_classes: int, device: torch.device, workers: int,
                        epochs: int) -> dict[str, Any]:
    """Wall time of `epochs` whole classic epochs and of one test pass, and the schedule's extrapolation."""
    from mixtail.benchmarks.classic_baseline import ClassicStep, classic_loader

    loader = classic_loader(cfg, train_set, workers=workers, device=device)
    steps = len(loader) if cfg.train.max_steps_per_epoch is None else min(len(loader), cfg.train.max_steps_per_epoch)
    if steps == 0:
        raise ValueError(f"{len(train_set)} images do not fill one batch of {cfg.data.batch_size}")
    step = ClassicStep(cfg, num_classes, device)
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # as CMO's cifar_train.py sets it (classic_baseline.py)
    epoch_s = []
    try:
        for _ in range(epochs):
            synchronize(device)
            t0 = time.perf_counter()
            for images, labels in itertools.islice(loader, steps):
                step(images, labels)
            synchronize(device)
            epoch_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        step.model.eval()
        with torch.no_grad():
            for images, _ in test_loader(cfg, test_set, workers=workers, device=device):
                step.model.classifier(step.model.features(images.to(device, non_blocking=True)))
        synchronize(device)
        test_s = time.perf_counter() - t0
    finally:
        torch.backends.cudnn.benchmark = benchmark
        del loader
    steady = epoch_s[1:] if len(epoch_s) > 1 else epoch_s
    per_epoch = statistics.median(steady)
    evaluations = evaluations_in(cfg.train.epochs, cfg.train.eval_every_epochs)
    return {"epochs_timed": len(epoch_s), "steps_per_epoch": steps, "epoch_times_s": epoch_s, "epoch_s": per_epoch,
            "first_epoch_s": epoch_s[0], "test_pass_s": test_s, "schedule_epochs": cfg.train.epochs,
            "evaluations": evaluations, "extrapolated_s": cfg.train.epochs * per_epoch + evaluations * test_s,
            "extrapolated": (f"extrapolated: {cfg.train.epochs} x median of {len(steady)} timed epoch(s) + "
                             f"{evaluations} x one timed test pass; start-up excluded")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from mixtail.benchmarks.bench_step import split_argv
    from mixtail.pipelines.sources.build import build_dataset
    from mixtail.trainer.config import config_to_dict, load_config
    from mixtail.trainer.dist import resolve_device

    p = argument_parser("mixtail bench classic", __doc__)
    p.add_argument("--config", default="cifar10_lt_r100", help="YAML path or bundled config name")
    p.add_argument("--epochs", type=positive_int, default=3, help="whole epochs to time (default 3)")
    p.add_argument("--workers", type=nonnegative_int, nargs="+", default=[4],
                   help="DataLoader workers, one row each (default 4: LDAM-DRW's and CMO's)")
    out_dir_argument(p)
    args, overrides = split_argv(p, argv)
    cfg = load_config(args.config, overrides)
    device = resolve_device(cfg.train.device)
    # CIFAR-scale images in memory, as the classic repositories hold CIFAR (torchvision's arrays): their loop
    # never decodes a file; photos are decoded by PIL per image, as theirs are.
    in_memory = cfg.data.image_size <= 64
    train_set = build_dataset(cfg.data, "train", decoded=in_memory)
    test_set = build_dataset(cfg.data, "test", decoded=in_memory)
    num_classes = len(train_set.classes)
    print(f"classic loop: {len(train_set)} training and {len(test_set)} test images, {num_classes} classes; "
          f"{cfg.model.arch} at {cfg.data.image_size} px, batch {cfg.data.batch_size}, {device}")
    rows = []
    for workers in args.workers:
        stats = time_classic_epochs(cfg, train_set, test_set, num_classes=num_classes, device=device,
                                    workers=workers, epochs=args.epochs)
        rows.append({"workers": workers, "arch": cfg.model.arch, "size_px": cfg.data.image_size,
                     "pairs": cfg.data.batch_size, "device": device.type, "views": 1, "precision": "fp32", **stats})
        print(f"  {workers} workers: {stats['epoch_s']:.2f} s/epoch, test pass {stats['test_pass_s']:.2f} s, "
              f"{cfg.train.epochs} epochs {stats['extrapolated_s']:.0f} s ({stats['extrapolated']})")
    print()
    print(format_table(rows, TABLE_COLUMNS))
    config = {"bench_args": vars(args), "overrides": overrides, "run_config": config_to_dict(cfg),
              "keys": KEYS, "metrics": METRICS}
    path = write_json("classic", rows, config=config, env=environment({"device": str(device)}), out_dir=args.out)
    print(f"wrote {path}")
    return {"rows": rows, "path": str(path)}


if __name__ == "__main__":
    main(sys.argv[1:])
