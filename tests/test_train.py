"""The trainer end to end on the CPU: outputs of a run, exact resume after a crash or a kill, eval, DDP.

    python -m pytest tests/test_train.py -q
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.train_hooks import SimulatedCrash, wrap_train_loader
from mixtail.errors import ConfigError, DataError
from mixtail.trainer.config import load_config
from mixtail.trainer.train import lr_at, train

REPO = Path(__file__).resolve().parent.parent


def _run_cli(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, "-m", "mixtail", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _smoke(tmp_path, *overrides):
    return load_config("smoke_cpu", [f"--train.out_dir={tmp_path}", *overrides])


def _weights(run_dir):
    return torch.load(Path(run_dir) / "checkpoint.pt", weights_only=False)["model"]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"parameter {k} differs"


def test_lr_schedule_warmup_and_milestones():
    cfg = load_config(None)  # the paper's CIFAR recipe: warmup 5 epochs, x0.01 at 160, x0.0001 at 180
    o, spe = cfg.optim, 10
    assert lr_at(o, 0, spe) == pytest.approx(0.1 / 50)
    assert lr_at(o, 49, spe) == pytest.approx(0.1)
    assert lr_at(o, 50, spe) == pytest.approx(0.1)
    assert lr_at(o, 1599, spe) == pytest.approx(0.1)
    assert lr_at(o, 1600, spe) == pytest.approx(0.1 * 0.01)
    assert lr_at(o, 1800, spe) == pytest.approx(0.1 * 0.0001)


def test_lr_warmup_per_epoch_is_ldam_and_cmo_adjust_learning_rate():
    """optim.warmup=per_epoch: lr·(e + 1)/5 for the whole of epoch e < 5, as LDAM-DRW's and CMO's
    adjust_learning_rate (written out here), then the same milestones; per_step ramps within the epoch."""
    import dataclasses

    o, spe = dataclasses.replace(load_config(None).optim, warmup="per_epoch"), 97

    def theirs(epoch):  # cifar_train.py's rule, 1-based epoch
        e = epoch + 1
        return 0.1 * e / 5 if e <= 5 else 0.1 * 0.0001 if e > 180 else 0.1 * 0.01 if e > 160 else 0.1

    for epoch in (0, 1, 4, 5, 159, 160, 179, 180, 199):
        for b in (0, 50, 96):
            assert lr_at(o, epoch * spe + b, spe) == pytest.approx(theirs(epoch)), (epoch, b)
    step = dataclasses.replace(o, warmup="per_step")
    assert lr_at(step, 0, spe) == pytest.approx(0.1 / (5 * spe)) and lr_at(o, 0, spe) == pytest.approx(0.02)
    with pytest.raises(ConfigError, match="optim.warmup"):
        dataclasses.replace(o, warmup="per_batch")


@pytest.mark.slow
def test_cli_run_writes_everything(tmp_path):
    out = tmp_path / "run"
    res = _run_cli("train", "smoke_cpu", f"--train.out_dir={out}")
    assert res.returncode == 0, res.stderr
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "per_class_accuracy.png", "final_eval.json"):
        assert (out / name).is_file(), name
    table = res.stdout.splitlines()
    assert any("All" in line and "Many" in line and "Few" in line for line in table), res.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "loss" in r] == [1, 2]
    assert [r["epoch"] for r in records if "eval" in r] == [1, 2]
    assert load_config(out / "config.yaml") == load_config("smoke_cpu", [f"--train.out_dir={out}"])
    # `mixtail eval` rebuilds the model and prints the same numbers.
    res = _run_cli("eval", str(out / "checkpoint.pt"))
    assert res.returncode == 0, res.stderr
    final = json.loads((out / "final_eval.json").read_text())
    assert f"{final['all']:.2f}" in res.stdout


def test_cli_rejects_bad_override_naming_the_key(tmp_path):
    res = _run_cli("train", "smoke_cpu", "--optim.lr=fast", f"--train.out_dir={tmp_path}")
    assert res.returncode == 2
    assert "optim.lr" in res.stderr and "fast" in res.stderr



def _crash_after(batches: int, monkeypatch):
    """Make the training loader raise after `batches` batches in total, like a process dying mid-epoch."""
    seen = {"n": 0}

    def count(_batch):
        if seen["n"] == batches:
            raise SimulatedCrash("simulated crash")
        seen["n"] += 1

    wrap_train_loader(monkeypatch, count)


# 3 steps per epoch, a checkpoint every 2 steps and at every epoch end. Crashing when the 6th batch is
# asked for loses step 5 (last checkpoint: step 4, mid-epoch); when the 4th is asked for, nothing is lost
# (last checkpoint: the end of epoch 1).
@pytest.mark.parametrize("crash_at,checkpoint_step", [(5, 4), (3, 3)])
@pytest.mark.slow
def test_resume_after_crash_reaches_the_same_weights(tmp_path, monkeypatch, crash_at, checkpoint_step):
    overrides = ["--train.epochs=3", "--train.checkpoint_every_steps=2"]
    straight = _smoke(tmp_path / "straight", *overrides)
    train(straight)
    cfg = _smoke(tmp_path / "crashed", *overrides)
    with monkeypatch.context() as m:
        _crash_after(crash_at, m)
        with pytest.raises(SimulatedCrash):
            train(cfg)
    state = torch.load(tmp_path / "crashed" / "checkpoint.pt", weights_only=False)
    assert state["step"] == checkpoint_step
    train(cfg, resume=True)
    _assert_same_weights(_weights(tmp_path / "straight"), _weights(tmp_path / "crashed"))
    lines = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = lines(tmp_path / "straight"), lines(tmp_path / "crashed")
    strip = lambda r: {k: v for k, v in r.items() if k not in ("train_time_s", "img_per_s")}  # noqa: E731
    assert [strip(r) for r in a] == [strip(r) for r in b]


def test_resume_refuses_a_different_config(tmp_path):
    train(_smoke(tmp_path))
    with pytest.raises(Exception, match="optim.lr"):
        train(_smoke(tmp_path, "--optim.lr=0.5"), resume=True)


@pytest.mark.slow
def test_checkpoint_survives_sigkill(tmp_path):
    """Kill -9 a real training process right after a checkpoint lands; the resumed run ends where an
    uninterrupted run ends."""
    overrides = ["--train.epochs=4", "--train.max_steps_per_epoch=6", "--train.checkpoint_every_steps=1"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "mixtail", "train", "smoke_cpu", f"--train.out_dir={killed}",
                             *overrides], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoint.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=False)["step"] >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = torch.load(ckpt, weights_only=False)["step"]
    assert 3 <= step < 24
    res = _run_cli("train", "smoke_cpu", f"--train.out_dir={killed}", *overrides, "--resume")
    assert res.returncode == 0, res.stderr
    assert f"step {step}" in res.stdout
    straight = tmp_path / "straight"
    res = _run_cli("train", "smoke_cpu", f"--train.out_dir={straight}", *overrides)
    assert res.returncode == 0, res.stderr
    _assert_same_weights(_weights(straight), _weights(killed))


@pytest.mark.slow
def test_ddp_two_gloo_processes(tmp_path):
    """torchrun with 2 CPU processes: both ranks train in lockstep and rank 0 writes the run."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mixtail",
           "train", "smoke_cpu", f"--train.out_dir={out}"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "world size 2" in res.stdout
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "eval" in r] == [1, 2]
    final = json.loads((out / "final_eval.json").read_text())
    assert final["num_test_images"] == 1000  # the test set, sharded over both ranks and summed


