"""Where the tests find the real datasets, for the few tests that check facts of a real dataset (the CIFAR-100-LT
indices, the ImageNet-LT and iNaturalist lists, CIFAR-10's archive order); every other test makes its own data.

The real data is the project's shared data directory beside the repository, or the folder that the environment
variable MIXTAIL_SHARED_DATA names (set it to a missing path to see the suite as a fresh clone elsewhere does).
Where a file is absent, `require` skips the test, naming the file and why the test needs the real one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mixtail.benchmarks.common import REAL_DATA

# The one definition, shared with the benchmarks: $MIXTAIL_SHARED_DATA, else shared/data beside the checkout.
SHARED_DATA = REAL_DATA
CIFAR10_JPEG_TAR = SHARED_DATA / "cifar10" / "cifar10-jpeg.tar.gz"
CIFAR100_META = SHARED_DATA / "cifar100-meta" / "cifar100_labels_and_lt_r100_indices.npz"
REAL_LISTS = SHARED_DATA / "lists"


def require(path: Path, why: str) -> Path:
    """`path` if it exists; otherwise skip the test, saying which real file is absent and what it checks."""
    if not path.exists():
        pytest.skip(f"real data {path} is absent (the shared data directory beside the repository, or "
                    f"$MIXTAIL_SHARED_DATA): {why}")
    return path
