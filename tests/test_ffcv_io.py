""".beton writing and reading (pipelines/sources/beton.py): round trips in raw and jpg mode, explicit orders with
repeats, two readers at once, resizing at write and at read time, and the write-then-rename guarantee.

Everything runs in this one process, because each new process pays numba's compile of FFCV's pipeline
(seconds, measured); each `BetonReader` still compiles its own decoders, about a second each.

    python -m pytest tests/test_ffcv_io.py -q
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv", reason="FFCV is not installed (pip install -e '.[ffcv]' after the Debian packages "
                                   "in .ci/run)")
import cv2  # noqa: E402  (opencv-python comes with ffcv)
from ffcv.reader import Reader  # noqa: E402
from PIL import Image  # noqa: E402

from mixtail.errors import ConfigError, DataError  # noqa: E402
from mixtail.pipelines.sources.beton import (
    JPG, RAW, BetonReader, beton_info, fit_size, page_size, read_all, write_beton)

pytestmark = pytest.mark.ffcv
N = 20


def _random_images(rng: np.random.Generator, n: int, smooth: bool) -> list[np.ndarray]:
    """n RGB images from 17×23 to 64×48 (sizes drawn in 17..64 × 23..48 and then mixed). `smooth` images are
    upsampled noise, which JPEG codes the way it codes photos; pure noise would make any JPEG error large."""
    images = []
    for _ in range(n):
        h, w = int(rng.integers(17, 65)), int(rng.integers(23, 49))
        if rng.random() < 0.5:
            h, w = w, h
        if smooth:
            coarse = rng.integers(0, 256, (max(2, h // 6), max(2, w // 6), 3), dtype=np.uint8)
            images.append(cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR))
        else:
            images.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return images


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(9)
    images = _random_images(rng, N, smooth=False)
    images[0] = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)  # the extremes of the range
    images[1] = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    labels = rng.integers(0, 7, N)
    indices = rng.permutation(1000)[:N]  # source indices that are not the positions
    return images, labels, indices


def _write(path: Path, images, labels, indices, **kw) -> Path:
    return write_beton(path, zip(images, labels, indices), num_samples=len(images), **kw)


@pytest.fixture(scope="module")
def raw_beton(data, tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("ffcv") / "raw.beton", *data, write_mode="raw")


@pytest.fixture(scope="module")
def raw_reader(raw_beton) -> BetonReader:
    return BetonReader(raw_beton, batch_size=6, canvas=64)


def _collect(batches) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Copies of every batch (FFCV reuses its buffers once the next batch is asked for)."""
    images, sizes, labels, indices, lengths = [], [], [], [], []
    for b in batches:
        images.extend(b.images.numpy().copy())
        sizes.append(b.sizes.numpy().copy())
        labels.append(b.labels.numpy().copy())
        indices.append(b.indices.numpy().copy())
        lengths.append(len(b.labels))
    if not lengths:
        return [], np.zeros((0, 2), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), []
    return images, np.concatenate(sizes), np.concatenate(labels), np.concatenate(indices), lengths


def _check_canvas(canvas: np.ndarray, expected: np.ndarray) -> None:
    h, w = expected.shape[:2]
    np.testing.assert_array_equal(canvas[:h, :w], expected)
    assert not canvas[h:].any() and not canvas[:h, w:].any(), "the canvas outside the image must be zero"


# --------------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------------


def test_raw_round_trip_is_exact(data, raw_beton, raw_reader):
    images, labels, indices = data
    umask = os.umask(0)
    os.umask(umask)
    assert raw_beton.stat().st_mode & 0o777 == 0o666 & ~umask  # readable as any file the user writes
    info = beton_info(raw_beton)
    np.testing.assert_array_equal(info.labels, labels)
    np.testing.assert_array_equal(info.indices, indices)
    np.testing.assert_array_equal(np.stack([info.heights, info.widths], 1), [im.shape[:2] for im in images])
    assert not info.jpeg.any()

    got, sizes, got_labels, got_indices, lengths = _collect(raw_reader.epoch(np.arange(N)))
    assert lengths == [6, 6, 6, 2]  # the last partial batch is returned
    np.testing.assert_array_equal(sizes, [im.shape[:2] for im in images])
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_array_equal(got_indices, indices)
    for canvas, image in zip(got, images):
        assert canvas.shape == (64, 64, 3)
        _check_canvas(canvas, image)