@pytest.mark.slow
@pytest.mark.data
def test_cli_cifar10_lt_from_the_jpeg_tree(cifar10_jpeg_root, tmp_path):
    """The done-criterion run: CIFAR-10-LT (ρ = 100) built from the real CIFAR-10 JPEG archive, trained and
    evaluated through the CLI on the CPU with the paper's ResNet-32 (a few steps). Real data, because the
    checked counts (12,406 training images, 5000..50 per class, 10,000 test images, the shot groups) are the
    real dataset's; it skips without the archive."""
    out = tmp_path / "c10"
    res = _run_cli("train", "cifar10_lt_r100", "--data.dataset=folder", f"--data.root={cifar10_jpeg_root}",
                   "--train.epochs=1", "--train.max_steps_per_epoch=4", "--train.device=cpu",
                   f"--train.out_dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "12406 training images in 10 classes (5000..50 per class)" in res.stdout
    final = json.loads((out / "final_eval.json").read_text())
    assert final["num_test_images"] == 10000 and final["group_sizes"] == {"many": 8, "medium": 2, "few": 0}


@pytest.mark.slow
def test_a_run_directory_is_never_overwritten_silently(tmp_path):
    train(_smoke(tmp_path))
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run.*--resume.*--overwrite"):
        train(_smoke(tmp_path))
    assert (tmp_path / "metrics.jsonl").read_text() == before, "the refused run must not touch the directory"
    with pytest.raises(ConfigError, match="exclude each other"):
        train(_smoke(tmp_path), resume=True, overwrite=True)
    train(_smoke(tmp_path, "--train.epochs=1"), overwrite=True)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "loss" in r] == [1]


