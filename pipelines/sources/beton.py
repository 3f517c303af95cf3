"""Writing and reading FFCV `.beton` files: the layer `mixtail convert --to ffcv` and the FFCV backend
stand on.

A mixtail `.beton` holds, per sample, in this order:

    image  RGBImageField  HWC uint8 RGB, stored raw or as JPEG (per sample; see `write_beton`)
    label  IntField       the class
    index  IntField       the sample's index in the source dataset, so a round trip can be checked

Reading never lets FFCV draw anything. FFCV's RandomResizedCrop decoder draws its own windows, which
would break the rule that every batch is a function of (seed, epoch, rank, batch) alone. Here FFCV only
decodes: `BetonReader` puts each image on a fixed S×S uint8 canvas (shrunk to fit if it is larger,
aspect ratio kept, never enlarged; top-left; the rest zero) and reports its (h, w) there, and the crop
windows of the batch plan are applied afterwards on the device by the project's torch ops. The order
of every epoch is given explicitly (`BetonReader.epoch(order)`), repeats allowed, and FFCV follows it.

    from mixtail.pipelines.sources.beton import write_beton, BetonReader, read_all
    write_beton("train.beton", ((img, label, i) for i, (img, label) in enumerate(data)),
                num_samples=len(data), write_mode="jpg", max_resolution=256)
    reader = BetonReader("train.beton", batch_size=256, canvas=256)
    for b in reader.epoch(order):   # b.images (B, S, S, 3) uint8, b.sizes (B, 2) (h, w), b.labels, b.indices
        ...

    mixtail data info PATH.beton   # print the sample count, modes, sizes and classes

FFCV 1.0.2 facts this module is built on (measured with FFCV 1.0.2 on the CPU, and read in its source):
- `Loader(order=...)` accepts an `OrderOption` or an *instance* of a `TraversalOrder` subclass, which it
  calls with itself; `sample_order(epoch)` then gives every epoch's order (`_PlannedOrder`).
- `Loader.__len__` and the per-epoch truncation `order[:len(self) * batch_size]` both use the order the
  Loader drew at construction (`first_traversal_order`); orders of varying length therefore need that
  attribute updated per epoch, which `BetonReader.epoch` does.
- A batch's arrays live in one of `batches_ahead + 2` reused slots, and the producer thread refills a
  slot while the consumer holds the next batch: a batch is valid until the next one is requested.
- `SimpleRGBImageDecoder` only decodes one constant size, hence `_CanvasDecoder`; numba ops must come
  before `ToTensor`; each new decoder instance is compiled again by numba (seconds, once per reader).
"""

from __future__ import annotations

import contextlib
import operator
import os
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from mixtail.errors import ConfigError, DataError
from mixtail.pipelines.sources.types import ImageArrays

# FFCV imports torch, numba and cv2 and builds numba types at import time; keep it out of
# `import mixtail.pipelines` (STYLE §3). Importing it also sets torch's thread count to 1 process-wide
# (ffcv/pipeline/compiler.py calls torch.set_num_threads at import, and again per Loader and per epoch):
# `_keep_torch_threads` puts the trainer's setting back each time.
_TORCH_THREADS = torch.get_num_threads()
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.rgb_image import encode_jpeg, resizer
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader
from ffcv.memory_allocator import MemoryAllocator
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.pipeline_spec import PipelineSpec
from ffcv.pipeline.state import State
from ffcv.reader import Reader
from ffcv.transforms import ToTensor
from ffcv.traversal_order.base import TraversalOrder
from ffcv.writer import MAX_PAGE_SIZE, MIN_PAGE_SIZE, DatasetWriter

torch.set_num_threads(_TORCH_THREADS)