def _stored_bytes(path: Path, position: int) -> bytes:
    """The bytes FFCV stored for an image, found through its metadata and allocation table."""
    reader = Reader(str(path))
    ptr = int(reader.metadata["f0"]["data_ptr"][position])
    size = int(reader.alloc_table["size"][reader.alloc_table["ptr"] == ptr][0])
    with open(path, "rb") as fp:
        fp.seek(ptr)
        return fp.read(size)


def _check_jpeg(image: np.ndarray, path: Path, position: int, original: np.ndarray, max_mean_error: float) -> None:
    """A JPEG read back: close to the same stored bytes decoded by PIL's libjpeg (accurate DCT), and to the
    image that was written. FFCV decodes with libjpeg-turbo's TJFLAG_FASTDCT, measured at a mean of 0.96 to
    1.26 and a max of 4 to 7 levels from PIL on random smooth images and on real photos. The bound
    against the original is the JPEG loss itself (given by the caller); a swapped channel order or a
    misplaced image costs tens of levels in either comparison."""
    assert image.shape == original.shape
    reference = np.asarray(Image.open(io.BytesIO(_stored_bytes(path, position))).convert("RGB")).astype(int)
    diff = np.abs(image.astype(int) - reference)
    assert diff.mean() <= 2.0 and diff.max() <= 10, (position, diff.mean(), diff.max())
    assert np.abs(image.astype(int) - original).mean() <= max_mean_error, position


def test_jpg_round_trip_within_jpeg_tolerance(tmp_path):
    rng = np.random.default_rng(90)
    images = _random_images(rng, N, smooth=True)
    path = _write(tmp_path / "jpg.beton", images, np.arange(N) % 3, np.arange(N), write_mode="jpg",
                  jpeg_quality=90)
    assert beton_info(path).jpeg.all()
    got = list(read_all(path, batch_size=8))
    assert [(label, index) for _, label, index in got] == [(i % 3, i) for i in range(N)]
    for i, ((image, _, _), original) in enumerate(zip(got, images)):
        # Quality 90 on smooth images loses mean ≤ 4.3 levels here.
        _check_jpeg(image, path, i, original, max_mean_error=6.0)


def test_modes_smart_and_proportion(data, tmp_path):
    images, labels, indices = data
    # smart: JPEG exactly for the images whose raw pixels exceed the threshold.
    threshold = 30 * 30 * 3
    info = beton_info(_write(tmp_path / "smart.beton", images, labels, indices, write_mode="smart",
                             smart_threshold=threshold))
    np.testing.assert_array_equal(info.jpeg, [im.nbytes > threshold for im in images])
    assert 0 < info.jpeg.sum() < N
    # The default threshold is 128×128×3 bytes (FFCV's own smart mode without a threshold stores all raw).
    sides = [(128, 128), (129, 128), (40, 500)]
    info = beton_info(write_beton(tmp_path / "default.beton", ((np.zeros((*hw, 3), np.uint8), 0, i)
                                                              for i, hw in enumerate(sides)), num_samples=3))
    np.testing.assert_array_equal(info.jpeg, [False, True, True])
    # proportion: the draw comes from the seed, so the same seed gives the same file.
    first, again, other = (beton_info(_write(tmp_path / f"p{k}.beton", images, labels, indices,
                                             write_mode="proportion", seed=seed)).jpeg
                           for k, seed in enumerate([1, 1, 2]))
    np.testing.assert_array_equal(first, again)
    assert 0 < first.sum() < N and (first != other).any()
    assert Path(tmp_path / "p0.beton").read_bytes() == Path(tmp_path / "p1.beton").read_bytes()