@pytest.mark.slow
def test_resume_from_a_moved_directory_and_with_more_epochs(tmp_path):
    first = tmp_path / "first"
    train(_smoke(first, "--train.epochs=2"))
    moved = tmp_path / "moved"
    first.rename(moved)
    # Only what changes the trajectory is compared: the new out_dir and a longer schedule are fine.
    train(_smoke(moved, "--train.epochs=3"), resume=True)
    state = torch.load(moved / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 3 and state["extended"] == [{"from_epochs": 2, "to_epochs": 3, "at_epoch": 2}]
    with pytest.raises(ConfigError, match="already trained 3 epochs"):
        train(_smoke(moved, "--train.epochs=2"), resume=True)
    with pytest.raises(ConfigError, match="mix.mix_prob"):
        train(_smoke(moved, "--train.epochs=4", "--mix.mix_prob=0.9"), resume=True)


@pytest.mark.slow
def test_eval_report_and_posthoc_shift(tmp_path):
    """`mixtail eval CKPT --report DIR --posthoc-tau 0,1 --class-vectors ...` on a short run: the report has
    its keys (top-1 and the Table 4 scores by group, the best epoch, the class centres), T = 0 reproduces the
    plain accuracy, and the shift equals T·log(P_Y/π) (recomputed)."""
    from mixtail.pipelines.sampling import foreground_class_probs
    from mixtail.trainer.checkpoint_eval import evaluate_checkpoint, posthoc_shift

    run = tmp_path / "run"
    train(_smoke(run, "--mix.start_epoch=0", "--mix.unmixed_last_epochs=0"))
    vectors = tmp_path / "vectors.npz"
    from mixtail.pipelines.sources.demo import DEMO_CLASSES
    np.savez(vectors, names=np.array(DEMO_CLASSES), vectors=np.random.default_rng(0).normal(size=(10, 6)))
    res = evaluate_checkpoint(run / "checkpoint.pt", report_dir=tmp_path / "report", class_vectors=vectors,
                              posthoc_taus=[0.0, 1.0])
    assert res["posthoc"][0]["all"] == pytest.approx(res["all"])
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert set(report["top1"]) == {"all", "many", "medium", "few"}
    for key in ("inter_class_score", "semantic_similarity_score"):
        assert set(report[key]) == {"all", "many", "medium", "few"} and report[key]["all"] is not None
    centres = np.load(tmp_path / "report" / "class_centres.npy")
    assert centres.shape == (10, 64) and centres.dtype == np.float32
    assert report["best_epoch"]["epoch"] in (1, 2)
    for name in ("report.md", "per_class_accuracy.png"):
        assert (tmp_path / "report" / name).is_file()
    cfg = _smoke(run, "--mix.start_epoch=0", "--mix.unmixed_last_epochs=0")
    counts = np.asarray(torch.load(run / "checkpoint.pt", weights_only=False)["class_counts"], np.float64)
    p_y = counts / counts.sum()
    q = foreground_class_probs(counts, "instance", 1.0)
    pi = 0.5 * (0.5 * q + 0.5 * p_y) + 0.5 * p_y  # mix_prob 0.5, E[λ] 0.5 for ratio_range [0.2, 0.8]
    np.testing.assert_allclose(posthoc_shift(cfg, counts, [2.0]).numpy()[0], 2 * np.log(p_y / pi), rtol=1e-5)
    out = _run_cli("eval", str(run / "checkpoint.pt"), "--posthoc-tau", "0,0.5")
    assert out.returncode == 0 and "post-hoc shift" in out.stdout, out.stderr


@pytest.mark.slow
def test_training_with_gradient_accumulation_resumes_exactly(tmp_path, monkeypatch):
    """train.accumulate_steps=2 with checkpoints due every 2 batches of epochs of 3: a due checkpoint waits for
    the SGD step, and a crash + resume ends where a straight run does."""
    overrides = ["--train.epochs=2", "--train.max_steps_per_epoch=3", "--train.accumulate_steps=2",
                 "--train.checkpoint_every_steps=2"]
    train(_smoke(tmp_path / "straight", *overrides))
    cfg = _smoke(tmp_path / "crashed", *overrides)
    with monkeypatch.context() as m:
        _crash_after(4, m)
        with pytest.raises(SimulatedCrash):
            train(cfg)
    train(cfg, resume=True)
    _assert_same_weights(_weights(tmp_path / "straight"), _weights(tmp_path / "crashed"))


def test_tensorboard_events_beside_metrics(tmp_path):
    """train.tensorboard: the loss parts, lr, images/s and each evaluation's groups as TensorBoard scalars."""
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (pip install 'mixtail[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(_smoke(tmp_path, "--train.tensorboard=true"))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/ce", "train/smc", "train/lr", "train/img_per_s", "eval/top1_all",
            "eval/top1_many", "eval/top1_few"} <= tags, tags
    assert [e.step for e in events.Scalars("train/loss")] == [3, 6]


# --------------------------------------------------------------------------------------------------
# Stopping on a signal, and run directories
# --------------------------------------------------------------------------------------------------


def _signal_at(batches: int, sig: int, monkeypatch):
    """Send `sig` to this process while the loader hands out batch number `batches` (counted from 0)."""
    seen = {"n": 0}

    def send(_batch):
        if seen["n"] == batches:
            os.kill(os.getpid(), sig)
        seen["n"] += 1

    wrap_train_loader(monkeypatch, send)


@pytest.mark.parametrize("sig,at,stopped_step", [(signal.SIGTERM, 4, 5), (signal.SIGUSR1, 2, 3)])
@pytest.mark.slow
def test_stop_signal_checkpoints_the_step_and_resumes_exactly(tmp_path, monkeypatch, sig, at, stopped_step):
    """SIGTERM (or SIGUSR1) mid-epoch: the step in flight is finished and checkpointed (no checkpoint was due:
    SIGTERM at batch 4 stops after step 5, the last checkpoint being the end of epoch 1, step 3), the run ends
    with TrainingStopped (exit status 128 + the signal), and --resume ends with the weights and metrics of an uninterrupted run. SIGUSR1 at batch 2 stops
    after step 3, the last of epoch 1, before the epoch's record and evaluation (a grace period is short): the
    resumed run starts there."""
    from mixtail.errors import TrainingStopped

    overrides = ["--train.epochs=2", "--train.eval_every_epochs=2"]
    train(_smoke(tmp_path / "straight", *overrides))
    cfg = _smoke(tmp_path / "stopped", *overrides)
    with monkeypatch.context() as m:
        _signal_at(at, sig, m)
        with pytest.raises(TrainingStopped, match=f"stopped by {signal.Signals(sig).name} after step "
                                                  f"{stopped_step} .*--resume") as err:
            train(cfg)
    assert err.value.exit_status == 128 + sig
    assert signal.getsignal(sig) is signal.SIG_DFL or sig == signal.SIGINT, "the old handler is restored"
    state = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=False)
    assert state["step"] == stopped_step
    train(cfg, resume=True)
    _assert_same_weights(_weights(tmp_path / "straight"), _weights(tmp_path / "stopped"))
    lines = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    strip = lambda r: {k: v for k, v in r.items() if k not in ("train_time_s", "img_per_s")}  # noqa: E731
    assert [strip(r) for r in lines(tmp_path / "straight")] == [strip(r) for r in lines(tmp_path / "stopped")]


