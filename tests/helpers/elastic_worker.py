"""A torchrun entry point for tests/test_elastic.py: `python -m mixtail ARGS`, which kills itself once.

    MIXTAIL_TEST_KILL_RANK=0 MIXTAIL_TEST_KILL_AT_STEP=6 \
        torchrun --standalone --nproc_per_node 2 --max-restarts 1 tests/helpers/elastic_worker.py train smoke_cpu ...

On the first attempt (torchrun's TORCHELASTIC_RESTART_COUNT=0) the worker whose RANK is MIXTAIL_TEST_KILL_RANK
sends itself SIGKILL when the training loop asks for the batch after step MIXTAIL_TEST_KILL_AT_STEP: with
train.checkpoint_every_steps=1, rank 0 has written that step's checkpoint by then. torchrun sees the worker
die, stops the group and starts it again, and the same command (with --resume, which starts the run when
there is no checkpoint yet) continues from the last checkpoint. Without the MIXTAIL_TEST_* variables it is
the plain CLI.
"""

from __future__ import annotations

import os
import signal
import sys

import pytest

from train_hooks import wrap_train_loader


def main() -> None:
    argv = sys.argv[1:]
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    kill_rank = os.environ.get("MIXTAIL_TEST_KILL_RANK")
    if attempt == 0 and kill_rank is not None and os.environ.get("RANK") == kill_rank:
        steps_done = int(os.environ["MIXTAIL_TEST_KILL_AT_STEP"])
        asked = {"n": 0}

        def die_after(_batch) -> None:
            if asked["n"] == steps_done:
                # The marker says which worker died: torchrun may report another rank's exit first.
                print(f"elastic_worker: rank {kill_rank} sends itself SIGKILL after step {steps_done}",
                      file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            asked["n"] += 1

        wrap_train_loader(pytest.MonkeyPatch(), die_after)
    from mixtail.cli import main as cli_main

    sys.argv = ["mixtail", *argv]
    cli_main(argv)


if __name__ == "__main__":
    main()
