"""Tests of pipelines/backends/ffcv_executor.py: the FFCV executor gives the torch executor's batch for the same plan
(exactly on images it decodes unresized, within a stated tolerance where it shrinks them), decodes no
foreground for an unmixed batch, resumes mid-epoch exactly, shards ranks as the planner does, covers the
test split once, and runs under `mixtail bench loader` and `mixtail train`.

Every .beton is written here from in-memory images in raw mode, so decoding is exact. Each FFCV reader
compiles its decoders with numba on its first batch (about a second; the first in a process, 7 to 10 s), so
the loaders are module fixtures shared by the tests that read them.

    python -m pytest tests/test_ffcv_loader.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv", reason="FFCV is not installed (pip install -e '.[ffcv]' after the Debian packages "
                                   "in .ci/run)")
import cv2  # noqa: E402  (opencv-python comes with ffcv)

from mixtail.errors import ConfigError, DataError  # noqa: E402
from mixtail.pipelines.batch import Batch
from mixtail.pipelines.loader import loader_for_dataset  # noqa: E402
from mixtail.pipelines.config import AugConfig, DataConfig, MixConfig  # noqa: E402
from mixtail.pipelines.sources.types import ImageArrays, ImageFiles  # noqa: E402
from mixtail.pipelines.sources.beton import write_beton  # noqa: E402
from mixtail.pipelines.backends.ffcv_executor import canvas_side  # noqa: E402
from mixtail.pipelines.sources.beton import BetonDataset, beton_dataset  # noqa: E402

pytestmark = pytest.mark.ffcv
REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
S = 16  # output side
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# Half the batches mixed, from epoch 0: both kinds of batch in every epoch.
HALF = MixConfig(mix_prob=0.5, start_epoch=0)
# Normalized units per grey level: the tolerances below are stated in grey levels (0..255).
GREY = 1 / (255 * min(STD))


def _labels(rng: np.random.Generator, n: int, classes: int = 4) -> np.ndarray:
    labels = rng.choice(classes, n, p=np.array([8, 4, 2, 1]) / 15)
    labels[:classes] = np.arange(classes)
    return labels.astype(np.int64)


def _smooth(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Upsampled noise: what photos look like to a resampler (pure noise would make any resize error large)."""
    coarse = rng.integers(0, 256, (max(2, h // 5), max(2, w // 5), 3), dtype=np.uint8)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)


def _on_canvas(images: list[np.ndarray], side: int) -> tuple[np.ndarray, np.ndarray]:
    """Images at the top-left of side×side zero canvases, and their (h, w): the torch backend's layout."""
    out = np.zeros((len(images), side, side, 3), np.uint8)
    for i, im in enumerate(images):
        out[i, :im.shape[0], :im.shape[1]] = im
    return out, np.array([im.shape[:2] for im in images], np.int32)


def _write(path: Path, images: list[np.ndarray], labels: np.ndarray) -> Path:
    return write_beton(path, zip(images, labels, range(len(images))), num_samples=len(images), write_mode="raw",
                       max_resolution=max(max(im.shape[:2]) for im in images))


def _loader(ds, backend: str, *, split="train", batch_size=8, eval_batch_size=10, aug=AugConfig(), mix=HALF,
            rank=0, world_size=1, device=CPU, drop_last=True):
    """batch_size is per rank."""
    data = DataConfig(backend=backend, batch_size=batch_size * world_size, eval_batch_size=eval_batch_size,
                      image_size=S, mean=MEAN, std=STD, num_threads=1, drop_last=drop_last)
    return loader_for_dataset(ds, data, aug, mix, split=split, rank=rank, world_size=world_size, device=device,
                              seed=0)


def _epoch(loader, e: int, start: int = 0) -> list[Batch]:
    loader.set_epoch(e, start)
    return list(loader)


def _assert_same(ffcv: list[Batch], ref: list[Batch], grey: float = 1e-3) -> None:
    """Same labels, λ and plans; images within `grey` grey levels at every pixel."""
    assert len(ffcv) == len(ref) > 0
    for a, b in zip(ffcv, ref):
        assert torch.equal(a.y_f, b.y_f) and torch.equal(a.y_b, b.y_b) and torch.equal(a.lam, b.lam)
        assert np.array_equal(a.plan.table.view(np.int32), b.plan.table.view(np.int32))  # int cells may read as NaN
        assert a.images.shape == b.images.shape and a.images.is_contiguous(memory_format=torch.channels_last)
        err = float((a.images - b.images).abs().max()) / GREY
        assert err <= grey, f"batch {a.plan.batch}: {err:.4f} grey levels apart"


# --------------------------------------------------------------------------------------------------
# Data: square S×S images (an in-memory dataset, written by the executor itself), and varied sizes
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def square() -> ImageArrays:
    rng = np.random.default_rng(0)
    n = 48
    return ImageArrays(rng.integers(0, 256, (n, S, S, 3), dtype=np.uint8), _labels(rng, n), list("abcd"))


@pytest.fixture(scope="module")
def square_loader(square):
    loader = _loader(square, "ffcv")
    yield loader
    loader.close()


@pytest.fixture(scope="module")
def varied(tmp_path_factory) -> tuple[BetonDataset, ImageArrays]:
    """40 noise images of 9..24 px a side (one 24 wide): all fit the 24 px canvas, so FFCV stores and decodes
    them unresized; the torch twin holds the same pixels on 24 px canvases."""
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (int(rng.integers(9, 25)), int(rng.integers(9, 25)), 3), dtype=np.uint8)
              for _ in range(40)]
    images[0] = rng.integers(0, 256, (11, 24, 3), dtype=np.uint8)
    labels = _labels(rng, len(images))
    path = _write(tmp_path_factory.mktemp("ffcv") / "varied.beton", images, labels)
    pixels, sizes = _on_canvas(images, 24)
    return beton_dataset(path, list("abcd")), ImageArrays(pixels, labels, list("abcd"), sizes=sizes)


# --------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------


def test_beton_dataset_reads_the_metadata(varied, tmp_path):
    ds, twin = varied
    assert len(ds) == 40 and ds.classes == list("abcd") and np.array_equal(ds.labels, twin.labels)
    np.testing.assert_array_equal(ds.sizes, twin.sizes)
    np.testing.assert_array_equal(ds.positions, np.arange(40))
    sub = ds.subset(np.array([5, 2, 2]))
    assert sub.labels.tolist() == ds.labels[[5, 2, 2]].tolist() and sub.positions.tolist() == [5, 2, 2]
    assert beton_dataset(ds.path).classes == ["0", "1", "2", "3"]
    with pytest.raises(DataError, match="label 2 is outside the 2 classes"):
        beton_dataset(ds.path, ["a", "b"])
    assert canvas_side(S, ds.sizes) == 24 and canvas_side(224, ds.sizes) == 24 and canvas_side(224, [[999]]) == 384


def test_file_datasets_must_be_converted_first():
    files = ImageFiles(["/nonexistent/a.jpg"] * 8, np.zeros(8, np.int64), ["a"], sizes=np.full((8, 2), 32))
    with pytest.raises(ConfigError, match="data.backend.*mixtail convert"):
        _loader(files, "ffcv", mix=MixConfig(mix_prob=0.0))


# --------------------------------------------------------------------------------------------------
# The same batch as the torch executor
# --------------------------------------------------------------------------------------------------


def test_square_images_match_the_torch_executor(square, square_loader):
    """Raw S×S images fill their canvas: FFCV's batch is the torch executor's to float rounding."""
    torch_loader = _loader(square, "torch")
    for e in (0, 1):
        ffcv = _epoch(square_loader, e)
        assert any(b.plan.mixed for b in ffcv) and not all(b.plan.mixed for b in ffcv)
        _assert_same(ffcv, _epoch(torch_loader, e))
    assert square_loader.executor.hw is None  # no valid-size bookkeeping for images that fill the canvas


def test_varied_sizes_match_the_torch_executor(varied):
    """Images of varied sizes on a canvas, windows drawn on each image's own size, the AutoAugment policy:
    the same pixels in both backends give the same batch to float rounding."""
    ds, twin = varied
    aug = AugConfig(crop="resized", policy="autoaugment", cutout_px=4)
    ffcv_loader = _loader(ds, "ffcv", aug=aug)
    assert ffcv_loader.executor.canvas == 24
    _assert_same(_epoch(ffcv_loader, 3), _epoch(_loader(twin, "torch", aug=aug), 3))
    ffcv_loader.close()


@pytest.mark.slow
def test_images_larger_than_the_canvas_match_within_resampling(tmp_path):
    """Smooth images of 30..60 px shrunk by FFCV onto a 24 px canvas (OpenCV INTER_AREA) against the torch
    executor reading them at full size (after_mix: each whole image resized to S, mixed, then cropped).
    The two resample differently, so they agree on average only. Measured per batch: mean 1.9 to 3.0 grey
    levels, 99th percentile 12 to 15; the same batch mirrored (a wrong flip) is 29 to 43 and 129 to 157."""
    rng = np.random.default_rng(2)
    images = [_smooth(rng, int(rng.integers(30, 61)), int(rng.integers(30, 61))) for _ in range(32)]
    labels = _labels(rng, len(images))
    ds = beton_dataset(_write(tmp_path / "big.beton", images, labels), list("abcd"))
    pixels, sizes = _on_canvas(images, 60)
    mix, aug = MixConfig(mix_prob=1.0, start_epoch=0, aug_order="after_mix"), AugConfig(crop="resized")
    ffcv_loader = _loader(ds, "ffcv", aug=aug, mix=mix)
    assert ffcv_loader.executor.canvas == 24
    ffcv = _epoch(ffcv_loader, 0)
    ref = _epoch(_loader(ImageArrays(pixels, labels, list("abcd"), sizes=sizes), "torch", aug=aug, mix=mix), 0)
    ffcv_loader.close()
    for a, b in zip(ffcv, ref):
        assert torch.equal(a.y_f, b.y_f) and torch.equal(a.lam, b.lam)
        diff = (a.images - b.images).abs() / GREY
        assert float(diff.mean()) < 5.0 and float(diff.quantile(0.99)) < 30.0, (float(diff.mean()),
                                                                              float(diff.quantile(0.99)))


# --------------------------------------------------------------------------------------------------
# Orders, epochs, resume, ranks, the test split
# --------------------------------------------------------------------------------------------------


def test_unmixed_batches_decode_no_foreground(square_loader):
    """The foreground reader's epoch holds the mixed batches' foregrounds only; the background reader's, every
    batch's background, in plan order."""
    batches = _epoch(square_loader, 2)
    ex = square_loader.executor
    mixed = [b for b in batches if b.plan.mixed]
    assert 0 < len(mixed) < len(batches)
    assert len(ex.streams["fg"].order) == len(mixed) * square_loader.batch_size
    np.testing.assert_array_equal(ex.streams["fg"].order, np.concatenate([b.plan["fg_index"] for b in mixed]))
    np.testing.assert_array_equal(ex.streams["bg"].order, np.concatenate([b.plan["bg_index"] for b in batches]))


def test_resume_mid_epoch_is_exact(square_loader):
    full = _epoch(square_loader, 4)
    assert len(full) == 6
    for start in (1, 4, 5):
        resumed = _epoch(square_loader, 4, start)  # a restart: the loader resets the executor, FFCV starts there
        _assert_same(resumed, full[start:], grey=0.0)
        assert len(square_loader.executor.streams["bg"].order) == (len(full) - start) * square_loader.batch_size
    # A loop that stops early, then the next epoch: the readers start again cleanly.
    square_loader.set_epoch(4)
    next(iter(square_loader))
    _assert_same(_epoch(square_loader, 4), full, grey=0.0)


@pytest.mark.slow
def test_two_ranks_disjoint_backgrounds_equal_lengths(square):
    """Each rank's order is its own (the planner's), never FFCV's distributed mode. Unmixed: no foreground
    reader is ever built."""
    never = MixConfig(mix_prob=0.0)
    seen = []
    for rank in (0, 1):
        ffcv_loader = _loader(square, "ffcv", rank=rank, world_size=2, mix=never)
        batches = _epoch(ffcv_loader, 1)
        assert len(batches) == len(ffcv_loader) == 3
        _assert_same(batches, _epoch(_loader(square, "torch", rank=rank, world_size=2, mix=never), 1))
        assert ffcv_loader.executor.streams["fg"].reader is None
        seen.append(np.concatenate([b.plan["bg_index"] for b in batches]))
        ffcv_loader.close()
    assert len(seen[0]) == len(seen[1]) and not set(seen[0]) & set(seen[1])


def test_kept_last_batch_and_clipped_boxes_match_the_torch_executor(square):
    """data.drop_last=false over two ranks: each yields ceil(24 / 5) = 5 batches holding all of its 24 samples,
    the short one last, disjoint from the other rank's; with CutMix's clipped boxes, one per batch
    (mix.box, mix.box_per), the batches are the torch executor's."""
    mix = MixConfig(mix_prob=0.5, start_epoch=0, box="clipped", box_per="batch", mix_op="crop", ratio_range=(0.0, 1.0))
    seen = []
    for rank in (0, 1):
        kw = dict(rank=rank, world_size=2, mix=mix, batch_size=5, drop_last=False)
        ffcv_loader = _loader(square, "ffcv", **kw)
        batches = _epoch(ffcv_loader, 0) + _epoch(ffcv_loader, 1)
        assert len(ffcv_loader) == 5 and [len(b.y_f) for b in batches] == [5, 5, 5, 5, 4] * 2
        assert any(b.plan.mixed for b in batches)
        _assert_same(batches, _epoch(_loader(square, "torch", **kw), 0) + _epoch(_loader(square, "torch", **kw), 1),
                     grey=0.0)
        seen.append(np.concatenate([b.plan["bg_index"] for b in batches[:5]]))
        ffcv_loader.close()
    assert len(seen[0]) == len(seen[1]) == 24 and not set(seen[0]) & set(seen[1])


def test_test_split_covers_every_sample_once_across_ranks(varied):
    """Test plans: the planner's strided order, a partial last batch, the centre window of each image."""
    ds, twin = varied
    seen = []
    for rank in (0, 1):
        ffcv_loader = _loader(ds, "ffcv", split="test", eval_batch_size=8, rank=rank, world_size=2)
        batches = _epoch(ffcv_loader, 0)
        assert [len(b.y_f) for b in batches] == [8, 8, 4]
        torch_loader = _loader(twin, "torch", split="test", eval_batch_size=8, rank=rank, world_size=2)
        _assert_same(batches, _epoch(torch_loader, 0))
        assert all(torch.equal(b.y_f, b.y_b) and (b.lam == 1).all() for b in batches)
        seen.append(np.concatenate([b.plan["index"] for b in batches]))
        ffcv_loader.close()
    assert sorted(np.concatenate(seen).tolist()) == list(range(len(ds)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_the_cpu(square, square_loader):
    """The device path: one copy of each canvas batch on a side stream, then the same ops on the GPU."""
    gpu_loader = _loader(square, "ffcv", device=torch.device("cuda"))
    for e in (0, 1):
        gpu = _epoch(gpu_loader, e)
        cpu = _epoch(square_loader, e)
        for a, b in zip(gpu, cpu):
            assert a.images.is_cuda
            assert float((a.images.cpu() - b.images).abs().max()) / GREY < 0.01
    gpu_loader.close()


# --------------------------------------------------------------------------------------------------
# End to end: a few steps into a model, the benchmark, the CLI
# --------------------------------------------------------------------------------------------------


def test_a_few_steps_train_a_tiny_model(square_loader):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    square_loader.set_epoch(5)
    for batch in square_loader:
        loss = torch.nn.functional.cross_entropy(model(batch.images), batch.soft_targets(4))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.slow
def test_bench_loader_ffcv_row(photos_dir, tmp_path):
    from mixtail.benchmarks import bench_loader

    out = tmp_path / "results"
    rows = bench_loader.main(["--backend", "ffcv", "torch", "--device", "cpu", "--photos", str(photos_dir),
                              "--num-photos", "16", "--size", "64", "--batch-size", "8", "--warmup", "1",
                              "--windows", "2", "--window-batches", "2", "--threads", "1", "--out", str(out)])
    assert [r["backend"] for r in rows] == ["ffcv", "torch"] and all(r["pairs_per_s"] > 0 for r in rows)
    assert ".beton" in rows[0]["note"] and "excluded" in rows[0]["note"]
    (path,) = out.glob("loader_*.json")
    assert [r["backend"] for r in json.loads(path.read_text())["rows"]] == ["ffcv", "torch"]


@pytest.mark.slow
def test_mixtail_train_with_the_ffcv_backend(tmp_path):
    """`mixtail train` on the demo set with data.backend=ffcv: the in-memory set goes through a temporary
    .beton; the run trains and evaluates through the FFCV executor."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mixtail", "train", "smoke_cpu", "--data.backend=ffcv", "--data.num_threads=1",
           f"--train.out_dir={out}"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    final = json.loads((out / "final_eval.json").read_text())
    assert 0.0 <= final["all"] <= 100.0