def test_stop_signals_config_is_strict_and_can_be_emptied(tmp_path, monkeypatch):
    for bad, why in (("[SIGTERMX]", "not a signal name"), ("[SIG_DFL]", "not a signal name"),
                     ("[SIGKILL]", "cannot be caught"), ("[SIGTERM,SIGTERM]", "listed twice"), ("[15]", "")):
        with pytest.raises(ConfigError, match=f"train.stop_signals.*{why}"):
            _smoke(tmp_path, f"--train.stop_signals={bad}")
    # An empty list: a signal acts as it would without mixtail (here SIGUSR1's handler of the test).
    caught = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: caught.append(a[0]))
    try:
        with monkeypatch.context() as m:
            _signal_at(1, signal.SIGUSR1, m)
            train(_smoke(tmp_path, "--train.epochs=1", "--train.stop_signals=[]"))
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert caught == [signal.SIGUSR1]


@pytest.mark.slow
def test_sigterm_of_a_real_process_checkpoints_its_step(tmp_path):
    """SIGTERM to `mixtail train` (what SLURM and Kubernetes send) must not end it in a fraction of a second,
    rc 143, silently, losing the epoch, but with one line naming the step, rc 143, and a
    checkpoint at that step (mid-epoch; that --resume continues it exactly is the test above)."""
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "mixtail", "train", "smoke_cpu", f"--train.out_dir={stopped}",
                             "--train.epochs=20", "--train.max_steps_per_epoch=null"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (stopped / "metrics.jsonl").exists():
        time.sleep(0.05)
    time.sleep(0.5)  # into the first epoch's steps
    assert proc.poll() is None, "the run ended before it could be stopped; make it longer"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    state = torch.load(stopped / "checkpoint.pt", weights_only=False)
    lines = [x for x in err.splitlines() if x.startswith("mixtail train:")]
    assert len(lines) == 1 and lines[0].startswith(f"mixtail train: stopped by SIGTERM after step {state['step']} "
                                                   f"(epoch {state['epoch'] + 1}, batch {state['batch']} of "), err
    assert "--resume" in lines[0] and state["step"] > 0 and state["batch"] > 0


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path, monkeypatch, capsys):
    """Killed in its set-up or first step, a run leaves config.yaml and an empty metrics.jsonl. Neither --resume
    nor a plain rerun may be refused for it (with "holds a run but no checkpoint", leaving only --overwrite): both
    start from scratch (nothing is lost), --resume saying so in one line, and end as an uninterrupted run."""
    train(_smoke(tmp_path / "straight", "--train.epochs=1"))
    for name, again in (("resumed", dict(resume=True)), ("rerun", dict())):
        cfg = _smoke(tmp_path / name, "--train.epochs=1")
        with monkeypatch.context() as m:
            _crash_after(0, m)
            with pytest.raises(SimulatedCrash):
                train(cfg)
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["config.yaml", "metrics.jsonl"]
        assert (tmp_path / name / "metrics.jsonl").stat().st_size == 0
        capsys.readouterr()
        train(cfg, **again)
        said = [line for line in capsys.readouterr().out.splitlines() if "--resume" in line]
        assert said == ([f"--resume: no checkpoint in {tmp_path / name} yet, starting the run from scratch (an "
                         "earlier attempt stopped before its first checkpoint)"] if again else [])
        _assert_same_weights(_weights(tmp_path / "straight"), _weights(tmp_path / name))
    # A run that completed an epoch but lost its checkpoints is still never restarted silently.
    for p in (tmp_path / "rerun").glob("checkpoint*.pt"):
        p.unlink()
    with pytest.raises(FileNotFoundError, match="holds a run .metrics.jsonl. but no checkpoint.*--overwrite"):
        train(_smoke(tmp_path / "rerun", "--train.epochs=1"), resume=True)


