"""Elastic restart on the CPU: torchrun runs 2 gloo workers with --max-restarts 1, one worker is
killed with SIGKILL mid-run after a checkpoint, torchrun restarts the group, the restarted workers resume
from the last checkpoint (one command with --resume for every attempt), and the run ends with exactly
the weights of an uninterrupted 2-process run.

    python -m pytest tests/test_elastic.py -q -m slow
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "helpers" / "elastic_worker.py"
# 3 epochs of 4 steps, a checkpoint after every step, one evaluation at the end.
# --resume on every attempt: it starts the run when there is no checkpoint yet (docs/scaling.md).
RUN = ["train", "smoke_cpu", "--train.epochs=3", "--train.max_steps_per_epoch=4", "--train.checkpoint_every_steps=1",
       "--train.eval_every_epochs=10", "--resume"]
KILL_AT_STEP = 6  # epoch 1, after its second step
# By default torchrun's workers build their process group on the rendezvous store the agent keeps across
# restarts, and a restarted gloo group can read the dead group's peer addresses from it: measured here
# (torch 2.14.1, a 10-line gloo script, 4 tries) the restart failed with "Gloo connectFullMesh failed ...
# Connection refused" once, hung once and worked twice. A store of its own per attempt, as
# https://github.com/pytorch/pytorch/issues/135712 recommends, restarted cleanly every time (docs/scaling.md).
FRESH_STORE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def torchrun(out_dir: Path, max_restarts: int, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(max_restarts), str(WORKER), *RUN, f"--train.out_dir={out_dir}"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **FRESH_STORE, **(env or {})})
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)["model"]


def metrics(run_dir: Path) -> list[dict]:
    drop = ("train_time_s", "img_per_s")
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("elastic") / "straight"
    res = torchrun(out, max_restarts=0)
    assert "world size 2" in res.stdout and "resuming" not in res.stdout
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kill_rank", [0, 1])
def test_killed_worker_is_restarted_and_the_run_ends_with_the_same_weights(straight, tmp_path, kill_rank):
    out = tmp_path / f"killed_rank{kill_rank}"
    res = torchrun(out, max_restarts=1, env={"MIXTAIL_TEST_KILL_RANK": str(kill_rank),
                                             "MIXTAIL_TEST_KILL_AT_STEP": str(KILL_AT_STEP)})
    # The chosen worker died by SIGKILL, torchrun saw the group fail and started it a second time. Which
    # failure torchrun reports is a race: when rank 1 dies, rank 0 can hit "Connection reset by peer" first,
    # write its error file and be reported as the root cause with SIGTERM's -15 (seen in CI, 2026-12-02),
    # so the test asks only that some worker's failure was reported.
    assert f"rank {kill_rank} sends itself SIGKILL after step {KILL_AT_STEP}" in res.stderr, res.stderr[-3000:]
    assert re.search(r"failed \(exitcode: -?\d+\) local_rank: [01]", res.stderr), res.stderr[-3000:]
    assert res.stdout.count("world size 2") == 2, res.stdout[-3000:]
    resumed = re.findall(r"resuming .*checkpoint\.pt at epoch (\d+), batch (\d+) \(step (\d+)\)", res.stdout)
    assert len(resumed) == 1, res.stdout[-3000:]
    epoch, batch, step = map(int, resumed[0])
    if kill_rank == 0:  # it died asking for step 7's batch, after writing step 6's checkpoint
        assert (epoch, batch, step) == (1, 2, KILL_AT_STEP)
    else:  # rank 0 was stopped by torchrun, possibly while writing step 6's checkpoint: step 5's is then kept
        assert step in (KILL_AT_STEP - 1, KILL_AT_STEP) and (epoch, batch) == (1, step - 4)
    a, b = weights(straight), weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after the restart"
    assert metrics(out) == metrics(straight)
