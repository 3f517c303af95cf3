"""Conversion throughput: images per second and output size of `mixtail convert`, per target, write mode and
--max-resolution, on real sources; with --dali-read, also how fast the DALI executor reads each dali output.

Default sources, from the project's shared data directory beside the repository: the real photos (photos/, 334
ImageNet JPEGs, as a `path label` list with 10 fake classes) and a 2,000-image CIFAR-10 subset (the first 200
training JPEGs of each class from its archive of CIFAR-10 as JPEG files, extracted to a temporary folder). --source
takes others (an image folder, a CIFAR root, a list or an iNaturalist .json, as `mixtail convert` does).

Each row is one whole `mixtail convert` run into a temporary folder (reading and checking the source, decoding,
resizing, encoding, writing, checksums, the rename; FFCV's import is paid before the clock), `--reps` times,
median; the output is then checked with `mixtail convert --verify` (a sample of 16 images) before its row
counts. img_per_s counts the images written.

--dali-read times, for each dali output, the DALI executor on the CPU (pipelines/backends/dali_executor.py through
bench_loader.make_loader: two views, every batch mixed) reading the output's file list, and reading the same
bytes packed into one blob with an offset index through external_source: a layout measured here and not
written by convert (pipelines/convert.py says why). Mixed two-view pairs per second, median over windows.

    mixtail bench convert                                                    # both sources, every target and mode
    mixtail bench convert --targets dali --modes smart --max-resolution none,96,256 --dali-read --size 64
    python -m mixtail.benchmarks.bench_convert --source /data/cifar10 --targets ffcv --modes raw,jpg
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from mixtail.benchmarks.common import (REAL_DATA, REAL_DATA_HELP, argument_parser, environment, format_table,
                                      out_dir_argument, positive_int, write_json)
from mixtail.errors import UsageError

DEFAULT_PHOTOS = REAL_DATA / "photos"
DEFAULT_CIFAR = REAL_DATA / "cifar10" / "cifar10-jpeg.tar.gz"
MODES = {"ffcv": ("raw", "jpg", "smart", "proportion"), "dali": ("raw", "jpg", "smart")}


def default_sources(tmp: Path, cifar_per_class: int) -> list[tuple[str, str, dict]]:
    """(name, SOURCE, extra convert options) of the default sources, made under tmp."""
    sources = []
    if DEFAULT_PHOTOS.is_dir():
        names = sorted(p.name for p in DEFAULT_PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        lst = tmp / "photos.txt"
        lst.write_text("".join(f"{n} {i % 10}\n" for i, n in enumerate(names)))
        sources.append((f"photos ({len(names)})", str(lst), {"image_root": str(DEFAULT_PHOTOS)}))
    if DEFAULT_CIFAR.is_file():
        root = tmp / "cifar10"
        with tarfile.open(DEFAULT_CIFAR, "r:gz") as tar:
            members = [m for m in tar if m.isfile() and m.name.startswith("train/")
                       and int(Path(m.name).stem) < cifar_per_class]
            tar.extractall(root, members=members, filter="data")
        sources.append((f"cifar10 ({len(members)})", str(root / "train"), {}))
    if not sources:
        raise UsageError(f"neither {DEFAULT_PHOTOS} nor {DEFAULT_CIFAR} exists: give --source")
    return sources


def _resolutions(text: str) -> list[int | None]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        out.append(None if part in ("none", "0", "") else int(part))
    return out


def convert_once(source: str, extra: dict, out: Path, target: str, mode: str, max_resolution: int | None,
                 jobs: int):
    from mixtail.pipelines.convert import ConvertOptions, convert

    opts = ConvertOptions(source=source, to=target, out=str(out), write_mode=mode, max_resolution=max_resolution,
                          jobs=jobs, overwrite=True, **extra)
    t0 = time.perf_counter()
    manifest = convert(opts, log=lambda msg: None)
    return manifest, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------
# --dali-read: the DALI executor over a dali output, as files and as a packed blob
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def packed_blob(files: list[str], path: Path):
    """While active, the DALI executor gets each image's bytes from one memory-mapped blob through external_source
    (Sources slices it by an offset index) and decodes them without fn.io.file.read."""
    import mixtail.pipelines.backends.dali_executor as dl

    offsets = np.zeros(len(files) + 1, np.int64)
    with open(path, "wb") as f:
        for i, name in enumerate(files):
            data = Path(name).read_bytes()
            f.write(data)
            offsets[i + 1] = offsets[i] + len(data)
    blob = np.memmap(path, dtype=np.uint8, mode="r")
    encode_paths, load = dl._encode_paths, dl._load

    def blob_sources(paths):  # Sources slices blob[offsets[i]:offsets[i + 1]] for sample i
        if list(paths) != list(files):
            raise ValueError("the packed blob was built for another file list")
        return blob, offsets

    def decode_only(spec, src):
        if spec.source == "files":
            return dl.fn.decoders.image(src, device="cpu", output_type=dl.types.RGB)
        return load(spec, src)

    dl._encode_paths, dl._load = blob_sources, decode_only
    try:
        yield
    finally:
        dl._encode_paths, dl._load = encode_paths, load


def dali_read(out: Path, args) -> dict[str, float]:
    from mixtail.benchmarks.bench_loader import make_loader, time_loader
    from mixtail.pipelines.config import DataConfig
    from mixtail.pipelines.sources.build import build_dataset

    import torch

    ds = build_dataset(DataConfig(dataset="converted", root=str(out), imbalance_ratio=1.0), "train", decoded=False)
    cpu = torch.device("cpu")
    read_args = argparse.Namespace(batch_size=args.batch_size, size=args.size, threads=args.threads)
    rates = {}
    for layout in ("file list", "packed blob"):
        ctx = packed_blob(ds.files, out.parent / "blob.bin") if layout == "packed blob" else contextlib.nullcontext()
        with ctx:
            loader, _ = make_loader("dali", ds, read_args, cpu)
            rates[layout] = float(np.median(time_loader(loader, cpu, warmup=2, windows=args.windows,
                                                        window_batches=args.window_batches)))
            loader.close()
    (out.parent / "blob.bin").unlink(missing_ok=True)
    return rates


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> list[dict]:
    from mixtail.pipelines.convert import verify

    p = argument_parser("mixtail bench convert", __doc__)
    p.add_argument("--source", action="append", default=[], help="a source to convert (repeatable; default: the "
                   f"photos and a CIFAR-10 subset from {REAL_DATA_HELP})")
    p.add_argument("--image-root", default="", help="for a --source list or .json")
    p.add_argument("--targets", default="ffcv,dali")
    p.add_argument("--modes", default="", help="write modes, comma-separated (default: each target's all)")
    p.add_argument("--max-resolution", default="none,256", help="comma-separated; none = keep sizes")
    p.add_argument("--cifar-per-class", type=positive_int, default=200)
    p.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1)
    p.add_argument("--reps", type=positive_int, default=1, help="conversions per row (median)")
    p.add_argument("--dali-read", action="store_true", help="also time the DALI executor reading each dali output")
    p.add_argument("--size", type=positive_int, default=64, help="--dali-read: training image side")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 2)
    p.add_argument("--windows", type=positive_int, default=3)
    p.add_argument("--window-batches", type=positive_int, default=10)
    out_dir_argument(p, "--out-dir")
    args = p.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for t in targets:
        if t not in MODES:
            raise UsageError(f"--targets: {t!r} is not ffcv or dali")
    if "ffcv" in targets:
        import mixtail.pipelines.sources.beton

    rows, read_rows = [], []
    with tempfile.TemporaryDirectory(prefix="mixtail_bench_convert_") as tmp_name:
        tmp = Path(tmp_name)
        sources = ([(s, s, {"image_root": args.image_root} if args.image_root else {}) for s in args.source]
                   or default_sources(tmp, args.cifar_per_class))
        for name, source, extra in sources:
            largest = None
            for target in targets:
                modes = [m for m in (args.modes.split(",") if args.modes else MODES[target]) if m in MODES[target]]
                for max_res in _resolutions(args.max_resolution):
                    for mode in modes:
                        out = tmp / "out"
                        times = []
                        for _ in range(args.reps):
                            manifest, seconds = convert_once(source, extra, out, target, mode, max_res, args.jobs)
                            times.append(seconds)
                        sizes = [o["bytes"] for o in manifest.outputs.values()]
                        n = sum(s.num_images for s in manifest.splits.values())
                        if largest is None:
                            largest = _largest(out)
                        if max_res is not None and largest is not None and max_res >= largest:
                            shutil.rmtree(out)
                            continue  # the same output as without a bound
                        verify(out, sample=16)
                        seconds = float(np.median(times))
                        stored = {k: v for s in manifest.splits.values() for k, v in s.stored.items()}
                        rows.append({"source": name, "target": target, "write_mode": mode,
                                     "max_resolution": max_res, "images": n, "seconds": seconds,
                                     "img_per_s": n / seconds, "mib": sum(sizes) / 2**20,
                                     "kib_per_img": sum(sizes) / 1024 / n, "stored": stored, "verified": True})
                        if args.dali_read and target == "dali":
                            rates = dali_read(out, args)
                            for layout, rate in rates.items():
                                read_rows.append({"source": name, "write_mode": mode, "max_resolution": max_res,
                                                  "layout": layout, "size": args.size, "pairs_per_s": rate,
                                                  "mib": rows[-1]["mib"]})
                        shutil.rmtree(out)
    print(format_table([{**{k: r[k] for k in ("source", "target", "write_mode", "max_resolution", "images")},
                         "img_per_s": round(r["img_per_s"]), "mib": round(r["mib"], 1),
                         "kib/img": round(r["kib_per_img"], 1),
                         "stored": " ".join(f"{k}:{v}" for k, v in r["stored"].items())} for r in rows]))
    if read_rows:
        print()
        print(format_table([{**r, "pairs_per_s": round(r["pairs_per_s"]), "mib": round(r["mib"], 1)}
                            for r in read_rows]))
    config = {**vars(args), "sources": [s[0] for s in sources],
              "metric": "images written per second by one whole mixtail convert run (median of --reps)"}
    path = write_json("convert_dali_read" if read_rows else "convert", rows + read_rows, config=config,
                      env=environment(), out_dir=args.out_dir)
    print(f"wrote {path}")
    return rows


def _largest(out: Path) -> int | None:
    """The longest side of any image in an output written without a bound (None when it had one)."""
    from mixtail.pipelines.sources.manifest import read_manifest, split_table

    m = read_manifest(out)
    if m.options["max_resolution"] is not None:
        return None
    return int(max(split_table(m, s).sizes.max() for s in m.splits))


if __name__ == "__main__":
    main(sys.argv[1:])