@pytest.mark.slow
def test_two_trainers_on_one_run_directory(tmp_path, capsys):
    """Two trainers on one train.out_dir must not both succeed and mix their metrics and checkpoints. A real
    training process holds the directory: a second trainer (even with --overwrite) is refused in one line
    naming its pid; after the first is killed with kill -9, the lock it left is taken over, saying so."""
    from mixtail import cli

    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "mixtail", "train", "smoke_cpu", f"--train.out_dir={run}",
                              "--train.epochs=20", "--train.max_steps_per_epoch=null"], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None and not (run / "metrics.jsonl").exists():
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended early; make it longer"
        with pytest.raises(SystemExit) as code:
            cli.main(["train", "smoke_cpu", f"--train.out_dir={run}", "--train.epochs=1", "--overwrite"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code.value.code == 2 and len(err) == 1, err
        assert err[0].startswith(f"mixtail train: error: run directory {run} is in use by another mixtail train "
                                 f"(pid {first.pid} on host "), err
        assert first.poll() is None, "the refused trainer must leave the first one alone"
    finally:
        first.kill()
        first.wait()
    train(_smoke(run, "--train.epochs=1"), overwrite=True)
    out = capsys.readouterr().out
    assert (f"run directory {run}: taking over the lock of a mixtail train that is no longer running (pid "
            f"{first.pid} on host ") in out, out
    assert not (run / ".mixtail-train.lock").exists()


def _class_tree(root: Path, counts: dict[str, int], test_per_class: int = 2) -> Path:
    """An image folder (train/<class>/, test/<class>/) of random 32 px PNGs, `counts[name]` training images."""
    from PIL import Image

    rng = np.random.default_rng(len(root.name))
    for split in ("train", "test"):
        for name, n in counts.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(n if split == "train" else test_per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    return root


def _folder_run(out: Path, root: Path, *overrides: str):
    return _smoke(out, "--data.dataset=folder", f"--data.root={root}", "--data.imbalance_ratio=1",
                  "--data.batch_size=4", "--data.eval_batch_size=8", *overrides)


def test_files_skipped_by_on_error_skip_are_named_and_listed_in_the_run_directory(tmp_path, capsys):
    """With data.on_error=skip the bad files are named (otherwise one image fewer would be the only sign)."""
    root = _class_tree(tmp_path / "data", {"ant": 6, "bee": 6})
    bad = [root / "train" / "ant" / "0.png", root / "train" / "bee" / "1.png", root / "test" / "bee" / "0.png"]
    for path in bad:
        path.write_bytes(b"")
    run = tmp_path / "run"
    train(_folder_run(run, root, "--train.epochs=1", "--data.on_error=skip", "--train.max_steps_per_epoch=1"))
    lines = [line for line in capsys.readouterr().out.splitlines() if "data.on_error=skip" in line]
    assert lines == [f"data.on_error=skip left out 3 bad file(s) (train 2, test 1): {bad[0]} (zero-byte file); "
                     f"{bad[1]} (zero-byte file); {bad[2]} (zero-byte file); all are listed in {run / 'skipped_files.txt'}"]
    assert (run / "skipped_files.txt").read_text().splitlines() == [
        f"train\t{bad[0]}\tzero-byte file", f"train\t{bad[1]}\tzero-byte file", f"test\t{bad[2]}\tzero-byte file"]


def test_resume_onto_other_classes_is_refused_naming_the_first_difference(tmp_path):
    """--resume with a data.root whose classes are renamed, reordered, counted differently or fewer must not run
    on (label 0 meaning another class) or end in `internal error: RuntimeError ... state_dict`: one line
    names the first difference; the same classes under another data.root resume."""
    first = {"ant": 6, "bee": 4, "cat": 3}
    run = tmp_path / "run"
    train(_folder_run(run, _class_tree(tmp_path / "a", first), "--train.epochs=1"))
    ckpt = run / "checkpoint.pt"
    cases = {
        "renamed": ({"ant": 6, "bee": 4, "cow": 3}, f"class 2 is 'cat' in {ckpt} but 'cow' in data.root="),
        "reordered": ({"bee": 6, "cat": 4, "dog": 3}, f"class 0 is 'ant' in {ckpt} but 'bee' in data.root="),
        "counts": ({"ant": 6, "bee": 5, "cat": 3}, f"class 1 'bee' has 4 training images in {ckpt} but 5 in "
                                                   f"data.root="),
        "fewer": ({"ant": 6, "bee": 4}, f"class 2 is 'cat' in {ckpt} but data.root=.* has only 2 classes"),
        "more": ({"ant": 6, "bee": 4, "cat": 3, "dog": 3}, f"class 3 is 'dog' in data.root=.* but {ckpt} has only "
                                                           f"3 classes"),
    }
    for name, (counts, message) in cases.items():
        root = _class_tree(tmp_path / name, counts)
        with pytest.raises(DataError, match="^--resume: " + message.replace("(", r"\(")) as err:
            train(_folder_run(run, root, "--train.epochs=2"), resume=True)
        assert "\n" not in str(err.value) and str(root) in str(err.value)
    # A checkpoint without class names (not one mixtail writes) is still compared by its counts.
    state = torch.load(ckpt, weights_only=False)
    del state["classes"]
    torch.save(state, ckpt)
    with pytest.raises(DataError, match="class 1 .bee. has 4 training images"):
        train(_folder_run(run, tmp_path / "counts", "--train.epochs=2"), resume=True)
    # The same classes elsewhere (a moved data.root) resume.
    (tmp_path / "a").rename(tmp_path / "moved")
    train(_folder_run(run, tmp_path / "moved", "--train.epochs=2"), resume=True)
    assert torch.load(ckpt, weights_only=False)["epoch"] == 2


def test_eval_on_other_classes_or_another_architecture_is_refused(tmp_path, capsys):
    """`mixtail eval CKPT` on a data.root whose test classes differ must not print numbers (rc 0) under the
    checkpoint's group labels, nor --model.arch other than the checkpoint's end in an internal error. Both are one
    line, exit 2, naming the first differing class or the key; the same classes elsewhere evaluate."""
    from mixtail import cli

    run = tmp_path / "run"
    classes = {"ant": 6, "bee": 4, "cat": 3}
    train(_folder_run(run, _class_tree(tmp_path / "a", classes), "--train.epochs=1"))
    ckpt = run / "checkpoint.pt"
    renamed = _class_tree(tmp_path / "renamed", {"ant": 6, "bee": 4, "cow": 3})
    capsys.readouterr()

    def eval_cli(*args):
        with pytest.raises(SystemExit) as code:
            cli.main(["eval", str(ckpt), *args])
        out, err = capsys.readouterr()
        return code.value.code, out, err.strip().splitlines()

    cases = [((f"--data.root={renamed}",), f"mixtail eval: error: class 2 is 'cat' in {ckpt} but 'cow' in "
                                          f"data.root={renamed} "),
             (("--model.arch=resnet14",), "mixtail eval: error: key 'model.arch': "),
             (("--model.head_dim=16",), "mixtail eval: error: key 'model.head_dim': ")]
    for args, start in cases:
        code, _, err = eval_cli(*args)
        assert code == 2 and len(err) == 1 and err[0].startswith(start), err
    (tmp_path / "a").rename(tmp_path / "moved")
    code, out, _ = eval_cli(f"--data.root={tmp_path / 'moved'}")
    assert code == 0 and "top-1 %" in out