# --------------------------------------------------------------------------------------------------
# Orders
# --------------------------------------------------------------------------------------------------


def test_explicit_order_with_repeats_is_followed(data, raw_reader):
    images, labels, indices = data
    rng = np.random.default_rng(3)
    # A foreground-like stream: with replacement, every position at least once... and one drawn many times.
    for length in (23, 12, 41):  # shorter and then longer than the first epoch: FFCV's length is refreshed
        order = rng.integers(0, N, length)
        order[:5] = 4
        got, sizes, got_labels, got_indices, lengths = _collect(raw_reader.epoch(order))
        assert lengths == [6] * (length // 6) + ([length % 6] if length % 6 else [])
        np.testing.assert_array_equal(got_indices, indices[order])
        np.testing.assert_array_equal(got_labels, labels[order])
        np.testing.assert_array_equal(sizes, [images[i].shape[:2] for i in order])
        for canvas, i in zip(got, order):
            _check_canvas(canvas, images[i])
    assert _collect(raw_reader.epoch(np.array([], dtype=np.int64)))[4] == []


@pytest.mark.slow
def test_two_readers_iterated_at_once(data, raw_beton, raw_reader):
    """A foreground and a background stream drawn in lockstep, as the FFCV backend will."""
    images, labels, indices = data
    rng = np.random.default_rng(4)
    fg_order, bg_order = rng.integers(0, N, 30), rng.permutation(np.tile(np.arange(N), 2))[:30]
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)  # FFCV resets torch's thread count per Loader and epoch; we undo it
    try:
        background = BetonReader(raw_beton, batch_size=6, canvas=64, num_threads=2)
        bg_batches = background.epoch(bg_order)
        assert torch.get_num_threads() == threads + 1
    finally:
        torch.set_num_threads(threads)
    fg_batches = raw_reader.epoch(fg_order)
    for k, (fg, bg) in enumerate(zip(fg_batches, bg_batches)):
        for batch, order in ((fg, fg_order), (bg, bg_order)):
            expected = order[6 * k:6 * k + 6]
            np.testing.assert_array_equal(batch.indices.numpy(), indices[expected])
            for canvas, i in zip(batch.images.numpy(), expected):
                _check_canvas(canvas, images[i])
    assert k == 4


def test_an_epoch_left_part_way_stops_ffcvs_thread(data, raw_reader):
    """A loader restart abandons an epoch: closing its generator must end FFCV's producer thread, which
    otherwise waits forever on its full queue (its EpochIterator is kept alive by the thread itself)."""
    from ffcv.loader.epoch_iterator import EpochIterator

    def producers() -> int:
        return sum(isinstance(t, EpochIterator) and t.is_alive() for t in threading.enumerate())

    before = producers()
    batches = raw_reader.epoch(np.tile(np.arange(N), 5))  # 17 batches: more than FFCV decodes ahead
    next(batches)
    assert producers() == before + 1
    batches.close()
    deadline = time.monotonic() + 10  # the thread checks for termination every 0.5 s
    while producers() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert producers() == before
    assert _collect(raw_reader.epoch(np.arange(6)))[3].tolist() == data[2][:6].tolist()  # the reader still reads


def test_order_is_validated(raw_reader):
    with pytest.raises(DataError, match=f"position {N}, outside 0..{N - 1}"):
        raw_reader.epoch(np.array([0, N]))
    with pytest.raises(DataError, match="position -1"):
        raw_reader.epoch(np.array([-1]))
    with pytest.raises(DataError, match="1-D integer array"):
        raw_reader.epoch(np.array([0.5]))


