"""Tests of trainer/checkpoint_eval.py (`mixtail eval`) with the files beside a checkpoint: a stage-2 router.pt is
used only with the checkpoint it was trained on, a damaged or mismatched one is named in one line and left out
(the checkpoint's own rows still print), one that asks to run code is refused; an override that changes the
checkpoint's architecture is refused, for every model key.

    python -m pytest tests/test_checkpoint_eval.py -q
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from helpers.checks import Payload
from mixtail import cli
from mixtail.errors import ConfigError
from mixtail.trainer.checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint
from mixtail.trainer.config import ModelConfig, config_to_dict, load_config

RUN = ["--model.experts=2", "--train.epochs=1", "--train.max_steps_per_epoch=2", "--router.epochs=1",
       "--router.batch_size=64"]


@pytest.fixture(scope="module")
def routed_run(tmp_path_factory) -> Path:
    """A finished K = 2 stage 1 with its stage-2 router.pt (a few steps on the demo data)."""
    from mixtail.trainer.router import train_router_stage
    from mixtail.trainer.train import train

    run = tmp_path_factory.mktemp("routed")
    cfg = load_config("smoke_cpu", [f"--train.out_dir={run}", *RUN])
    train(cfg)
    train_router_stage(cfg)
    return run


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns(".mixtail-train.lock"))
    return to


def _eval(capsys, ckpt: Path, *args) -> tuple[int, str, list[str]]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as code:
        cli.main(["eval", str(ckpt), *args])
    out, err = capsys.readouterr()
    return code.value.code, out, err.strip().splitlines()


def test_checkpoint_and_router_are_plain_data_and_the_router_names_its_checkpoint(routed_run, capsys):
    """Both files load with torch's weights-only unpickler; router.pt is checksummed like a checkpoint and
    records the sha256 of the stage-1 checkpoint it was trained on; eval uses it there."""
    from mixtail.trainer.checkpoint import read_checkpoint

    ckpt, router = routed_run / "checkpoint.pt", routed_run / "router.pt"
    torch.load(ckpt, weights_only=True)
    saved = torch.load(router, weights_only=True)
    assert verify_checkpoint(router)  # its checksum is there and matches
    assert saved["stage1_sha256"] == read_checkpoint(ckpt)[1]
    code, out, err = _eval(capsys, ckpt)
    assert code == 0 and "router (stops early)" in out and err == [], err


def test_a_stale_router_is_named_in_one_line_and_left_out(routed_run, tmp_path, capsys):
    """A router trained on another stage-1 checkpoint (an earlier epoch, before a resume or an --overwrite, or
    another run) is left out with one line saying it is stale; the checkpoint's own rows still print."""
    run = _copy(routed_run, tmp_path / "run")
    state = load_checkpoint(run / "checkpoint.pt")
    state["epoch_time"] += 1.0  # any other checkpoint: another sha256
    save_checkpoint(run / "checkpoint.pt", state)
    code, out, err = _eval(capsys, run / "checkpoint.pt")
    assert code == 0 and "ensemble top-1 %" in out and "router (stops early)" not in out
    assert len(err) == 1 and err[0].startswith(f"mixtail eval: router {run / 'router.pt'} left out: it is stale")


def _truncated(router: Path, sha: str) -> None:
    router.write_bytes(router.read_bytes()[:-100])


def _text(router: Path, sha: str) -> None:
    router.write_text("these are not the weights you are looking for\n")


def _other_experts(router: Path, sha: str) -> None:
    """A router for K = 3 (two hidden layers), bound to this very checkpoint: the shapes decide."""
    saved = load_checkpoint(router)
    saved["router"]["hidden.1.weight"] = saved["router"]["hidden.0.weight"].clone()
    saved["router"]["hidden.1.bias"] = saved["router"]["hidden.0.bias"].clone()
    save_checkpoint(router, saved)


