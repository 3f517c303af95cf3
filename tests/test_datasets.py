"""Tests of pipelines/datasets.py: the long-tailed subset on the real CIFAR-100 labels, shot groups, the
built-in demo set, image-folder trees, and (slow) CIFAR-10-LT built from the real JPEG tree.

    python -m pytest tests/test_datasets.py -q               # fast tests; real-data ones skip if absent
    python -m pytest tests/test_datasets.py -q -m slow       # the CIFAR-10 JPEG extraction (~60k files)
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mixtail.pipelines.datasets import (DEMO_CLASSES, ImageArrays, ImageFiles, build_dataset, cifar_dataset,
                                        decode_images, demo_dataset, long_tailed_counts, long_tailed_indices,
                                        scan_image_folder, shot_groups)
from mixtail.trainer.config import DataConfig

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


# --------------------------------------------------------------------------------------------------
# Long-tailed subsets on the real CIFAR-100 labels
# --------------------------------------------------------------------------------------------------


def test_cifar100_labels_sanity(cifar100_meta):
    # The README's own checks, so a wrong file cannot make the tests below pass vacuously.
    assert cifar100_meta["y_train"].shape == (50000,) and cifar100_meta["y_test"].shape == (10000,)
    assert cifar100_meta["y_train"][0] == 19 and cifar100_meta["y_test"][0] == 49
    assert np.array_equal(np.bincount(cifar100_meta["y_train"]), np.full(100, 500))


@pytest.mark.parametrize("rho,total", [(100, 10847), (50, 12608), (10, 19573)])
def test_cifar100_lt_indices_exact(cifar100_meta, rho, total):
    """The canonical CIFAR-100-LT subsets (LDAM-DRW's seeded per-class shuffle), index for index, in order."""
    y = cifar100_meta["y_train"].astype(np.int64)
    idx = long_tailed_indices(y, float(rho))
    assert idx.dtype == np.int64
    assert len(idx) == total
    assert np.array_equal(idx, cifar100_meta[f"lt_r{rho}_train_indices"]), "indices or their order differ"
    assert np.array_equal(np.bincount(y[idx], minlength=100), cifar100_meta[f"lt_r{rho}_n_k"])
    assert np.array_equal(long_tailed_counts(500, 100, float(rho)), cifar100_meta[f"lt_r{rho}_n_k"])
    assert np.array_equal(long_tailed_indices(y, float(rho), num_classes=100), idx)
    # The old rule differs from the canonical subset: it is only there when asked for by name.
    assert not np.array_equal(long_tailed_indices(y, float(rho), rule="first"), idx)


def test_long_tailed_indices_ldam_protocol_written_out():
    """LDAM-DRW's imbalance_cifar.py, restated independently: np.random.seed(0) once, then per class in
    order np.random.shuffle that class's indices and keep the first n_k (global state restored after)."""
    rng = np.random.default_rng(5)
    labels = rng.permutation(np.repeat(np.arange(5), 40))
    keep = [int(40 * (1 / 8.0) ** (k / 4.0)) for k in range(5)]
    saved = np.random.get_state()
    try:
        np.random.seed(0)
        expected = []
        for k in range(5):
            idx = np.where(labels == k)[0]
            np.random.shuffle(idx)
            expected.append(idx[: keep[k]])
        expected = np.concatenate(expected)
    finally:
        np.random.set_state(saved)
    before = np.random.get_state()[1].copy()
    assert np.array_equal(long_tailed_indices(labels, 8.0), expected)
    assert np.array_equal(np.random.get_state()[1], before), "the global numpy generator was touched"
    with pytest.raises(ValueError, match="rule"):
        long_tailed_indices(labels, 8.0, rule="random")


@pytest.mark.parametrize("rho,sizes", [(100, (35, 35, 30)), (50, (41, 41, 18)), (10, (69, 31, 0))])
def test_cifar100_shot_groups(cifar100_meta, rho, sizes):
    y = cifar100_meta["y_train"].astype(np.int64)
    counts = np.bincount(y[long_tailed_indices(y, float(rho))], minlength=100)
    groups = shot_groups(counts)
    assert tuple(len(groups[g]) for g in ("many", "medium", "few")) == sizes
    # The groups partition the classes, and n_k decreases with k, so they are contiguous head-to-tail.
    assert np.array_equal(np.concatenate([groups["many"], groups["medium"], groups["few"]]), np.arange(100))


def test_shot_group_boundaries():
    counts = np.array([101, 100, 20, 19, 0, 500])
    g = shot_groups(counts)
    assert g["many"].tolist() == [0, 5] and g["medium"].tolist() == [1, 2] and g["few"].tolist() == [3, 4]


def test_imagenet_lt_shot_groups_on_real_counts():
    path = SHARED_DATA / "lists" / "ImageNet_LT_train_cls_freq.json"
    if not path.is_file():
        pytest.skip(f"real data file {path} is absent (tests read ../shared/data beside the repository)")
    counts = np.array(json.loads(path.read_text()))
    assert counts.sum() == 115846
    assert tuple(len(v) for v in shot_groups(counts).values()) == (385, 479, 136)


def test_long_tailed_counts_profile():
    # n_k = int(n_max · (1/ρ)^(k/(C−1))), written out independently (Cao et al.'s formula).
    expected = [int(5000 * 0.01 ** (k / 9)) for k in range(10)]
    assert long_tailed_counts(5000, 10, 100.0).tolist() == expected == [5000, 2997, 1796, 1077, 645, 387, 232,
                                                                        139, 83, 50]
    assert long_tailed_counts(500, 100, 1.0).tolist() == [500] * 100
    assert long_tailed_counts(7, 1, 100.0).tolist() == [7]


def test_long_tailed_indices_first_rule_takes_first_images_in_dataset_order():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(4), 30))
    idx = long_tailed_indices(labels, 10.0, rule="first")
    keep = [int(30 * 0.1 ** (k / 3)) for k in range(4)]
    expected = np.concatenate([[i for i in range(len(labels)) if labels[i] == k][: keep[k]] for k in range(4)])
    assert np.array_equal(idx, expected)
    assert np.array_equal(long_tailed_indices(labels, 1.0, rule="first"), np.argsort(labels, kind="stable"))
    with pytest.raises(ValueError, match="imbalance_ratio"):
        long_tailed_indices(labels, 0.5)


