"""Shared fixtures: generated data that tests share (photo-like JPEGs of varied sizes and encodings, a small
CIFAR-10-style JPEG tree), the real datasets for the few tests that check facts of them (the CIFAR-100-LT labels
and indices; a session-wide extraction of the CIFAR-10 JPEG archive, slow, asked for only by tests marked `slow`
and `data`), and a real tmpfs. The real data is found as tests/helpers/real_data.py says; where it is absent,
those tests skip, saying which file and why.

    python -m pytest -q            # the fast suite (pyproject's addopts deselect tests marked slow)
    python -m pytest -q -m slow    # only the slow tests (CI runs both)
    python -m pytest -q -m ""      # everything
    MIXTAIL_SHARED_DATA=/nonexistent python -m pytest -q    # as a fresh clone without the real data sees it
"""

from __future__ import annotations

import os

import torch

# Triton picks its CPU interpreter when a module defining @triton.jit kernels is imported, so this must
# run before any test imports mixtail.kernels. A CUDA machine compiles the kernels instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from helpers.images import CIFAR10_CLASSES, write_cifar_like_tree, write_photos
from helpers.real_data import CIFAR10_JPEG_TAR, CIFAR100_META, require


@pytest.fixture
def private_cache(tmp_path, monkeypatch) -> Path:
    """The image check's cache and bad-file listings in this test's own folder, never in ~/.cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MIXTAIL_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory) -> Path:
    """16 generated photo-like JPEGs (helpers/images.py's PHOTO_SPECS: 68 to 2400 px, aspect ratios 1:2.4 to
    3.4:1, 4:4:4, 4:2:2 and 4:2:0, progressive, grayscale, EXIF-rotated), named pNNN_WxH.JPEG in that order."""
    folder = tmp_path_factory.mktemp("photos")
    write_photos(folder)
    return folder


@pytest.fixture(scope="session")
def cifar_like_root(tmp_path_factory) -> Path:
    """A CIFAR-10-style JPEG tree of generated 32×32 images: train/<class>/0000..0011.jpg and
    test/<class>/0000..0003.jpg for the ten CIFAR-10 class names. Tests copy it before changing it."""
    return write_cifar_like_tree(tmp_path_factory.mktemp("cifar_like"), CIFAR10_CLASSES, 12, 4)


@pytest.fixture(scope="session")
def cifar100_meta() -> dict[str, np.ndarray]:
    """The canonical CIFAR-100 labels and LT (ρ=100) subset: y_train, y_test, lt_r100_train_indices,
    lt_r100_n_k, class_names."""
    require(CIFAR100_META, "the real CIFAR-100 labels and LT indices are the facts checked")
    with np.load(CIFAR100_META) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="session")
def cifar10_jpeg_root() -> Iterator[Path]:
    """CIFAR-10 as a JPEG tree (train/<class>/NNNN.jpg, test/<class>/NNNN.jpg), extracted once per session.

    A private temporary folder removed at the end of the session, not tmp_path_factory: pytest keeps the
    last three session folders, and three stale copies of 60k files make its start-up cleanup slow.
    """
    require(CIFAR10_JPEG_TAR, "the real archive's counts and file order are the facts checked")
    with tempfile.TemporaryDirectory(prefix="mixtail_cifar10_jpeg_") as tmp:
        root = Path(tmp)
        with tarfile.open(CIFAR10_JPEG_TAR, "r:gz") as tar:
            tar.extractall(root, filter="data")
        if not (root / "train").is_dir() or not (root / "test").is_dir():
            pytest.fail(f"{CIFAR10_JPEG_TAR} did not hold train/ and test/ at its top level")
        yield root


@pytest.fixture
def mount_tmpfs(tmp_path) -> Iterator:
    """mount_tmpfs("256k") -> the path of a real tmpfs of that size, mounted for the test and unmounted after
    (needs mount rights: root with CAP_SYS_ADMIN; skips, saying why, where it cannot mount one). A real full
    disk, rather than a simulated errno, is what shows the messages a user sees."""
    import shutil
    import subprocess
    import sys

    mounted: list[Path] = []

    def mount(size: str) -> Path:
        tool = shutil.which("mount")
        if tool is None or not sys.platform.startswith("linux"):
            pytest.skip("a real tiny tmpfs needs Linux and `mount`; the simulated full-disk tests cover this")
        mnt = tmp_path / f"tmpfs{len(mounted)}"
        mnt.mkdir()
        res = subprocess.run([tool, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                             text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode}); "
                        "the simulated full-disk tests cover this")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=True)