def _huge_width(router: Path, sha: str) -> None:
    """router_config claims a hidden width of 10^12: refused from the shapes, nothing allocated."""
    saved = load_checkpoint(router)
    saved["router_config"]["hidden_dim"] = 10**12
    save_checkpoint(router, saved)


def _unbound(router: Path, sha: str) -> None:
    """A router.pt written before routers recorded their stage-1 checkpoint."""
    saved = load_checkpoint(router)
    del saved["stage1_sha256"]
    torch.save(saved, router)


@pytest.mark.parametrize("damage, why", [(_truncated, "is truncated or damaged at its end"),
                                         (_text, "is not a router"),
                                         (_other_experts, "does not fit"), (_huge_width, "does not fit"),
                                         (_unbound, "records no stage-1 checkpoint")])
def test_a_damaged_or_mismatched_router_is_named_and_left_out(routed_run, tmp_path, capsys, damage, why):
    """None may break the evaluation of a good checkpoint (EINVAL with no path, UnpicklingError, a
    RuntimeError in Router): one line names router.pt, and the router is left out."""
    from mixtail.trainer.checkpoint import read_checkpoint
    from mixtail.trainer.checkpoint_eval import load_router
    from mixtail.trainer.models import build_model

    run = _copy(routed_run, tmp_path / "run")
    ckpt, router = run / "checkpoint.pt", run / "router.pt"
    state, sha = read_checkpoint(ckpt)
    damage(router, sha)
    cfg = load_config("smoke_cpu", [f"--train.out_dir={run}", *RUN])
    model = build_model(cfg.model, len(state["class_counts"]))
    capsys.readouterr()
    assert load_router(ckpt, sha, cfg, model, len(state["class_counts"]), torch.device("cpu"), True) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mixtail eval: router {router} left out: ") and why in err[0], err
    code, out, err = _eval(capsys, ckpt)  # the whole command: the checkpoint's own rows, and that one line
    assert code == 0 and "ensemble top-1 %" in out and "router (stops early)" not in out
    assert len(err) == 1 and why in err[0], err


def test_a_router_that_asks_to_run_code_refuses_the_evaluation(routed_run, tmp_path, capsys):
    """router.pt is loaded weights-only: a payload in it never runs; eval exits 2 with one line naming it."""
    run = _copy(routed_run, tmp_path / "run")
    saved = load_checkpoint(run / "router.pt")
    marker = tmp_path / "ran"
    saved["router_config"]["threshold"] = Payload(marker)
    save_checkpoint(run / "router.pt", saved)
    code, out, err = _eval(capsys, run / "checkpoint.pt")
    assert not marker.exists()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"mixtail eval: error: router {run / 'router.pt'} "
                                                             f"is refused: it asks to construct Python objects")


# Another valid value for each model key: a new key without one here fails the test below, on purpose.
OTHER_VALUE = {"arch": "resnet14", "pretrained_path": "weights.pth", "head_dim": 64, "experts": 3,
               "expert_classifier": "cosine", "init": "fan_in"}


@pytest.mark.parametrize("key", [f.name for f in dataclasses.fields(ModelConfig)])
def test_every_model_override_is_refused(tmp_path, key):
    """`--model.experts=3` or `--model.expert_classifier=cosine` on a K = 2 checkpoint was an internal error
    (only arch and head_dim were checked, from a hand-written list): every model key is refused by name, before
    any data or model is built."""
    from mixtail.trainer.checkpoint_eval import evaluate_checkpoint

    # fan-in initialization is defined for the single network only, so its override is tried on a K = 1 one.
    cfg = load_config("smoke_cpu", [] if key == "init" else ["--model.experts=2"])
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"config": config_to_dict(cfg), "model": {}, "class_counts": [5, 3, 2], "epoch": 1})
    value = OTHER_VALUE[key]
    assert getattr(cfg.model, key) != value
    with pytest.raises(ConfigError, match=f"^key 'model.{key}': {path} holds a model with {key} "):
        evaluate_checkpoint(path, [f"--model.{key}={value}"])
