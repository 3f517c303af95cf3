"""Shared fixtures: the repository root, the real data in the project's shared data directory beside the repository
(absent on a fresh clone elsewhere: those tests skip), and a session-wide
extraction of the CIFAR-10 JPEG tree (slow; only tests marked `slow` and `data` ask for it).

    python -m pytest -q            # the fast suite (pyproject's addopts deselect tests marked slow)
    python -m pytest -q -m slow    # only the slow tests (CI runs both)
    python -m pytest -q -m ""      # everything
"""

from __future__ import annotations

import os

import torch

# Triton picks its CPU interpreter when a module defining @triton.jit kernels is imported, so this must
# run before any test imports mixtail.kernels (ENV.md). A CUDA machine compiles the kernels instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# The real data lives in the project's shared data directory beside the repository, never inside it
# (absent on a fresh clone elsewhere: those tests skip).
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
CIFAR10_JPEG_TAR = SHARED_DATA / "cifar10" / "cifar10-jpeg.tar.gz"
CIFAR100_META = SHARED_DATA / "cifar100-meta" / "cifar100_labels_and_lt_r100_indices.npz"


def _skip_if_absent(path: Path) -> None:
    if not path.is_file():
        pytest.skip(f"real data file {path} is absent (the project's shared data beside the repository)")


@pytest.fixture(scope="session")
def cifar100_meta() -> dict[str, np.ndarray]:
    """The canonical CIFAR-100 labels and LT (ρ=100) subset: y_train, y_test, lt_r100_train_indices,
    lt_r100_n_k, class_names."""
    _skip_if_absent(CIFAR100_META)
    with np.load(CIFAR100_META) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="session")
def cifar10_jpeg_root() -> Iterator[Path]:
    """CIFAR-10 as a JPEG tree (train/<class>/NNNN.jpg, test/<class>/NNNN.jpg), extracted once per session.

    A private temporary folder removed at the end of the session, not tmp_path_factory: pytest keeps the
    last three session folders, and three stale copies of 60k files make its start-up cleanup slow.
    """
    _skip_if_absent(CIFAR10_JPEG_TAR)
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