# --------------------------------------------------------------------------------------------------
# Resizing
# --------------------------------------------------------------------------------------------------


def test_max_resolution_downsizes_at_write(data, tmp_path):
    images, labels, indices = data
    path = _write(tmp_path / "small.beton", images, labels, indices, write_mode="raw", max_resolution=30)
    for (stored, _, _), original in zip(read_all(path), images):
        h, w = original.shape[:2]
        if max(h, w) <= 30:
            np.testing.assert_array_equal(stored, original)
        else:
            # FFCV's writer: scale = 30 / longer side, sizes truncated, cv2 INTER_AREA.
            size = (np.array([w, h]) * (30 / max(h, w))).astype(int)
            assert max(stored.shape[:2]) <= 30 and stored.shape[:2] == (size[1], size[0])
            np.testing.assert_array_equal(stored, cv2.resize(original, tuple(size), interpolation=cv2.INTER_AREA))


def test_canvas_smaller_than_images_shrinks_them(data, raw_beton):
    images = data[0]
    canvas = 37
    assert fit_size(64, 48, canvas) == (37, 27) and fit_size(17, 23, canvas) == (17, 23)
    assert fit_size(1, 500, canvas) == (1, 37)  # never a zero side
    reader = BetonReader(raw_beton, batch_size=8, canvas=canvas)
    got, sizes, *_ = _collect(reader.epoch(np.arange(N)))
    assert sum(max(im.shape[:2]) > canvas for im in images) >= 5
    for canvas_image, (h, w), original in zip(got, sizes, images):
        assert (h, w) == fit_size(*original.shape[:2], canvas)
        expected = original if (h, w) == original.shape[:2] else \
            cv2.resize(original, (int(w), int(h)), interpolation=cv2.INTER_AREA)
        _check_canvas(canvas_image, expected)


# --------------------------------------------------------------------------------------------------
# Write-then-rename, and input errors
# --------------------------------------------------------------------------------------------------


def test_page_size_and_modes_match_ffcv():
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.writer import MIN_PAGE_SIZE

    assert (JPG, RAW) == (IMAGE_MODES["jpg"], IMAGE_MODES["raw"])
    assert page_size(None) == 4 * MIN_PAGE_SIZE and page_size(32) == page_size(512) == MIN_PAGE_SIZE
    assert page_size(1024) == 8 * 2**20 > 2 * 3 * 1024**2 and page_size(2400) == 64 * 2**20 > 2 * 3 * 2400**2
    assert page_size(65535) == 2**31  # FFCV's limit is below 2**32


def test_failed_write_leaves_no_file(data, tmp_path):
    images, labels, indices = data
    path = tmp_path / "out.beton"

    def failing():
        for k, sample in enumerate(zip(images, labels, indices)):
            if k == 12:
                raise OSError("source disk gone")
            yield sample

    with pytest.raises(OSError, match="source disk gone"):
        write_beton(path, failing(), num_samples=N, write_mode="jpg")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="ended after 5"):
        write_beton(path, zip(images[:5], labels, indices), num_samples=N)
    with pytest.raises(DataError, match="samples go on"):
        write_beton(path, zip(images, labels, indices), num_samples=N - 1)
    assert list(tmp_path.iterdir()) == []
    # A failed rewrite keeps the complete file that was there.
    _write(path, images, labels, indices, write_mode="raw")
    before = path.read_bytes()
    with pytest.raises(OSError):
        write_beton(path, failing(), num_samples=N)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


@pytest.mark.slow
def test_killed_write_leaves_only_a_partial_file(tmp_path):
    """kill -9 in the middle of a write: nothing at the final path, a `.partial-` file beside it."""
    script = (
        "import sys, time, numpy as np\n"
        "from mixtail.pipelines.sources.beton import write_beton\n"
        "def samples():\n"
        "    for i in range(10**6):\n"
        "        if i == 50: print('started', flush=True); time.sleep(600)\n"
        "        yield np.full((32, 32, 3), i % 256, np.uint8), 0, i\n"
        "write_beton(sys.argv[1], samples(), num_samples=10**6)\n"
    )
    path = tmp_path / "killed.beton"
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not path.exists()
    assert [p.name.startswith(".killed.beton.partial-") for p in tmp_path.iterdir()] == [True]