WRITE_MODES = ("raw", "jpg", "smart", "proportion")
FIELDS = ("image", "label", "index")
# RGBImageField stores width and height as uint16.
MAX_SIDE = np.iinfo(np.uint16).max
# `smart` stores an image as JPEG when its raw pixels exceed this many bytes: 128×128×3. Raw always reads
# faster; what JPEG buys is size, and size decides whether a dataset stays in the page cache. Measured on
# the 2-core CPU development machine (shared, so ranges over 3 runs), one numba thread, img/s raw vs JPEG:
# CIFAR-10 at 32 px 234k-247k vs 28k-61k (3.0 vs 1.0 KiB per image); the real photos at 64 px 47k-81k vs
# 25k (8.8 vs 2.0 KiB), at 128 px 11k-30k vs 8k-10k (35 vs 5 KiB), at 256 px 3.6k-7.0k vs 1.3k-3.1k
# (138 vs 16 KiB: 100k images take 14 GB raw, 1.6 GB as JPEG).
DEFAULT_SMART_THRESHOLD = 128 * 128 * 3
# RGBImageField's per-sample storage modes, as FFCV 1.0.2 writes them (ffcv/fields/rgb_image.py IMAGE_MODES).
# Plain ints: IMAGE_MODES is a numba typed dict, and its first lookup costs a numba compile (about 1 s).
JPG, RAW = 0, 1


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def page_size(max_resolution: int | None) -> int:
    """FFCV's page size for a file: the smallest power of two that holds twice a raw image of max_resolution²
    pixels (a JPEG of noise can outgrow the raw pixels), at least FFCV's 2 MiB minimum; FFCV's default of
    8 MiB when the resolution is unbounded.

    A sample must fit in one page, and a file ends on a whole page (the last one is written padded): a
    small page keeps small files small (2,000 CIFAR images take 6 MB raw; 8 MiB pages make that 16 MiB).
    OS-cache reading (BetonReader) maps the file and does not depend on the page size.
    """
    if max_resolution is None:
        return 4 * MIN_PAGE_SIZE
    raw_bytes = 3 * max_resolution * max_resolution
    return min(max(MIN_PAGE_SIZE, 1 << (2 * raw_bytes - 1).bit_length()), MAX_PAGE_SIZE // 2)


def _check_options(write_mode: str, max_resolution: int | None, jpeg_quality: int, smart_threshold: int,
                   compress_probability: float) -> None:
    if write_mode not in WRITE_MODES:
        raise ConfigError(f"write_mode: must be one of {', '.join(WRITE_MODES)}, got {write_mode!r}")
    if max_resolution is not None and not 1 <= max_resolution <= MAX_SIDE:
        raise ConfigError(f"max_resolution: must be in [1, {MAX_SIDE}] or None, got {max_resolution}")
    if not 1 <= jpeg_quality <= 100:
        raise ConfigError(f"jpeg_quality: must be in [1, 100], got {jpeg_quality}")
    if smart_threshold < 0:
        raise ConfigError(f"smart_threshold: must be >= 0 bytes, got {smart_threshold}")
    if not 0.0 <= compress_probability <= 1.0:
        raise ConfigError(f"compress_probability: must be in [0, 1], got {compress_probability}")


def _check_image(image, where: str) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise DataError(f"{where}: image must be an HWC uint8 RGB array (H, W, 3), got {desc}")
    if not (1 <= image.shape[0] <= MAX_SIDE and 1 <= image.shape[1] <= MAX_SIDE):
        raise DataError(f"{where}: image size {image.shape[0]}×{image.shape[1]} is outside 1..{MAX_SIDE}")
    return np.ascontiguousarray(image)


def _as_int64(value, name: str, where: str) -> int:
    try:
        value = operator.index(value)  # rejects floats and bools-as-floats; numpy integers pass
    except TypeError:
        raise DataError(f"{where}: {name} must be an integer, got {value!r}") from None
    if not np.iinfo(np.int64).min <= value <= np.iinfo(np.int64).max:
        raise DataError(f"{where}: {name} {value} does not fit in int64")
    return value


def write_beton(path: str | os.PathLike, samples: Iterable[tuple[np.ndarray, int, int]], *, num_samples: int,
                write_mode: str = "smart", max_resolution: int | None = None, jpeg_quality: int = 90,
                smart_threshold: int = DEFAULT_SMART_THRESHOLD, compress_probability: float = 0.5,
                seed: int = 0) -> Path:
    """Write `num_samples` (image, label, sample_index) triples to a `.beton` at `path`; return `path`.

    image: (H, W, 3) uint8 RGB, already decoded; label and sample_index: integers (int64).
    write_mode, per image after the `max_resolution` resize:
      raw         uint8 pixels (largest file, fastest to read: a memcpy);
      jpg         JPEG at `jpeg_quality` (lossy);
      smart       JPEG when the raw pixels take more than `smart_threshold` bytes, raw otherwise. FFCV's own
                  `smart` needs `smart_threshold` too: without it FFCV writes everything raw (measured), so
                  here it always has a value (DEFAULT_SMART_THRESHOLD, 128×128×3 bytes);
      proportion  JPEG with probability `compress_probability`, raw otherwise. FFCV draws this from numpy's
                  global generator; here the draw comes from `seed`, so a conversion is reproducible.
    max_resolution: shrink images whose longer side exceeds it to that side (FFCV's own resizer, cv2
      INTER_AREA), aspect ratio kept; smaller images are stored as they are.

    The file is written under a temporary name in the target directory (`.<name>.partial-<pid>-<random>`) and
    renamed to `path` only once complete, so an interrupted or failed write never leaves a `.beton` at
    `path`; a failure removes the temporary file, a kill leaves it under its `.partial-` name.
    Encoding runs in this process, in the order of `samples`: the caller parallelizes the source decoding
    (the slow part) and keeps the order. (FFCV's `DatasetWriter.from_indexed_dataset` would parallelize
    across processes, but it needs random access, and in 1.0.2 a worker that raises leaves it waiting
    forever.)
    """
    _check_options(write_mode, max_resolution, jpeg_quality, smart_threshold, compress_probability)
    if num_samples < 1:
        raise DataError(f"{path}: num_samples must be at least 1, got {num_samples}")
    path = Path(path)
    fields = {"image": RGBImageField(write_mode="raw"), "label": IntField(), "index": IntField()}
    # Which images `proportion` compresses, drawn up front so the result depends on the seed only.
    compress = np.random.default_rng(seed).random(num_samples) < compress_probability

    # Beside the target, so the rename stays on one file system; FFCV creates it (with the umask's mode,
    # unlike mkstemp's 0600).
    tmp_name = str(path.parent / f".{path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    writer = DatasetWriter(tmp_name, fields, page_size=page_size(max_resolution), num_workers=1)
    writer.num_samples = num_samples
    try:
        writer.prepare()  # header and field descriptors
        # prepare() also makes a shared-memory metadata table for FFCV's writer processes. One process needs
        # none, and a killed write would leak the segment in /dev/shm: the table is a plain array instead,
        # handed to finalize() in the one attribute it reads (`.buf`).
        writer.metadata_sm.close()
        writer.metadata_sm.unlink()
        metadata = np.zeros(num_samples, dtype=writer.metadata_type)
        allocator = MemoryAllocator(tmp_name, writer.data_region_start, writer.page_size)
        count = _write_samples(path, samples, num_samples, metadata, allocator, write_mode, max_resolution,
                               jpeg_quality, smart_threshold, compress)
        if count != num_samples:
            raise DataError(f"{path}: num_samples is {num_samples} but the samples ended after {count}")
        writer.metadata_sm = SimpleNamespace(buf=metadata)
        writer.finalize(allocator.allocations)
        with open(tmp_name, "rb+") as fp:
            os.fsync(fp.fileno())
        os.replace(tmp_name, path)
        directory = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except BaseException as err:
        if isinstance(err, OSError):
            # What reached the disk before it failed (a full disk: how far the file got), for the caller's
            # message once the partial file is gone (pipelines/convert.py).
            with contextlib.suppress(OSError):
                err.bytes_written = os.stat(tmp_name).st_size
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def _write_samples(path: Path, samples, num_samples: int, metadata: np.ndarray, allocator: MemoryAllocator,
                   write_mode: str, max_resolution: int | None, jpeg_quality: int, smart_threshold: int,
                   compress: np.ndarray) -> int:
    f_image, f_label, f_index = (metadata[f"f{i}"] for i in range(len(FIELDS)))
    count = 0
    with allocator:
        for i, sample in enumerate(samples):
            where = f"{path}: sample {i}"
            if i >= num_samples:
                raise DataError(f"{path}: num_samples is {num_samples} but the samples go on")
            try:
                image, label, index = sample
            except (TypeError, ValueError):
                raise DataError(f"{where}: expected an (image, label, sample_index) triple") from None
            image = resizer(_check_image(image, where), max_resolution)
            f_label[i] = _as_int64(label, "label", where)
            f_index[i] = _as_int64(index, "sample_index", where)
            as_jpg = (write_mode == "jpg" or (write_mode == "smart" and image.nbytes > smart_threshold)
                      or (write_mode == "proportion" and compress[i]))
            data = encode_jpeg(image, jpeg_quality) if as_jpg else np.ascontiguousarray(image).reshape(-1)
            if data.nbytes > allocator.page_size:
                raise DataError(f"{where}: {image.shape[0]}×{image.shape[1]} image takes {data.nbytes} bytes, "
                                f"more than FFCV's {allocator.page_size}-byte page; set or lower max_resolution")
            # One allocation per sample, so FFCV's retry for samples split across pages never triggers.
            allocator.set_current_sample(i)
            ptr, storage = allocator.malloc(data.nbytes)
            storage[:] = data
            record = f_image[i]
            record["mode"] = JPG if as_jpg else RAW
            record["height"], record["width"] = image.shape[:2]
            record["data_ptr"] = ptr
            count += 1
    return count


# --------------------------------------------------------------------------------------------------
# What a .beton holds, without decoding
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BetonInfo:
    """The metadata table of a `.beton`: per sample, its label, source index and stored image."""

    path: Path
    labels: np.ndarray  # (N,) int64
    indices: np.ndarray  # (N,) int64 sample index in the source dataset
    heights: np.ndarray  # (N,) int64 stored size (after max_resolution)
    widths: np.ndarray  # (N,) int64
    jpeg: np.ndarray  # (N,) bool: stored as JPEG (else raw)

    def __len__(self) -> int:
        return len(self.labels)


def _open(path: Path) -> Reader:
    if not path.is_file():
        raise DataError(f"{path}: no such .beton file")
    try:
        reader = Reader(str(path))
    except (AssertionError, ValueError, KeyError, IndexError) as err:  # what 1.0.2 raises on a foreign file
        raise DataError(f"{path}: not a readable FFCV .beton ({err})") from None
    names = tuple(reader.field_names)
    types = tuple(type(h) for h in reader.handlers.values())
    if names != FIELDS or types != (RGBImageField, IntField, IntField):
        raise DataError(f"{path}: fields are {names}, expected {FIELDS} (image, label, index) as write_beton "
                        "writes them")
    return reader


def beton_info(path: str | os.PathLike) -> BetonInfo:
    """Read a `.beton`'s metadata table (labels, source indices, stored sizes and modes); decodes nothing."""
    path = Path(path)
    meta = _open(path).metadata
    image = meta["f0"]
    return BetonInfo(path=path, labels=meta["f1"].astype(np.int64), indices=meta["f2"].astype(np.int64),
                     heights=image["height"].astype(np.int64), widths=image["width"].astype(np.int64),
                     jpeg=image["mode"] == JPG)


# --------------------------------------------------------------------------------------------------
# Reading: FFCV decodes onto a canvas, in an order given per epoch
# --------------------------------------------------------------------------------------------------


def fit_size(height, width, canvas):
    """(h, w) of an image of size (height, width) on an S×S canvas: shrunk so the longer side is S when it
    is longer than S (floor, at least 1), unchanged otherwise. Plain integer code, so numba compiles the
    same function inside the decoders."""
    longer = max(height, width)
    if longer <= canvas:
        return height, width
    return max(1, (height * canvas) // longer), max(1, (width * canvas) // longer)


class _CanvasDecoder(Operation):
    """RGBImageField decoder: every image onto an S×S uint8 canvas (see `fit_size`), top-left, rest zero.

    Output (B, S, S, 3) uint8. JPEGs decode with FFCV's libjpeg-turbo `imdecode` into a scratch buffer;
    an image larger than the canvas is shrunk with FFCV's `resize_crop` (OpenCV, INTER_AREA, as FFCV's
    writer resizes) into a second scratch buffer; the result is copied into the canvas.
    """

    def __init__(self, canvas: int):
        super().__init__()
        self.canvas = canvas

    def declare_state_and_memory(self, previous_state: State):
        meta = self.metadata
        h, w = meta["height"].astype(np.uint64), meta["width"].astype(np.uint64)
        jpg = meta["mode"] == JPG
        # Scratch sized to what the file needs, not to the largest height × the largest width (FFCV's
        # ResizedCrop decoders allocate max_h·max_w·3 per sample): one byte where a buffer is never used.
        decode_bytes = int((h * w * 3)[jpg].max()) if jpg.any() else 1
        big = np.maximum(h, w) > self.canvas
        resize_bytes = 3 * self.canvas * self.canvas if big.any() else 1
        shape = (self.canvas, self.canvas, 3)
        u8 = np.dtype("<u1")
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=u8),
                (AllocationQuery(shape, u8), AllocationQuery((decode_bytes,), u8),
                 AllocationQuery((resize_bytes,), u8)))

    def generate_code(self):
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_c = Compiler.compile(resize_crop)
        fit_c = Compiler.compile(fit_size)
        jpg = JPG
        canvas = self.canvas

        def decode(batch_indices, buffers, metadata, storage_state):
            destination, decode_scratch, resize_scratch = buffers
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                data = mem_read(field["data_ptr"], storage_state)
                height = np.int64(field["height"])
                width = np.int64(field["width"])
                if field["mode"] == jpg:
                    image = decode_scratch[dst_ix][:height * width * 3].reshape(height, width, 3)
                    imdecode_c(data, image, height, width, height, width, 0, 0, 1, 1, False, False)
                else:
                    image = data.reshape(height, width, 3)
                h, w = fit_c(height, width, canvas)
                if h != height or w != width:
                    small = resize_scratch[dst_ix][:h * w * 3].reshape(h, w, 3)
                    resize_c(image, 0, height, 0, width, small)
                    image = small
                out = destination[dst_ix]
                out[:h, :w] = image
                out[h:] = 0
                out[:h, w:] = 0
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class _SizeDecoder(Operation):
    """RGBImageField decoder that outputs each image's (h, w) on the canvas: (B, 2) int64. Reads only the
    metadata table, so it costs nothing next to the pixels."""

    def __init__(self, canvas: int):
        super().__init__()
        self.canvas = canvas

    def declare_state_and_memory(self, previous_state: State):
        i64 = np.dtype("<i8")
        return replace(previous_state, jit_mode=True, shape=(2,), dtype=i64), AllocationQuery((2,), i64)

    def generate_code(self):
        fit_c = Compiler.compile(fit_size)
        canvas = self.canvas

        def sizes(batch_indices, destination, metadata, storage_state):
            for dst_ix in range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                h, w = fit_c(np.int64(field["height"]), np.int64(field["width"]), canvas)
                destination[dst_ix, 0] = h
                destination[dst_ix, 1] = w
            return destination[:len(batch_indices)]

        return sizes


@contextlib.contextmanager
def _keep_torch_threads():
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _PlannedOrder(TraversalOrder):
    """The order FFCV traverses: whatever `BetonReader.epoch` set last, for any epoch number.

    FFCV 1.0.2's Loader takes an instance of a TraversalOrder subclass and calls it with itself (measured:
    the class itself is `not a supported order type`, a plain instance is `not callable`).
    `distributed` is never set: the batch plan shards by rank before the indices reach here.
    """

    def __init__(self):  # no loader yet: FFCV binds it in __call__
        self.order = np.empty(0, dtype=np.uint64)

    def __call__(self, loader: Loader) -> "_PlannedOrder":
        super().__init__(loader)
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.order


@dataclass(frozen=True)
class BetonBatch:
    """One decoded batch, in the order asked for. CPU tensors in FFCV's reused buffers: valid until the
    next batch is requested (copy what must live longer)."""

    images: torch.Tensor  # (B, S, S, 3) uint8; image b fills [:sizes[b, 0], :sizes[b, 1]], the rest is 0
    sizes: torch.Tensor  # (B, 2) int64 (h, w) on the canvas
    labels: torch.Tensor  # (B,) int64
    indices: torch.Tensor  # (B,) int64 source-dataset index (the `index` field), not the .beton position


class BetonReader:
    """FFCV Loader over a mixtail `.beton` that decodes onto an S×S canvas, in orders given per epoch.

    `epoch(order)` yields `BetonBatch`es of `batch_size` for the .beton positions in `order` (0..N−1,
    repeats allowed), in exactly that order; the last batch is partial when len(order) is not a multiple
    of batch_size (FFCV's drop_last is off). One reader serves one stream; several readers may be
    iterated at once (numba's tbb or omp threading layer; `workqueue` aborts, measured). Constructing one
    compiles its decoders with numba on the first batch (seconds): make one per stream and reuse it.

    num_threads: FFCV's `num_workers`, the numba threads decoding a batch (FFCV sets numba's and torch's
    thread counts process-wide from it).
    """

    def __init__(self, path: str | os.PathLike, *, batch_size: int, canvas: int, num_threads: int = 1,
                 batches_ahead: int = 2):
        if batch_size < 1:
            raise ConfigError(f"batch_size: must be at least 1, got {batch_size}")
        if not 1 <= canvas <= MAX_SIDE:
            raise ConfigError(f"canvas: must be in [1, {MAX_SIDE}], got {canvas}")
        if num_threads < 1:
            raise ConfigError(f"num_threads: must be at least 1, got {num_threads}")
        self.path = Path(path)
        self.num_samples = len(_open(self.path).metadata)
        self.batch_size = batch_size
        self.canvas = canvas
        self._order = _PlannedOrder()
        pipelines = {
            # A decoder in a plain list is taken for a transform unless it subclasses the field's default
            # decoder (FFCV then prepends SimpleRGBImageDecoder); a PipelineSpec names it explicitly.
            "image": PipelineSpec("image", decoder=_CanvasDecoder(canvas), transforms=[ToTensor()]),
            "label": [ToTensor()],
            "index": [ToTensor()],
            "image_size": PipelineSpec("image", decoder=_SizeDecoder(canvas), transforms=[ToTensor()]),
        }
        # seed is unused by our order but FFCV draws one from numpy's global generator when it is None.
        with _keep_torch_threads():
            self._loader = Loader(str(self.path), batch_size=batch_size, num_workers=num_threads,
                                  order=self._order, os_cache=True, seed=0, pipelines=pipelines,
                                  drop_last=False, batches_ahead=batches_ahead)
        # FFCV returns outputs in the order of its pipeline specs: the fields, then the extra output.
        self._outputs = list(self._loader.pipeline_specs)

    def epoch(self, order) -> Iterator[BetonBatch]:
        """Decode the samples at .beton positions `order` (1-D integers), in that order, batch by batch."""
        order = np.asarray(order)
        if order.ndim != 1 or not (order.size == 0 or np.issubdtype(order.dtype, np.integer)):
            raise DataError(f"{self.path}: an epoch's order must be a 1-D integer array, got {order.dtype} "
                            f"{order.shape}")
        if order.size and (order.min() < 0 or order.max() >= self.num_samples):
            bad = order[(order < 0) | (order >= self.num_samples)][0]
            raise DataError(f"{self.path}: order holds position {bad}, outside 0..{self.num_samples - 1}")
        # uint64, contiguous: the type the decoders were compiled for, so no epoch triggers a recompile.
        self._order.order = np.ascontiguousarray(order, dtype=np.uint64)
        self._loader.first_traversal_order = self._order.order  # what Loader.__len__ (and the cut) reads
        with _keep_torch_threads():
            return self._batches(iter(self._loader))

    def _batches(self, it) -> Iterator[BetonBatch]:
        try:
            for outputs in it:
                out = dict(zip(self._outputs, outputs))
                yield BetonBatch(images=out["image"], sizes=out["image_size"], labels=out["label"][:, 0],
                                 indices=out["index"][:, 0])
        finally:
            # An epoch left part-way (a loader restart, `close()` on this generator, its garbage collection)
            # must stop FFCV's producer thread: the thread holds the EpochIterator alive, so its __del__ never
            # runs, and it would otherwise wait forever on a full queue with its batch buffers.
            it.close()


def read_all(path: str | os.PathLike, *, batch_size: int = 256,
             num_threads: int = 1) -> Iterator[tuple[np.ndarray, int, int]]:
    """Every sample of a `.beton` in position order, decoded by FFCV at its stored size: (image (h, w, 3)
    uint8 copy, label, sample_index). What `mixtail convert --verify` compares against the source."""
    info = beton_info(path)
    canvas = int(max(info.heights.max(), info.widths.max()))
    reader = BetonReader(path, batch_size=batch_size, canvas=canvas, num_threads=num_threads)
    for batch in reader.epoch(np.arange(len(info))):
        for image, (h, w), label, index in zip(batch.images.numpy(), batch.sizes.tolist(),
                                               batch.labels.tolist(), batch.indices.tolist()):
            yield image[:h, :w].copy(), label, index


@dataclass(frozen=True)
class BetonDataset:
    """The samples of a `.beton` as a dataset: sample i is stored at .beton position `positions[i]`."""

    path: Path
    labels: np.ndarray  # (N,) int64
    classes: list[str]
    sizes: np.ndarray  # (N, 2) int32 (height, width) as stored; plans draw their windows on these
    positions: np.ndarray  # (N,) int64 position of each sample in the .beton

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> "BetonDataset":
        return replace(self, labels=self.labels[indices], sizes=self.sizes[indices], positions=self.positions[indices])


def beton_dataset(path, classes: list[str] | None = None) -> BetonDataset:
    """Every sample of the `.beton` at `path`, in position order, read from its metadata table (nothing is
    decoded). classes: the class names (a .beton stores only label numbers); None names them "0", "1", ..."""
    info = beton_info(path)
    if len(info) == 0:
        raise DataError(f"{info.path}: the .beton holds no samples")
    top = int(info.labels.max())
    if classes is None:
        classes = [str(k) for k in range(top + 1)]
    if info.labels.min() < 0 or top >= len(classes):
        bad = info.labels[(info.labels < 0) | (info.labels >= len(classes))][0]
        raise DataError(f"{info.path}: label {bad} is outside the {len(classes)} classes given")
    sizes = np.stack([info.heights, info.widths], 1).astype(np.int32)
    return BetonDataset(info.path, info.labels, list(classes), sizes, np.arange(len(info), dtype=np.int64))


def arrays_to_beton(dataset: ImageArrays, path) -> BetonDataset:
    """An in-memory dataset written to a raw `.beton` at `path` (each image's valid region, exactly)."""
    n, h, w, _ = dataset.images.shape
    sizes = np.tile([h, w], (n, 1)) if dataset.sizes is None else np.asarray(dataset.sizes)
    samples = ((dataset.images[i, :sizes[i, 0], :sizes[i, 1]], int(dataset.labels[i]), i) for i in range(n))
    write_beton(path, samples, num_samples=n, write_mode="raw", max_resolution=int(sizes.max()))
    return beton_dataset(path, dataset.classes)