# --------------------------------------------------------------------------------------------------
# The demo set
# --------------------------------------------------------------------------------------------------


def test_demo_dataset_deterministic_and_shaped():
    a, b = demo_dataset("train"), demo_dataset("train")
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert a.images.shape == (3000, 32, 32, 3) and a.images.dtype == np.uint8
    assert a.labels.shape == (3000,) and a.labels.dtype == np.int64
    assert a.classes == DEMO_CLASSES and len(a.classes) == 10
    # Classes are interleaved like CIFAR's order; every class has 300 images before the LT subset.
    assert a.labels[:20].tolist() == list(range(10)) * 2
    assert np.array_equal(np.bincount(a.labels), np.full(10, 300))
    # Real content: not constant images, and the seed changes it.
    assert a.images.std() > 20
    assert not np.array_equal(demo_dataset("train", seed=1).images, a.images)
    assert demo_dataset("train", size=24).images.shape == (3000, 24, 24, 3)


def test_demo_test_split_balanced_and_distinct():
    test = demo_dataset("test")
    assert test.images.shape == (1000, 32, 32, 3)
    assert np.array_equal(np.bincount(test.labels), np.full(10, 100))
    assert not np.array_equal(test.images, demo_dataset("train").images[:1000])
    with pytest.raises(ValueError, match="split"):
        demo_dataset("val")


