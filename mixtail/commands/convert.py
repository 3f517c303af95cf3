"""`mixtail convert`: write a dataset into what a loader backend reads fastest, or verify a written output
(the conversion itself is pipelines/convert.py)."""

from __future__ import annotations

import os

from mixtail.parsing import Parser
from mixtail.pipelines import convert as cv
from mixtail.pipelines.convert.options import FORMATS, TARGETS, VERIFY_SAMPLE, WRITE_MODES


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="mixtail convert", description=cv.__doc__.split("\n\n")[0],
               usage="mixtail convert SOURCE --to ffcv|dali --out PATH [options] | mixtail convert --verify PATH")
    p.add_argument("source", nargs="?", help="image folder, CIFAR root, `path label` list or iNaturalist .json")
    p.add_argument("--verify", metavar="PATH", help="check a converted output against its source")
    p.add_argument("--sample", default=str(VERIFY_SAMPLE), help="--verify: images per split whose pixels are "
                   f"compared, or 'all' (default {VERIFY_SAMPLE}, plus the first and last)")
    p.add_argument("--to", choices=TARGETS)
    p.add_argument("--out", metavar="PATH",
                   help="the folder to write (made under a temporary name, renamed at the end)")
    p.add_argument("--format", choices=FORMATS, help="the source's format (default: detected)")
    p.add_argument("--image-root", default="", help="filelist, inat-json: the folder the paths are relative to")
    p.add_argument("--test-list", default="", help="filelist, inat-json: the test split's list or .json")
    p.add_argument("--split", choices=("train", "test", "both"), default="both",
                   help="which splits to write (both: every split the source has)")
    p.add_argument("--imbalance-ratio", type=float, default=None,
                   help="write the long-tailed subset of the training split at this ratio (default: every image)")
    p.add_argument("--write-mode", choices=WRITE_MODES, default="smart")
    p.add_argument("--max-resolution", type=int, default=None, help="shrink longer sides above N px to N")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--on-error", choices=("stop", "skip"), default="stop",
                   help="a bad source file: stop before writing anything (default), or skip and list it")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="decoding/encoding threads")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier conversion at --out")
    args = p.parse_args(argv)
    if args.verify is not None:
        if args.source or args.to or args.out:
            p.error("--verify PATH takes no SOURCE, --to or --out")
        if args.sample == "all":
            sample = None
        else:
            try:
                sample = int(args.sample)
            except ValueError:
                p.error(f"--sample takes a number or 'all', got {args.sample!r}")
            if sample < 1:
                p.error(f"--sample must be at least 1 (or 'all'), got {sample}")
        print(cv.verify(args.verify, sample=sample))
        return 0
    if not args.source or not args.to or not args.out:
        p.error("give SOURCE, --to ffcv|dali and --out PATH (or --verify PATH)")
    cv.convert(cv.ConvertOptions(source=args.source, to=args.to, out=args.out, format=args.format,
                           image_root=args.image_root, test_list=args.test_list, split=args.split,
                           imbalance_ratio=args.imbalance_ratio, write_mode=args.write_mode,
                           max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
                           on_error=args.on_error, jobs=args.jobs, overwrite=args.overwrite))
    return 0
