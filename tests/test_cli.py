"""Tests of mixtail/cli.py: every failure is one line on stderr with the right exit status, the traceback only
behind --debug or MIXTAIL_DEBUG=1, and under torchrun the same line reaches the elastic summary.

    python -m pytest tests/test_cli.py -q
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixtail import cli
from mixtail.errors import DataError
from mixtail.trainer.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parent.parent


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        cli.main(list(argv))
    out, err = capsys.readouterr()
    return info.value.code, out, err


def _assert_one_line(err: str, command: str, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith(f"mixtail {command}: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _run(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def injected(monkeypatch, capsys):
    """Register a command `boom` that raises the exception it is given (the table is how commands are added);
    returns a function that runs it and checks for one line with the fragment and exit status given."""
    def run(exc: BaseException, status: int, fragment: str) -> None:
        def boom(argv):
            raise exc
        monkeypatch.setitem(cli.COMMANDS, "boom", boom)
        code, _, err = _main(capsys, "boom")
        assert code == status
        _assert_one_line(err, "boom", fragment)
    return run


# --------------------------------------------------------------------------------------------------
# Real inputs through the real commands
# --------------------------------------------------------------------------------------------------


def test_bad_config_value(capsys):
    code, _, err = _main(capsys, "train", "smoke_cpu", "--optim.lr=-1")
    assert code == 2
    _assert_one_line(err, "train", "error: ", "optim.lr")


def test_bad_config_type_in_file(capsys, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  keep_checkpoints: two\n")
    code, _, err = _main(capsys, "train", str(path))
    assert code == 2
    _assert_one_line(err, "train", str(path), "train.keep_checkpoints")


@pytest.mark.parametrize("command", [["train"], ["sweep", "--set", "train.seed=0,1", "--dry-run"]])
def test_a_config_file_that_is_not_utf8_is_one_line_naming_it(capsys, tmp_path, command):
    """Used to be `internal error: UnicodeDecodeError`, without the file's name."""
    path = tmp_path / "run.yaml"
    path.write_bytes(b"train:\n  epochs: 1\n  out_dir: 'r\xffx'\n")
    code, _, err = _main(capsys, command[0], str(path), *command[1:])
    assert code == 2
    _assert_one_line(err, command[0], str(path), "not UTF-8", "byte offset 32")


def test_missing_config_file(capsys, tmp_path):
    code, _, err = _main(capsys, "train", str(tmp_path / "nope.yaml"))
    assert code == 2
    _assert_one_line(err, "train", "nope.yaml")


def test_missing_checkpoint(capsys, tmp_path):
    code, _, err = _main(capsys, "eval", str(tmp_path / "checkpoint.pt"))
    assert code == 2
    _assert_one_line(err, "eval", str(tmp_path / "checkpoint.pt"), "does not exist")


@pytest.mark.parametrize("damage", ["truncate", "flip", "text"])
def test_corrupt_checkpoint_for_eval(capsys, tmp_path, damage):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": {"w": torch.randn(2000)}, "config": {}})
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 3] ^= 0x01
    else:
        data = bytearray(b"model weights, honest\n")
    path.write_bytes(data)
    code, _, err = _main(capsys, "eval", str(path))
    assert code == 2
    why = {"truncate": "truncated", "flip": "corrupt", "text": "not a checkpoint"}[damage]
    _assert_one_line(err, "eval", str(path), why)


def test_unknown_option_is_a_one_line_usage_error(capsys):
    code, _, err = _main(capsys, "eval", "x.pt", "--frobnicate")
    assert code == 2
    _assert_one_line(err, "eval", "--frobnicate", "mixtail eval --help")


def test_unknown_command_and_benchmark(capsys):
    code, _, err = _main(capsys, "trian")
    assert code == 2 and err.strip().splitlines() == [
        "mixtail: error: unknown command 'trian'; choose one of train | eval | bench | sweep | convert | data | config "
        "| upgrade-checkpoint (see mixtail --help)"]
    code, _, err = _main(capsys, "bench", "nope")
    assert code == 2
    _assert_one_line(err, "bench", "unknown benchmark 'nope'", "loss | loader")