def test_build_dataset_demo_long_tailed_train_whole_test():
    data = DataConfig(dataset="demo", imbalance_ratio=20.0, image_size=32)
    train = build_dataset(data, "train")
    assert isinstance(train, ImageArrays)
    expected = [int(300 * (1 / 20) ** (k / 9)) for k in range(10)]
    assert np.bincount(train.labels, minlength=10).tolist() == expected
    assert len(train) == sum(expected) == train.images.shape[0]
    # The subset is the canonical (LDAM) selection from the full set.
    full = demo_dataset("train")
    assert np.array_equal(train.images, full.images[long_tailed_indices(full.labels, 20.0)])
    test = build_dataset(data, "test")
    assert len(test) == 1000
    with pytest.raises(ValueError, match="split"):
        build_dataset(data, "val")
    with pytest.raises(ValueError, match="no reader"):
        build_dataset(DataConfig(dataset="svhn"), "train")  # type: ignore[arg-type]


def test_cifar_dataset_needs_a_root():
    with pytest.raises(FileNotFoundError, match="data.root"):
        cifar_dataset("cifar10", "", "train", download=False)


# --------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------


def save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def tiny_tree(tmp_path):
    """root/<class>/<file> with PNGs (exact pixels), a JPEG, an uppercase extension and non-image clutter."""
    rng = np.random.default_rng(0)
    root = tmp_path / "tree"
    pixels = {}
    layout = {"bird": ["b.png", "a.png", "c.PNG"], "Zebra": ["2.png", "10.png"], "cat": ["x.jpg", "y.png"]}
    for cls, names in layout.items():
        for name in names:
            arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            save(root / cls / name, arr)
            pixels[(cls, name)] = arr
    (root / "bird" / "notes.txt").write_text("not an image")
    (root / "cat" / "nested").mkdir()
    (root / "README").write_text("a file at the top is not a class")
    return root, pixels


def test_scan_image_folder_sorted_order(tiny_tree):
    root, _ = tiny_tree
    files = scan_image_folder(root)
    assert isinstance(files, ImageFiles)
    assert files.classes == ["Zebra", "bird", "cat"]  # plain sorted() of the names, like torchvision
    rel = [os.path.relpath(f, root) for f in files.files]
    assert rel == ["Zebra/10.png", "Zebra/2.png", "bird/a.png", "bird/b.png", "bird/c.PNG", "cat/x.jpg",
                   "cat/y.png"]
    assert files.labels.tolist() == [0, 0, 1, 1, 1, 2, 2] and files.labels.dtype == np.int64
    assert all(os.path.isabs(f) for f in files.files)
    sub = files.subset(np.array([4, 0]))
    assert [os.path.relpath(f, root) for f in sub.files] == ["bird/c.PNG", "Zebra/10.png"]
    assert sub.labels.tolist() == [1, 0]


