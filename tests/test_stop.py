"""trainer/stop.py: stopping a run on a signal after a whole step. The trainer's use of it, with
exact resume, is in tests/test_train.py (test_stop_signal_checkpoints_the_step_and_resumes_exactly).

    python -m pytest tests/test_stop.py -q
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mixtail.trainer.stop import StopSignals, exit_status

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["default_int_handler", "SIG_IGN"])
def sigint_before(request):
    """SIGINT's disposition before StopSignals, set here rather than inherited: Python installs its
    default_int_handler only where SIGINT was not ignored when it started, and a background job (`&`, nohup)
    starts with SIGINT ignored. Both cases are tested; the inherited disposition is restored afterwards."""
    chosen = getattr(signal, request.param)
    inherited = signal.signal(signal.SIGINT, chosen)
    yield chosen
    signal.signal(signal.SIGINT, inherited)


def test_records_the_first_signal_and_restores_the_handlers(sigint_before):
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals(["SIGUSR1", "SIGINT"]) as stop:
        assert signal.getsignal(signal.SIGINT) is not sigint_before  # ours, while the run is on
        assert stop.agreed(sync=True) is None  # one process: no collective, the local record
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == signal.SIGUSR1 and stop.agreed(sync=False) == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before
    assert signal.getsignal(signal.SIGINT) is sigint_before
    assert exit_status(signal.SIGINT) == 130 and exit_status(signal.SIGTERM) == 143


def test_a_second_signal_acts_as_without_us(sigint_before):
    """Ctrl-C twice: the first is recorded (the step finishes), the second does what it would without us: the
    usual KeyboardInterrupt, so a run stuck in a step can still be stopped (or nothing, where SIGINT was
    ignored). A second SIGUSR1 reaches the handler that was there before."""
    with StopSignals(["SIGINT"]) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT
        if sigint_before is signal.default_int_handler:
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        else:
            os.kill(os.getpid(), signal.SIGINT)  # ignored, as it was before
            assert stop.received == signal.SIGINT
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: seen.append(a[0]))
    try:
        with StopSignals(["SIGUSR1"]) as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == signal.SIGUSR1 and seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _rank_of(pid: int) -> int | None:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    ranks = [int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc")
def test_ddp_ranks_agree_on_the_step_when_one_rank_is_signalled(tmp_path):
    """torchrun, 2 gloo processes; SIGUSR1 reaches rank 1 only. Both ranks stop after the same step (agreed by
    an all-reduce at the loop's sync points), rank 0's checkpoint is at that step, and each rank says so."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mixtail",
           "train", "smoke_cpu", f"--train.out_dir={out}", "--train.epochs=20", "--train.max_steps_per_epoch=null"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (out / "metrics.jsonl").exists():
            time.sleep(0.05)
        time.sleep(1.0)  # into the first epoch's steps
        assert proc.poll() is None, "the run ended before it could be stopped; make it longer"
        rank1 = [c for c in _children(proc.pid) if _rank_of(c) == 1]
        assert len(rank1) == 1, "rank 1's process not found"
        os.kill(rank1[0], signal.SIGUSR1)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    steps = re.findall(r"mixtail train: stopped by SIGUSR1 after step (\d+) ", stderr)
    assert len(steps) == 2 and steps[0] == steps[1], stderr[-3000:]
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["step"] == int(steps[0]) and state["batch"] > 0
