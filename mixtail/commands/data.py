"""`mixtail data`: look at a dataset before training on it.

    mixtail data counts demo                                   # class counts and Many/Medium/Few of a training split
    mixtail data counts folder --root /data/cifar10 --imbalance-ratio 100
    mixtail data list ImageNet_LT_val.txt --root /data/imagenet   # an ImageNet-LT list or an iNaturalist .json
    mixtail data check /data/cifar10/train [--level decode] [--repeat 3]   # check (and time checking) every image
    mixtail data info PATH                                     # a converted output (its manifest) or a .beton
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from mixtail.errors import UsageError
from mixtail.parsing import Parser

USAGE = "mixtail data counts|list|check|info ARGS ...   (mixtail data NAME --help for its options)"


def counts(argv: list[str]) -> None:
    from mixtail.pipelines.config import DataConfig
    from mixtail.pipelines.sources.build import build_dataset
    from mixtail.pipelines.sources.subsets import shot_groups

    p = Parser(prog="mixtail data counts", description="Class counts and shot groups of a training split.")
    p.add_argument("dataset", choices=["demo", "cifar10", "cifar100", "folder"])
    p.add_argument("--root", default="")
    p.add_argument("--imbalance-ratio", type=float, default=100.0)
    p.add_argument("--on-error", choices=["stop", "skip"], default="stop")
    args = p.parse_args(argv)
    data = DataConfig(dataset=args.dataset, root=args.root, imbalance_ratio=args.imbalance_ratio,
                      on_error=args.on_error)
    ds = build_dataset(data, "train", decoded=False)
    n_k = np.bincount(ds.labels, minlength=len(ds.classes))
    print(f"{len(ds)} train images, {len(ds.classes)} classes, counts {n_k.max()}..{n_k.min()}; "
          + ", ".join(f"{g} {len(v)}" for g, v in shot_groups(n_k).items())
          + (f"; {len(ds.skipped)} bad files skipped" if ds.skipped else ""))


def file_list(argv: list[str]) -> None:
    from mixtail.pipelines.sources.file_lists import read_listed_dataset

    p = Parser(prog="mixtail data list", description="Read an ImageNet-LT `path label` list or an iNaturalist "
               ".json as training would (no image is opened).")
    p.add_argument("path", help="a `path label` list or an iNaturalist .json")
    p.add_argument("--root", default="", help="image root the paths are relative to")
    args = p.parse_args(argv)
    kind = "inat2018" if args.path.lower().endswith(".json") else "imagenet_lt"
    ds = read_listed_dataset(kind, args.path, args.root, "path")
    n_k = np.bincount(ds.labels, minlength=len(ds.classes))
    print(f"{len(ds)} images, {len(ds.classes)} classes, {int((n_k > 0).sum())} with images, "
          f"counts {n_k.max()}..{n_k[n_k > 0].min()}; first: {ds.files[0]} -> {ds.labels[0]} "
          f"({ds.classes[ds.labels[0]]})")


def check(argv: list[str]) -> None:
    from mixtail.pipelines.sources.images import (CHECK_LEVELS, IMAGE_EXTENSIONS, check_images, default_threads,
                                                  files_under)

    p = Parser(prog="mixtail data check", description="Check that every image file below the paths decodes.")
    p.add_argument("paths", nargs="+", help="image files, or folders searched recursively")
    p.add_argument("--level", choices=CHECK_LEVELS, default="header")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeat", type=int, default=1, help="time the check this many times (no cache)")
    args = p.parse_args(argv)
    files = files_under(args.paths)
    if not files:
        raise UsageError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {' '.join(args.paths)}")
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        result = check_images(files, level=args.level, threads=args.threads, cache=args.repeat == 1)
        times.append(time.perf_counter() - start)
    for i, reason in result.bad:
        print(f"{files[i]}: {reason}")
    med = sorted(times)[len(times) // 2]
    print(f"{len(files)} files, {len(result.bad)} bad, {result.cached} from the cache; {args.level} check "
          f"{med:.2f} s median of {len(times)} ({med / len(files) * 1e6:.0f} us/file, "
          f"{args.threads or default_threads()} threads)")


def info(argv: list[str]) -> None:
    p = Parser(prog="mixtail data info", description="Summarize a mixtail convert output or a .beton file.")
    p.add_argument("path", type=Path, help="a folder written by mixtail convert, or a .beton file")
    args = p.parse_args(argv)
    if args.path.is_file() and args.path.suffix == ".beton":
        _beton_info(args.path)
    else:
        _manifest_info(args.path)


def _manifest_info(path: Path) -> None:
    from mixtail.pipelines.sources.manifest import read_manifest
    from mixtail.pipelines.sources.subsets import shot_groups

    m = read_manifest(path)
    print(f"{m.path}: --to {m.target}, {len(m.classes)} classes, from {m.source['format']} {m.source['path']} "
          f"({m.created}, mixtail {m.mixtail_version}); {len(m.skipped)} bad files skipped")
    for name, split in m.splits.items():
        n_k = np.asarray(split.class_counts)
        groups = ", ".join(f"{g} {len(v)}" for g, v in shot_groups(n_k).items()) if name == "train" else ""
        print(f"  {name}: {split.num_images} images of {split.source_images} in the source, counts "
              f"{n_k.max()}..{n_k.min()}; stored {split.stored}" + (f"; {groups}" if groups else ""))


def _beton_info(path: Path) -> None:
    try:
        from mixtail.pipelines.sources.beton import beton_info
    except ImportError as err:
        raise UsageError(f"reading {path} needs FFCV: pip install 'mixtail[ffcv]' ({err})") from None
    beton = beton_info(path)
    classes, n_k = np.unique(beton.labels, return_counts=True)
    print(f"{beton.path}: {len(beton)} samples, {int(beton.jpeg.sum())} JPEG and {int((~beton.jpeg).sum())} raw, "
          f"{path.stat().st_size / 2**20:.1f} MiB")
    print(f"stored sizes: h {beton.heights.min()}..{beton.heights.max()}, "
          f"w {beton.widths.min()}..{beton.widths.max()}")
    print(f"{len(classes)} classes, {n_k.max()} to {n_k.min()} samples per class")


SUBCOMMANDS = {"counts": counts, "list": file_list, "check": check, "info": info}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {USAGE}\n\n{__doc__}", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in SUBCOMMANDS:
        raise UsageError(f"unknown data command '{argv[0]}'; choose one of {' | '.join(SUBCOMMANDS)}")
    SUBCOMMANDS[argv[0]](argv[1:])
    return 0
