"""`mixtail convert`: a dataset converted once into what a loader backend reads fastest, with a manifest, and
`mixtail convert --verify` to prove an output matches its source.

    mixtail convert SOURCE --to ffcv|dali --out PATH [--format imagefolder|cifar|filelist|inat-json]
                   [--image-root DIR] [--test-list FILE] [--split train|test|both] [--imbalance-ratio R]
                   [--write-mode raw|jpg|smart|proportion] [--max-resolution N] [--jpeg-quality Q]
                   [--on-error stop|skip] [--jobs N] [--overwrite]
    mixtail convert --verify PATH [--sample N|all]

The parts: sources.py reads the source, encoding.py makes the stored bytes, writers.py writes a split into a
temporary folder and publishes it, conversion.py runs a conversion (`convert(ConvertOptions(...))`), verify.py
checks an output against its source; options.py holds the options and their choices.

Sources (--format, detected when omitted: a .json file is inat-json, another file a filelist, a folder holding
cifar-10-batches-py/ or cifar-100-python/ cifar, any other folder an imagefolder):
- imagefolder: SOURCE/train/<class>/<file> and SOURCE/test/<class>/<file>, or SOURCE/<class>/<file> (a train
  split only); the file order is sources/folders.scan_image_folder's.
- cifar: torchvision's on-disk CIFAR-10/100 (SOURCE is its root, or the cifar-10-batches-py folder itself).
- filelist: an ImageNet-LT `path label` list (SOURCE: the training list, --test-list the test list), paths
  relative to --image-root.
- inat-json: iNaturalist 2018's COCO-style train2018.json (SOURCE) and val2018.json (--test-list), file names
  relative to --image-root.
One class map per dataset: the training split's (pipelines/sources/), also when only --split test is written.
--imbalance-ratio ρ writes the canonical long-tailed subset of the training split (sources/subsets.long_tailed_indices,
LDAM-DRW's rule), in the order build_dataset gives it; without it every training image is written in source
order and `mixtail train` takes the subset at any ratio (pipelines/sources/manifest.py). Test splits are written whole.

Targets:
- `--to ffcv`: PATH/<split>.beton (image, label and source-index fields; pipelines/sources/beton.write_beton) in
  FFCV's write modes: raw pixels, jpg, smart (JPEG above 128×128×3 bytes of pixels) or proportion (half as
  JPEG, drawn from a fixed seed). The FFCV backend reads it (data.backend=ffcv).
- `--to dali`: PATH/<split>.txt, a `path label` list of image files under PATH/images/<split>/<label>/, which
  the DALI backend reads through fn.io.file.read (and the torch backend decodes into memory). What is stored:
  raw keeps a source file's own bytes when it is a plain 8-bit RGB or grey JPEG/PNG that needs no resize, and
  writes PNG (lossless) otherwise; jpg re-encodes every image as JPEG at --jpeg-quality; smart keeps the
  plain files that need no resize and re-encodes the rest as JPEG (proportion is FFCV's only). Other pixel
  formats (16-bit, CMYK, palette, alpha) are stored as sources/images.load_rgb decodes them, so every backend reads
  the same RGB.
- --max-resolution N shrinks every image whose longer side exceeds N to N (aspect ratio kept; PIL bilinear,
  antialiased, as sources/folders.decode_in_memory resizes), for both targets; smaller images are never enlarged.
Both write manifest.json (schema: pipelines/sources/manifest.py) and a per-split table of labels, source indices and
stored sizes, so the samplers and the Many/Medium/Few split read classes and counts without rescanning.

Why these files for DALI (measured read speeds of each choice): docs/results.md, "Converted formats".

Failure behaviour:
- Every source file is checked first (sources/images.check_images: zero-byte, truncated, not an image, unsupported
  pixel format): with --on-error stop (the default) a bad file ends the run, named by path in one line,
  before anything is written; with --on-error skip it is left out, counted, listed in the manifest
  (`skipped`) and the run says how many. A file that passes the header check and then fails to decode is
  handled the same way when it is reached (stop: nothing is left behind; skip: the split is written again
  without it).
- All work happens in PATH's parent under `.<name>.partial-<pid>-<random>` and is renamed to PATH only when
  complete, manifest last; a killed run leaves only that hidden folder, which no reader accepts. The next
  run removes such leftovers of dead processes and starts clean (no resume). A second conversion to the same PATH
  while one runs is refused, naming the pid (a lock on `.<name>.lock` beside PATH, mixtail/locks.py). An existing PATH is replaced
  only with --overwrite, and only if it is an earlier conversion or empty.

`--verify PATH` re-reads the output and the source it names: the class map; the number of images, every
source index and every label (against the source's own, the first difference named); the class counts; the
pixels of a sample of images per split (--sample, default 256 plus the first and last; `all` for all):
original bytes must equal the source file, raw and PNG pixels must equal the source's decoded (and
resized) pixels exactly, and a JPEG must come within JPEG_TOLERANCE_DB (1 dB) of the PSNR that the target's own
encoder and decoder give the source pixels at the same quality (`jpeg_round_trip`; with the libraries that
wrote it, that is the same image); and last every output file's sha256. Any difference exits 2 with
one line naming it; an interrupted or partial output is refused. The source must still be there.

The package exports `convert`, `ConvertOptions` and `verify`.
"""

from mixtail.pipelines.convert.conversion import convert
from mixtail.pipelines.convert.options import ConvertOptions
from mixtail.pipelines.convert.verify import verify

__all__ = ["ConvertOptions", "convert", "verify"]