def test_help_still_works(capsys):
    code, out, _ = _main(capsys, "--help")
    assert code == 0 and "mixtail train" in out
    code, out, _ = _main(capsys, "eval", "--help")
    assert code == 0 and "checkpoint" in out


# --------------------------------------------------------------------------------------------------
# Injected failures: each kind of exception, from inside a command
# --------------------------------------------------------------------------------------------------

OS_ERRORS = [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/metrics.jsonl"),
     f"error: {os.strerror(errno.ENOSPC)} (ENOSPC): /runs/x/metrics.jsonl"),
    (OSError(errno.EROFS, os.strerror(errno.EROFS), "/runs/x"), "(EROFS): /runs/x"),
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/train"), "(EACCES): /data/train"),
    (FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/data/list.txt"), "(ENOENT): /data/list.txt"),
    (OSError(errno.EXDEV, os.strerror(errno.EXDEV), "/a", None, "/b"), "(EXDEV): /a -> /b"),  # rename(a, b)
    (FileNotFoundError("--resume: no checkpoint at runs/x/checkpoint.pt"),
     "error: --resume: no checkpoint at runs/x/checkpoint.pt"),
]


@pytest.mark.parametrize("exc,expected", OS_ERRORS, ids=[type(e).__name__ + str(e.errno) for e, _ in OS_ERRORS])
def test_os_error_inside_a_command(injected, exc, expected):
    injected(exc, 2, expected)


def test_mixtail_error_with_a_stray_newline_stays_one_line(injected):
    injected(DataError("data/train/class_a/3.jpg: cannot be decoded\n(truncated JPEG)"), 2,
             "error: data/train/class_a/3.jpg: cannot be decoded (truncated JPEG)")


@pytest.mark.parametrize("exc,expected", [
    (KeyError("config"), "internal error: KeyError: 'config' (run with --debug for the traceback)"),
    (RuntimeError("shape mismatch\n  at line 3\n  more"), "internal error: RuntimeError: shape mismatch (run"),
    (AssertionError(), "internal error: AssertionError (run with --debug for the traceback)"),
], ids=["KeyError", "multiline", "empty"])
def test_a_bug_is_one_line_with_its_type(injected, exc, expected):
    injected(exc, 1, expected)


def test_keyboard_interrupt_exits_130(injected):
    injected(KeyboardInterrupt(), 130, "interrupted")


def test_debug_flag_anywhere_or_env_reraises(injected, monkeypatch):
    injected(KeyError("config"), 1, "internal error: KeyError")  # without --debug: one line
    for argv in (["--debug", "boom"], ["boom", "--debug"]):
        with pytest.raises(KeyError):
            cli.main(argv)
    monkeypatch.setenv("MIXTAIL_DEBUG", "1")
    with pytest.raises(KeyError):
        cli.main(["boom"])
    monkeypatch.setenv("MIXTAIL_DEBUG", "0")
    injected(KeyError("config"), 1, "internal error: KeyError")


def test_debug_is_removed_before_dispatch(monkeypatch):
    seen = []
    monkeypatch.setitem(cli.COMMANDS, "echo", lambda argv: seen.append(argv) or 0)
    with pytest.raises(SystemExit) as info:
        cli.main(["echo", "a", "--debug", "--x.y=1"])
    assert info.value.code == 0 and seen == [["a", "--x.y=1"]]


# --------------------------------------------------------------------------------------------------
# End to end: a real process, and torchrun
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_process_one_line_and_debug_traceback(tmp_path):
    missing = tmp_path / "checkpoint.pt"
    res = _run("-m", "mixtail", "eval", str(missing))
    assert res.returncode == 2
    _assert_one_line(res.stderr, "eval", str(missing))
    res = _run("-m", "mixtail", "eval", str(missing), env={"MIXTAIL_DEBUG": "1"})
    assert res.returncode == 1
    assert "Traceback (most recent call last)" in res.stderr and "CheckpointError" in res.stderr


# Each worker runs mixtail, then waits (up to 2 min) until every rank's mixtail has ended before it exits with
# mixtail's status: torchrun kills the other workers once one has failed, and without this wait a loaded machine
# could have rank 1 killed before it printed its line. The wait is the test's: mixtail runs as it always does.
_BARRIER = ('"$0" -m mixtail train "$1"; rc=$?; touch "$2/ended.$LOCAL_RANK"; i=0; '
            'while [ "$(ls "$2" | grep -c ended)" -lt "$LOCAL_WORLD_SIZE" ] && [ $i -lt 1200 ]; do '
            'sleep 0.1; i=$((i + 1)); done; exit $rc')