def test_decode_images_exact_and_resized(tiny_tree, tmp_path):
    root, pixels = tiny_tree
    files = scan_image_folder(root)
    out = decode_images(files.files, 8)
    assert out.shape == (7, 8, 8, 3) and out.dtype == np.uint8
    for i, f in enumerate(files.files):
        cls, name = Path(f).parent.name, Path(f).name
        if name.lower().endswith(".png"):  # lossless: exact
            assert np.array_equal(out[i], pixels[(cls, name)]), f
        else:  # JPEG: lossy but close
            assert np.abs(out[i].astype(int) - pixels[(cls, name)]).mean() < 60
    # A non-square image is resized (PIL bilinear) to size×size; grayscale and RGBA become RGB.
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, (20, 12, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "big.png")
    gray = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    rgba = rng.integers(0, 256, (6, 6, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = decode_images([str(tmp_path / n) for n in ("big.png", "gray.png", "rgba.png")], 6)
    expected_big = np.asarray(Image.fromarray(big).resize((6, 6), Image.BILINEAR))
    assert np.array_equal(out[0], expected_big)
    assert np.array_equal(out[1], np.repeat(gray[:, :, None], 3, axis=2))
    assert np.array_equal(out[2], rgba[:, :, :3])


def test_decode_images_names_bad_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(OSError, match="broken.jpg"):
        decode_images([str(bad)], 8)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        scan_image_folder(tmp_path / "empty")
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "a.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no images"):
        scan_image_folder(tmp_path / "noimg")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(DataConfig(dataset="folder", root=str(tmp_path / "missing")), "train")


def test_build_dataset_folder_long_tailed(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "data"
    per_class = 10
    for k, cls in enumerate(["c0", "c1", "c2"]):
        for i in range(per_class):
            save(root / "train" / cls / f"{i:03d}.png", rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
        for i in range(2):
            save(root / "val" / cls / f"{i}.png", rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
    data = DataConfig(dataset="folder", root=str(root), test_dir="val", imbalance_ratio=4.0, image_size=12)
    train = build_dataset(data, "train", decoded=False)
    n_k = [int(10 * 0.25 ** (k / 2)) for k in range(3)]  # 10, 5, 2
    assert np.bincount(train.labels).tolist() == n_k
    # Files are listed class by class in sorted order; LDAM's protocol then picks within each class.
    all_labels = np.repeat(np.arange(3), per_class)
    picked = long_tailed_indices(all_labels, 4.0)
    assert [Path(f).name for f in train.files if "/c1/" in f] == [f"{i % per_class:03d}.png"
                                                                  for i in picked if all_labels[i] == 1]
    assert [Path(f).name for f in build_dataset(replace(data, lt_subset="first"), "train", decoded=False).files
            if "/c1/" in f] == [f"{i:03d}.png" for i in range(5)]
    decoded = build_dataset(data, "train")
    assert isinstance(decoded, ImageArrays) and decoded.images.shape == (sum(n_k), 12, 12, 3)
    assert np.array_equal(decoded.images[0], np.asarray(Image.open(train.files[0])))
    test = build_dataset(data, "test", decoded=False)
    assert len(test) == 6 and all("/val/" in f for f in test.files)
    small = build_dataset(DataConfig(dataset="folder", root=str(root), test_dir="val", image_size=8), "test")
    assert small.images.shape == (6, 8, 8, 3)


# --------------------------------------------------------------------------------------------------
# CIFAR-10-LT from the real JPEG tree (slow: extracts 60k files once per session)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.data
def test_cifar10_lt_from_jpeg_tree(cifar10_jpeg_root):
    data = DataConfig(dataset="folder", root=str(cifar10_jpeg_root), imbalance_ratio=100, image_size=32)
    train = build_dataset(data, "train", decoded=False)
    assert train.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                             "truck"]
    n_k = [int(5000 * 0.01 ** (k / 9)) for k in range(10)]
    assert np.bincount(train.labels, minlength=10).tolist() == n_k
    assert len(train) == sum(n_k) == 12406
    # Sorted file names are CIFAR-10's within-class order (../shared/data/README.md), so LDAM's protocol,
    # restated here on positions 0..4999 of each class, names the files it keeps.
    np.random.seed(0)
    for k, cls in enumerate(train.classes):
        names = [Path(f).name for f, y in zip(train.files, train.labels) if y == k]
        assert all(Path(f).parent.name == cls for f, y in zip(train.files, train.labels) if y == k)
        positions = np.arange(5000)
        np.random.shuffle(positions)
        assert names == [f"{i:04d}.jpg" for i in positions[: n_k[k]]], cls
    test = build_dataset(data, "test", decoded=False)
    assert len(test) == 10000 and np.bincount(test.labels).tolist() == [1000] * 10
    # Decoding a few real files gives 32×32 RGB images with content.
    pixels = decode_images(train.files[:4] + test.files[-4:], 32)
    assert pixels.shape == (8, 32, 32, 3) and pixels.std() > 10
