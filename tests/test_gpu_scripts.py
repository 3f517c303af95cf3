"""The GPU scripts run end to end on the CPU at tiny sizes, so the one call a GPU machine gets cannot fail on a
typo: benchmarks/gpu_accuracy.sh (issue 7's four 200-epoch CIFAR-10-LT runs) with TINY=1 and 1 epoch.

    python -m pytest tests/test_gpu_scripts.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CIFAR10_TAR = REPO.parent / "shared" / "data" / "cifar10" / "cifar10-jpeg.tar.gz"
GLOVE = REPO.parent / "shared" / "data" / "glove" / "class_vectors_glove6B50d.npz"


@pytest.mark.slow
@pytest.mark.data
def test_gpu_accuracy_script_tiny_on_cpu(tmp_path):
    if not CIFAR10_TAR.is_file():
        pytest.skip(f"real data file {CIFAR10_TAR} is absent (tests read ../shared/data beside the repository)")
    env = {**os.environ, "TINY": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", "benchmarks/gpu_accuracy.sh", str(tmp_path), str(CIFAR10_TAR), str(GLOVE), "1", "500"],
                         cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads(next(tmp_path.glob("accuracy_cifar10_lt_r100_*.json")).read_text())
    rows = {r["run"]: r for r in summary["rows"]}
    assert set(rows) == {"smc", "smc_aa", "smc_mixed", "lace"}
    for name, row in rows.items():
        assert row.get("epochs_done") == 1, (name, row, (tmp_path / f"{name}.log").read_text()[-2000:])
        assert row["schedule"] == "shortened: 1 of 1 epochs" and 0 <= row["top1_all"] <= 100
        assert row["semantic_similarity_all"] is not None
    config = json.loads((tmp_path / "smc_aa" / "report" / "report.json").read_text())["meta"]
    assert config["epochs_configured"] == 1
