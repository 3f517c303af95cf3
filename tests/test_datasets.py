"""Tests of pipelines/sources/: the long-tailed subset on the real CIFAR-100 labels, shot groups, the
built-in demo set, image-folder trees, one class map per dataset (the test split read onto the training
classes), bad image files found when the dataset is built (both data.on_error modes, on generated CIFAR-like
JPEGs and broken files the tests write), the offline download error, and (slow) CIFAR-10-LT built from the real
JPEG tree. Tests of the real CIFAR-100 labels, ImageNet-LT's class counts and CIFAR-10's archive skip where that
real data is absent (tests/helpers/real_data.py).

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

from mixtail.errors import DataError
from mixtail.pipelines.config import DataConfig
from mixtail.pipelines.sources.demo import DEMO_CLASSES, demo_dataset
from mixtail.pipelines.sources.types import DataNotFound, ImageArrays, ImageFiles
from mixtail.pipelines.sources.build import build_dataset, training_classes
from mixtail.pipelines.sources.folders import check_files, scan_image_folder
from mixtail.pipelines.sources.cifar import cifar_dataset
from mixtail.pipelines.sources.images import decode_images
from mixtail.pipelines.sources.subsets import long_tailed_counts, long_tailed_indices, shot_groups

from helpers.images import CIFAR10_CLASSES, cifar_like_jpeg
from helpers.real_data import REAL_LISTS, require


# Check caches and bad-file listings go to each test's own folder, never to ~/.cache (conftest.py).
pytestmark = pytest.mark.usefixtures("private_cache")


# --------------------------------------------------------------------------------------------------
# Long-tailed subsets on the real CIFAR-100 labels
# --------------------------------------------------------------------------------------------------


@pytest.mark.data
def test_cifar100_labels_sanity(cifar100_meta):
    # The README's own checks, so a wrong file cannot make the tests below pass vacuously.
    assert cifar100_meta["y_train"].shape == (50000,) and cifar100_meta["y_test"].shape == (10000,)
    assert cifar100_meta["y_train"][0] == 19 and cifar100_meta["y_test"][0] == 49
    assert np.array_equal(np.bincount(cifar100_meta["y_train"]), np.full(100, 500))


@pytest.mark.data
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


@pytest.mark.data
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


@pytest.mark.data
def test_imagenet_lt_shot_groups_on_real_counts():
    path = require(REAL_LISTS / "ImageNet_LT_train_cls_freq.json", "ImageNet-LT's class counts are the fact checked")
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
    # A non-square image is resized (PIL bilinear) to size×size; grayscale and RGBA become RGB (an opaque
    # one here: compositing partial alpha onto white is tested in tests/test_images.py).
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, (20, 12, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "big.png")
    gray = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    rgba = rng.integers(0, 256, (6, 6, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = decode_images([str(tmp_path / n) for n in ("big.png", "gray.png", "rgba.png")], 6)
    expected_big = np.asarray(Image.fromarray(big).resize((6, 6), Image.BILINEAR))
    assert np.array_equal(out[0], expected_big)
    assert np.array_equal(out[1], np.repeat(gray[:, :, None], 3, axis=2))
    assert np.array_equal(out[2], rgba[:, :, :3])


def test_decode_images_names_bad_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="broken.jpg: not an image file"):
        decode_images([str(bad)], 8)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        scan_image_folder(tmp_path / "empty")
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "a.txt").write_text("x")
    with pytest.raises(DataError, match=f"class folder {tmp_path / 'noimg' / 'cls'} holds no images"):
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
    # Files that are not S×S keep their aspect ratio on a canvas (shorter side S, longer at most 3/2·S).
    small = build_dataset(DataConfig(dataset="folder", root=str(root), test_dir="val", image_size=8), "test")
    assert small.images.shape == (6, 12, 12, 3) and (small.sizes == 8).all()
    assert (small.images[:, 8:] == 0).all() and (small.images[:, :, 8:] == 0).all()


# --------------------------------------------------------------------------------------------------
# One class map per dataset: the test split is read onto the training classes
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_jpegs() -> dict[str, list[bytes]]:
    """8 generated 32×32 JPEGs for each of three classes (the tests need files of CIFAR's kind, not its content)."""
    return {c: [cifar_like_jpeg(label, k) for k in range(8)] for label, c in enumerate(CIFAR10_CLASSES[:3])}


def jpeg_tree(root: Path, cifar_jpegs, train: dict[str, int], test: dict[str, int]) -> Path:
    """root/train/<class>/NNNN.jpg and root/test/<class>/NNNN.jpg from the given JPEGs (cycled over classes)."""
    pool = [data for v in cifar_jpegs.values() for data in v]
    i = 0
    for split, layout in (("train", train), ("test", test)):
        for cls, n in layout.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                (root / split / cls / f"{k:04d}.jpg").write_bytes(pool[i % len(pool)])
                i += 1
    return root


def folder_config(root: Path, **kw) -> DataConfig:
    return DataConfig(dataset="folder", root=str(root), imbalance_ratio=1.0, image_size=32, **kw)


def test_test_split_uses_the_training_classes(tmp_path, cifar_jpegs):
    root = jpeg_tree(tmp_path, cifar_jpegs, {"bird": 3, "cat": 2, "dog": 2}, {"bird": 1, "cat": 2, "dog": 1})
    data = folder_config(root)
    train = build_dataset(data, "train", decoded=False)
    test = build_dataset(data, "test", decoded=False)
    assert train.classes == test.classes == training_classes(data) == ["bird", "cat", "dog"]
    assert test.labels.tolist() == [0, 1, 1, 2]
    assert all(Path(f).parent.name == test.classes[y] for f, y in zip(test.files, test.labels))
    # Every image's true size is recorded as it is checked.
    assert train.sizes.tolist() == [[32, 32]] * 7 and test.sizes.dtype == np.int32


@pytest.mark.parametrize("case", ["empty_first", "only_in_test", "missing_in_test", "empty_test"])
def test_class_set_faults_are_errors_before_training(tmp_path, cifar_jpegs, case):
    train = {"bird": 2, "cat": 2, "dog": 2}
    test = {"bird": 1, "cat": 1, "dog": 1}
    if case == "empty_first":  # an empty folder sorting first must not shift every test label by one
        train = {"aaa": 0, **train}
        test = {"aaa": 1, **test}
    elif case == "only_in_test":
        test["zebra"] = 1
    elif case == "missing_in_test":
        del test["cat"]
    elif case == "empty_test":
        test["dog"] = 0
    root = jpeg_tree(tmp_path, cifar_jpegs, train, test)
    data = folder_config(root)
    expected = {"empty_first": f"class folder {root / 'train' / 'aaa'} holds no images",
                "only_in_test": f"not among the training classes: {root / 'test' / 'zebra'}",
                "missing_in_test": "no folder for 1 training class(es): cat",
                "empty_test": f"class folder {root / 'test' / 'dog'} holds no images"}[case]
    splits = ("train", "test") if case == "empty_first" else ("test",)
    for split in splits:
        with pytest.raises(DataError) as err:
            build_dataset(data, split, decoded=False)
        assert expected in str(err.value) and "\n" not in str(err.value)
    if case != "empty_first":
        assert len(build_dataset(data, "train", decoded=False)) == 6  # the training split itself is fine


def test_hidden_files_and_folders_are_never_images_or_classes(tmp_path, cifar_jpegs):
    root = jpeg_tree(tmp_path, cifar_jpegs, {"bird": 2, "cat": 2}, {"bird": 1, "cat": 1})
    fork = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(100)
    for split in ("train", "test"):
        (root / split / "bird" / "._0000.jpg").write_bytes(fork)  # the macOS fork that crashed DALI
        (root / split / ".ipynb_checkpoints").mkdir()
        (root / split / ".ipynb_checkpoints" / "x.jpg").write_bytes(cifar_jpegs["bird"][0])
        (root / split / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    data = folder_config(root)
    train = build_dataset(data, "train", decoded=False)
    assert train.classes == ["bird", "cat"] and len(train) == 4 and train.skipped == ()
    assert not any(Path(f).name.startswith(".") for f in train.files)
    assert len(build_dataset(data, "test", decoded=False)) == 2


def test_given_classes_define_both_splits(tmp_path, cifar_jpegs):
    root = jpeg_tree(tmp_path, cifar_jpegs, {"bird": 2, "cat": 2}, {"bird": 1, "cat": 1})
    data = folder_config(root)
    assert build_dataset(data, "test", decoded=False, classes=["bird", "cat"]).labels.tolist() == [0, 1]
    with pytest.raises(DataError, match="no folder for 1 training class"):
        build_dataset(data, "train", decoded=False, classes=["bird", "cat", "dog"])
    with pytest.raises(DataError, match="differ from the 3 classes given"):
        build_dataset(DataConfig(dataset="demo"), "test", classes=["a", "b", "c"])


def test_a_folder_of_one_class_is_refused_naming_the_root(tmp_path):
    """A one-class dataset trained to 100% and reported it, with no word."""
    for split in ("train", "test"):
        save(tmp_path / split / "cat" / "0.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError) as err:
        build_dataset(folder_config(tmp_path), "train", decoded=False)
    assert str(err.value) == f"image folder {tmp_path / 'train'} has 1 class ('cat'): a classifier needs at least two"


def test_lt_ratio_that_empties_a_class_is_an_error(tmp_path, cifar_jpegs):
    root = jpeg_tree(tmp_path, cifar_jpegs, {"a": 8, "b": 8, "c": 8}, {"a": 1, "b": 1, "c": 1})
    # n_k = int(8 · (1/20)^(k/2)): 8, 1, 0: the tail class would silently vanish from training.
    with pytest.raises(DataError, match=r"imbalance_ratio=20.0 leaves 1 class\(es\) without a training image.*'c'"):
        build_dataset(replace(folder_config(root), imbalance_ratio=20.0), "train", decoded=False)


# --------------------------------------------------------------------------------------------------
# Bad image files, found when the dataset is built
# --------------------------------------------------------------------------------------------------


def break_files(root: Path, cifar_jpegs) -> dict[str, str]:
    """A truncated JPEG, a zero-byte file and a text file named .jpg in the train split; their reasons."""
    jpeg = cifar_jpegs["airplane"][0]
    (root / "train" / "bird" / "0000.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])
    (root / "train" / "cat" / "0001.jpg").write_bytes(b"")
    (root / "train" / "cat" / "notes.jpg").write_text("label notes, saved with the wrong name\n")
    return {str(root / "train" / "bird" / "0000.jpg"): "truncated",
            str(root / "train" / "cat" / "0001.jpg"): "zero-byte file",
            str(root / "train" / "cat" / "notes.jpg"): "not an image file"}


def test_bad_files_stop_the_run_all_named_in_one_error(tmp_path, cifar_jpegs):
    root = jpeg_tree(tmp_path, cifar_jpegs, {"bird": 3, "cat": 3}, {"bird": 1, "cat": 1})
    bad = break_files(root, cifar_jpegs)
    for decoded in (False, True):
        with pytest.raises(DataError) as err:
            build_dataset(folder_config(root), "train", decoded=decoded)
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(f"3 of 7 train images under {root / 'train'}")
        for path, reason in bad.items():
            assert f"{path}: {reason}" in msg
        assert "data.on_error=skip" in msg
    assert len(build_dataset(folder_config(root), "test", decoded=False)) == 2  # the test split is intact


def test_bad_files_skipped_counted_and_listed(tmp_path, cifar_jpegs):
    root = jpeg_tree(tmp_path, cifar_jpegs, {"bird": 3, "cat": 3}, {"bird": 1, "cat": 1})
    bad = break_files(root, cifar_jpegs)
    data = folder_config(root, on_error="skip")
    train = build_dataset(data, "train", decoded=False)
    assert len(train) == 4 and sorted(p for p, _ in train.skipped) == sorted(bad)
    assert all(bad[p] in reason for p, reason in train.skipped)
    assert not set(train.files) & set(bad) and train.sizes.shape == (4, 2)
    # Labels still follow the files that remain.
    assert all(Path(f).parent.name == train.classes[y] for f, y in zip(train.files, train.labels))
    decoded = build_dataset(data, "train")
    assert isinstance(decoded, ImageArrays) and decoded.images.shape == (4, 32, 32, 3)
    assert decoded.skipped == train.skipped


def test_broken_symlink_is_reported_not_dropped(tmp_path, cifar_jpegs):
    root = jpeg_tree(tmp_path, cifar_jpegs, {"bird": 2, "cat": 2}, {"bird": 1, "cat": 1})
    link = root / "train" / "cat" / "moved.jpg"
    link.symlink_to(tmp_path / "elsewhere" / "moved.jpg")
    with pytest.raises(DataError, match=f"1 of 5 train images .*: {link}: does not exist"):
        build_dataset(folder_config(root), "train", decoded=False)


def test_symlink_loop_named_like_an_image_is_a_broken_file(tmp_path, cifar_jpegs):
    """A link to itself and a pair pointing at each other (ELOOP): named with stop, skipped and counted with
    skip, for the file and the decoded dataset (the scan must not abort with ELOOP under skip)."""
    root = jpeg_tree(tmp_path, cifar_jpegs, {"bird": 2, "cat": 2}, {"bird": 1, "cat": 1})
    loops = [root / "train" / "cat" / "self.jpg", root / "train" / "bird" / "a.png", root / "train" / "bird" / "b.png"]
    loops[0].symlink_to("self.jpg")
    loops[1].symlink_to("b.png")
    loops[2].symlink_to("a.png")
    (root / "train" / "loop_dir").symlink_to("loop_dir")  # named like no image: not a class, not an error
    with pytest.raises(DataError, match=f"3 of 7 train images .*{loops[1]}: a symbolic link loop \\(ELOOP\\)"):
        build_dataset(folder_config(root), "train", decoded=False)
    for decoded in (False, True):
        train = build_dataset(folder_config(root, on_error="skip"), "train", decoded=decoded)
        assert len(train) == 4 and train.classes == ["bird", "cat"]
        assert sorted(p for p, _ in train.skipped) == sorted(map(str, loops))
        assert all("symbolic link loop" in reason for _, reason in train.skipped)


def test_files_of_other_extensions_are_counted_and_reported_once_per_split(tmp_path, cifar_jpegs, capsys,
                                                                           monkeypatch):
    """A GIF in a class folder is left out, and never without a word: one line per split says so."""
    monkeypatch.delenv("RANK", raising=False)
    root = jpeg_tree(tmp_path, cifar_jpegs, {"bird": 4, "cat": 3}, {"bird": 1, "cat": 1})
    gif = root / "train" / "cat" / "flying.gif"
    gif.write_bytes((root / "train" / "cat" / "0000.jpg").read_bytes())
    (root / "train" / "bird" / "notes.txt").write_text("where these came from\n")
    (root / "train" / "bird" / "LICENSE").write_text("cc-by\n")
    (root / "train" / "bird" / ".DS_Store").write_bytes(b"\0")  # hidden: never an image, never counted
    data = folder_config(root, val_per_class=1)
    train = build_dataset(data, "train", decoded=False)
    assert len(train) == 5 and str(gif) not in train.files
    assert train.left_out == (("(no extension)", 1), (".gif", 1), (".txt", 1))
    build_dataset(data, "val", decoded=False)
    test = build_dataset(data, "test", decoded=False)
    assert test.left_out == ()
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"train split under {root / 'train'}: 3 of 10 files left out for their extension "
                     "(1 (no extension), 1 .gif, 1 .txt); images are .jpg .jpeg .png .bmp .webp .ppm .tif .tiff"]
    monkeypatch.setenv("RANK", "1")  # under torchrun one rank says it
    build_dataset(data, "train", decoded=False)
    assert capsys.readouterr().out == ""


def test_a_class_folder_of_only_other_extensions_says_what_it_holds(tmp_path, cifar_jpegs):
    root = jpeg_tree(tmp_path, cifar_jpegs, {"bird": 2}, {"bird": 1})
    (root / "train" / "cat").mkdir()
    (root / "train" / "cat" / "a.gif").write_bytes(b"GIF89a")
    with pytest.raises(DataError, match=r"holds no images .*it holds 1 file\(s\) of other extensions \(\.gif\)"):
        build_dataset(folder_config(root), "train", decoded=False)


def test_skipping_every_image_of_a_class_is_an_error(tmp_path, cifar_jpegs):
    root = jpeg_tree(tmp_path, cifar_jpegs, {"bird": 1, "cat": 2}, {"bird": 1, "cat": 1})
    (root / "train" / "bird" / "0000.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"leaves class\(es\) bird with no images"):
        build_dataset(folder_config(root, on_error="skip"), "train", decoded=False)


def test_many_bad_files_listed_in_a_file(tmp_path, cifar_jpegs, monkeypatch):
    root = jpeg_tree(tmp_path, cifar_jpegs, {"bird": 30, "cat": 1}, {"bird": 1, "cat": 1})
    for k in range(25):
        (root / "train" / "bird" / f"{k:04d}.jpg").write_bytes(b"")
    with pytest.raises(DataError) as err:
        build_dataset(folder_config(root), "train", decoded=False)
    msg = str(err.value)
    assert msg.startswith("25 of 31 train images") and "... and 15 more" in msg and "\n" not in msg
    listing = Path(msg.rsplit("listed in ", 1)[1])
    assert len(listing.read_text().splitlines()) == 25


def test_check_files_keeps_earlier_skips_and_validates_mode(tmp_path, cifar_jpegs):
    (tmp_path / "a.jpg").write_bytes(cifar_jpegs["bird"][0])
    (tmp_path / "b.jpg").write_bytes(cifar_jpegs["bird"][1][:100])
    ds = ImageFiles([str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"), str(tmp_path / "c.jpg")],
                    np.array([0, 0, 0]), ["x"], skipped=(("/old.jpg", "zero-byte file"),))
    kept = check_files(ds, "skip")
    assert kept.files == [str(tmp_path / "a.jpg")] and kept.sizes.tolist() == [[32, 32]]
    assert [p for p, _ in kept.skipped] == ["/old.jpg", str(tmp_path / "b.jpg"), str(tmp_path / "c.jpg")]
    assert kept.skipped[2][1] == "does not exist"
    with pytest.raises(ValueError, match="on_error"):
        check_files(ds, "ignore")
    missing = ImageFiles([str(tmp_path / "x.jpg"), str(tmp_path / "y.jpg")], np.array([0, 0]), ["x"])
    with pytest.raises(DataNotFound, match="none of the 2 images exists .*check data.root"):
        check_files(missing)


def test_sixteen_bit_png_tree_decodes_to_true_values(tmp_path):
    """A 16-bit PNG must not become all white in the torch backend's decode."""
    for split in ("train", "test"):
        for k, value in enumerate((65535, 32768, 0)):
            (tmp_path / split / f"c{k}").mkdir(parents=True)
            Image.fromarray(np.full((32, 32), value, np.uint16)).save(tmp_path / split / f"c{k}" / "x.png")
    test = build_dataset(folder_config(tmp_path), "test")
    assert [int(test.images[i].mean()) for i in range(3)] == [255, 128, 0]


def test_offline_download_says_how_to_get_the_data(tmp_path, monkeypatch):
    from urllib.error import URLError

    import torchvision.datasets.cifar as tv_cifar

    def offline(*args, **kwargs):
        raise URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(DataError) as err:
        cifar_dataset("cifar10", str(tmp_path), "train", download=True)
    msg = str(err.value)
    for part in ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "Name or service not known",
                 "cifar-10-python.tar.gz", "cifar-10-batches-py/", f"data.root={str(tmp_path)!r}",
                 "--data.dataset=folder"):
        assert part in msg, part
    assert "\n" not in msg


# --------------------------------------------------------------------------------------------------
# CIFAR-10-LT from the real JPEG tree (slow: extracts 60k files once per session)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.data
def test_cifar10_lt_from_jpeg_tree(cifar10_jpeg_root):
    """On the real archive: its counts (5,000 and 1,000 per class) and its file order (sorted names are
    CIFAR-10's within-class order) are what make this subset the published CIFAR-10-LT; generated files cannot
    show that."""
    data = DataConfig(dataset="folder", root=str(cifar10_jpeg_root), imbalance_ratio=100, image_size=32)
    train = build_dataset(data, "train", decoded=False)
    assert train.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                             "truck"]
    n_k = [int(5000 * 0.01 ** (k / 9)) for k in range(10)]
    assert np.bincount(train.labels, minlength=10).tolist() == n_k
    assert len(train) == sum(n_k) == 12406
    # Sorted file names are CIFAR-10's within-class order (the CIFAR-10 JPEG archive names its files so), so
    # LDAM's protocol, restated here on positions 0..4999 of each class, names the files it keeps.
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