def test_bad_input_is_one_error_naming_it(tmp_path):
    path = tmp_path / "bad.beton"
    good = np.zeros((4, 4, 3), np.uint8)
    cases = [
        ([(good.astype(np.float32), 0, 0)], DataError, "sample 0: image must be an HWC uint8 RGB array"),
        ([(good, 0, 0), (good[..., :1], 0, 1)], DataError, "sample 1: image must be"),
        ([(good, 0.5, 0)], DataError, "sample 0: label must be an integer"),
        ([(good, 0, 2**63)], DataError, "sample_index 9223372036854775808 does not fit in int64"),
        ([(good, 0)], DataError, r"sample 0: expected an \(image, label, sample_index\) triple"),
    ]
    for samples, error, message in cases:
        with pytest.raises(error, match=message):
            write_beton(path, samples, num_samples=len(samples))
    for option, message in [({"write_mode": "png"}, "write_mode: must be one of raw, jpg, smart, proportion"),
                            ({"jpeg_quality": 0}, "jpeg_quality"), ({"max_resolution": 0}, "max_resolution"),
                            ({"smart_threshold": -1}, "smart_threshold"),
                            ({"compress_probability": 2.0}, "compress_probability")]:
        with pytest.raises(ConfigError, match=message):
            write_beton(path, [(good, 0, 0)], num_samples=1, **option)
    # FFCV stores a sample within one page: 8 MiB when max_resolution does not bound the images.
    with pytest.raises(DataError, match="sample 1: 1700×1700 image takes 8670000 bytes, more than FFCV's "
                                        "8388608-byte page; set or lower max_resolution"):
        write_beton(path, [(good, 0, 0), (np.zeros((1700, 1700, 3), np.uint8), 0, 1)], num_samples=2,
                    write_mode="raw")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "foreign.beton").write_bytes(b"\0" * 100)
    with pytest.raises(DataError, match="foreign.beton"):
        beton_info(tmp_path / "foreign.beton")
    with pytest.raises(DataError, match="no such .beton"):
        BetonReader(tmp_path / "absent.beton", batch_size=1, canvas=8)


# --------------------------------------------------------------------------------------------------
# Photos
# --------------------------------------------------------------------------------------------------


def test_photos_round_trip(photos_dir, tmp_path):
    """Photo-like JPEGs of every size (68 to 2400 px) and encoding (conftest's photos_dir), written as jpg."""
    files = sorted(photos_dir.glob("*.JPEG"))[:12]
    photos = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    path = write_beton(tmp_path / "photos.beton", ((p, 0, i) for i, p in enumerate(photos)),
                       num_samples=len(photos), write_mode="jpg", max_resolution=96)
    info = beton_info(path)
    # FFCV's writer resizer: longer side to 96 (sizes truncated), aspect ratio kept, small photos as they are.
    sizes = [(np.array(p.shape[1::-1]) * min(1.0, 96 / max(p.shape[:2]))).astype(int) for p in photos]
    np.testing.assert_array_equal(np.stack([info.widths, info.heights], 1), sizes)
    for (image, _, index), photo, size in zip(read_all(path), photos, sizes):
        expected = cv2.resize(photo, tuple(size), interpolation=cv2.INTER_AREA) if max(photo.shape[:2]) > 96 \
            else photo
        # Photos shrunk to 96 px keep much detail, which JPEG pays for: mean 2.0 to 6.9 levels measured on real
        # photos, 2.4 to 8.1 on these.
        _check_jpeg(image, path, index, expected, max_mean_error=10.0)