@pytest.mark.slow
def test_torchrun_summary_shows_the_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: -1\n")
    (tmp_path / "barrier").mkdir()
    res = _run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
               "sh", "-c", _BARRIER, sys.executable, str(bad), str(tmp_path / "barrier"), timeout=300)
    assert sorted(p.name for p in (tmp_path / "barrier").iterdir()) == ["ended.0", "ended.1"], res.stderr[-2000:]
    assert res.returncode != 0
    ours = [line for line in res.stderr.splitlines() if line.startswith("mixtail train: ")]
    assert len(ours) == 2 and all("optim.lr" in line and "error: " in line for line in ours)  # one per rank
    summary = res.stderr[res.stderr.index("Root Cause"):]
    assert "error_file: <N/A>" not in summary
    root = [line for line in summary.splitlines() if line.strip().startswith("traceback :")]
    assert root and root[0].split("traceback :", 1)[1].strip() == ours[0]
    assert "exitcode  : 2" in summary


# --------------------------------------------------------------------------------------------------
# bench: bad arguments are one-line usage errors, nothing ran means exit 2, results land in the working directory
#
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, fragment", [
    (["loader", "--batch-size", "0"], "argument --batch-size: must be positive, got 0"),
    (["loader", "--windows", "-3"], "argument --windows: must be positive, got -3"),
    (["loss", "--budget-s", "-1"], "argument --budget-s: must be positive, got -1"),
    (["loss", "--budget-s", "nan"], "argument --budget-s: must be positive, got nan"),
    (["loss", "--sizes", "64", "x"], "argument --sizes: expected an integer, got 'x'"),
    (["step", "--warmup", "-1"], "argument --warmup: must be at least 0, got -1"),
    (["classic", "--epochs", "0"], "argument --epochs: must be positive, got 0"),
    (["convert", "--jobs", "0"], "argument --jobs: must be positive, got 0"),
    (["compare", "only_one.json"], "the following arguments are required: b"),
])
def test_bench_bad_arguments_are_one_line_usage_errors(capsys, tmp_path, monkeypatch, argv, fragment):
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(capsys, "bench", *argv)
    assert code == 2
    _assert_one_line(err, "bench", fragment, f"mixtail bench {argv[0]} --help")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer to --device cuda on a machine without CUDA")
def test_bench_loader_on_cuda_without_cuda_is_a_prefixed_error(capsys):
    code, _, err = _main(capsys, "bench", "loader", "--backend", "torch", "--device", "cuda")
    assert code == 2
    _assert_one_line(err, "bench", "error: --device cuda, but torch sees no CUDA device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="graphs run where CUDA is")
def test_bench_step_where_no_mode_can_run_writes_nothing_and_exits_2(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = _main(capsys, "bench", "step", "--config", "smoke_cpu", "--modes", "graphs",
                           "--out", str(tmp_path / "res"))
    assert code == 2
    assert "skipping graphs" in out
    _assert_one_line(err, "bench", "nothing to time on cpu", "graphs: CUDA graphs need a CUDA device")
    assert list(tmp_path.iterdir()) == []


def test_bench_results_go_to_the_working_directory_not_the_package(capsys, tmp_path, monkeypatch):
    from mixtail.benchmarks import common

    monkeypatch.chdir(tmp_path)
    package_results = sorted(common.RESULTS_DIR.glob("*.json"))
    code, out, _ = _main(capsys, "bench", "step", "--config", "smoke_cpu", "--model.arch=resnet8",
                         "--data.batch_size=4", "--modes", "eager", "--warmup", "0", "--windows", "1",
                         "--window-steps", "1")
    assert code == 0
    (path,) = (tmp_path / "benchmarks-results").glob("step_*.json")
    assert f"wrote {path.relative_to(tmp_path)}" in out or f"wrote {path}" in out
    assert sorted(common.RESULTS_DIR.glob("*.json")) == package_results
