"""Tests of what `mixtail train --stage router` (trainer/router.py) does to a run directory: it takes the run
directory's lock, and `--overwrite` of stage 1 removes the router files of the run it replaces. (The router's
training and evaluation are tested in tests/test_experts.py, its use by `mixtail eval` in
tests/test_checkpoint_eval.py.)

    python -m pytest tests/test_router.py -q
"""

from __future__ import annotations

import pytest

from mixtail import cli
from mixtail.locks import DirectoryLock
from mixtail.trainer.checkpoint import CheckpointStore
from mixtail.trainer.config import ROUTER_EVAL, ROUTER_FILE
from mixtail.trainer.run_dir import RUN_LOCK, prepare_run_dir


def test_stage_router_takes_the_run_directory_lock(tmp_path, capsys):
    """It took no lock, so it ran beside a `train --resume` of the same directory and wrote a router of epoch 1
    beside a checkpoint of epoch 4: while another process holds the run directory it is refused in one line."""
    with DirectoryLock(tmp_path / RUN_LOCK, what="mixtail train", where=f"run directory {tmp_path}",
                       advice="choose another --train.out_dir", log=lambda _: None):
        capsys.readouterr()
        with pytest.raises(SystemExit) as code:
            cli.main(["train", "smoke_cpu", f"--train.out_dir={tmp_path}", "--model.experts=2", "--stage", "router"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("mixtail train: error: ") and f"run directory {tmp_path}" in err[0], err


def test_overwrite_removes_the_router_files_of_the_run_it_replaces(tmp_path):
    """`--overwrite` kept router.pt and router_eval.json, and eval of the new run used the old run's router."""
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (tmp_path / "checkpoint.pt").write_bytes(b"old")
    for name in (ROUTER_FILE, ROUTER_EVAL):
        (tmp_path / name).write_text("from the run being replaced")
    prepare_run_dir(tmp_path, CheckpointStore(tmp_path), resume=False, overwrite=True, is_main=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
