"""trainer/timm_backbone.py: `model.arch: timm/<name>` builds through timm with mixtail's classifier and head,
loads model.pretrained_path, names the key on every bad input, and a tiny timm model trains on the CPU.

    python -m pytest tests/test_timm_backbone.py -q      # skipped without timm: pip install -e '.[timm]'
"""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import torch

from mixtail.errors import ConfigError
from mixtail.trainer.config import ModelConfig, load_config
from mixtail.trainer.models import build_model

try:
    import timm
except ImportError:
    timm = None

needs_timm = pytest.mark.skipif(timm is None, reason="timm is not installed (pip install -e '.[timm]')")
TINY = "test_resnet"  # timm's own test model: 0.37M parameters, 96-d pooled feature


@needs_timm
def test_timm_backbone_gets_mixtails_classifier_and_head():
    model = build_model(ModelConfig(arch=f"timm/{TINY}", head_dim=32), num_classes=7).eval()
    reference = timm.create_model(TINY, num_classes=0)
    dim = reference.num_features
    assert type(model.backbone) is type(reference)
    assert model.classifier.in_features == dim and model.classifier.out_features == 7
    first, _, last = model.head  # docs/method.md, "Network": Linear(d, d) -> ReLU -> Linear(d, head_dim), pooled
    assert (first.in_features, first.out_features, last.out_features) == (dim, dim, 32)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, z = model(x)
        assert model.features(x).shape == (3, dim)
    assert logits.shape == (3, 7) and z.shape == (3, 32)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))


@needs_timm
def test_pre_logits_width_is_the_feature_dim():
    """MambaOut has a hidden layer before its classifier: the feature is head_hidden_size wide, not num_features."""
    net = timm.create_model("test_mambaout", num_classes=0)
    assert net.head_hidden_size != net.num_features
    model = build_model(ModelConfig(arch="timm/test_mambaout"), num_classes=3).eval()
    with torch.no_grad():
        assert model.features(torch.randn(2, 3, 32, 32)).shape == (2, net.head_hidden_size)
    assert model.classifier.in_features == net.head_hidden_size


@needs_timm
@pytest.mark.parametrize("with_classifier", [True, False])
def test_pretrained_path_loads_a_saved_state_dict(tmp_path, with_classifier):
    torch.manual_seed(1)
    source = timm.create_model(TINY, num_classes=1000 if with_classifier else 0)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(2)
    model = build_model(ModelConfig(arch=f"timm/{TINY}", pretrained_path=str(path)), num_classes=5)
    loaded, saved = model.backbone.state_dict(), source.state_dict()
    assert set(saved) - set(loaded) == ({"fc.weight", "fc.bias"} if with_classifier else set())
    for key, value in loaded.items():
        assert torch.equal(value, saved[key]), key
    torch.manual_seed(2)
    fresh = build_model(ModelConfig(arch=f"timm/{TINY}"), num_classes=5).backbone.state_dict()
    assert not torch.equal(fresh["conv1.0.weight"], saved["conv1.0.weight"])  # without the file: random weights


@needs_timm
def test_bad_inputs_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="key 'model.arch': timm has no model 'no_such_net'"):
        build_model(ModelConfig(arch="timm/no_such_net"), num_classes=3)
    with pytest.raises(ConfigError, match="key 'model.pretrained_path': no file .*missing.pth"):
        build_model(ModelConfig(arch=f"timm/{TINY}", pretrained_path=str(tmp_path / "missing.pth")), num_classes=3)
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), other)
    with pytest.raises(ConfigError, match=f"key 'model.pretrained_path': .*other.pth does not load into timm/{TINY}"):
        build_model(ModelConfig(arch=f"timm/{TINY}", pretrained_path=str(other)), num_classes=3)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="key 'model.pretrained_path': .*junk.pth could not be read"):
        build_model(ModelConfig(arch=f"timm/{TINY}", pretrained_path=str(junk)), num_classes=3)


class _Payload:
    """Unpickling this creates `marker`: proof that loading a file ran code from it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@needs_timm
def test_a_payload_weights_file_never_runs(tmp_path, capsys):
    """model.pretrained_path is read by mixtail with the weights-only unpickler, whatever timm's version would
    do: a file whose state asks to construct an object is refused in one line, exit 2, and nothing in it runs."""
    from mixtail import cli

    marker, path = tmp_path / "ran", tmp_path / "weights.pth"
    state = timm.create_model(TINY, num_classes=0).state_dict()
    torch.save({"state_dict": state, "args": _Payload(marker)}, path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as code:
        cli.main(["train", "smoke_cpu", f"--model.arch=timm/{TINY}", f"--model.pretrained_path={path}",
                  f"--train.out_dir={tmp_path / 'run'}", "--train.epochs=1", "--train.max_steps_per_epoch=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert not marker.exists()
    assert code.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"mixtail train: error: key 'model.pretrained_path': weights file {path} is refused: "
                             f"it asks to construct Python objects"), err


def test_pretrained_path_is_for_timm_only(tmp_path):
    with pytest.raises(ConfigError, match="key 'model.pretrained_path': read for timm/<name> backbones only"):
        build_model(ModelConfig(arch="resnet8", pretrained_path=str(tmp_path / "w.pth")), num_classes=3)


def test_without_timm_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(ConfigError, match=r"timm/test_resnet needs timm: pip install 'mixtail\[timm\]'"):
        build_model(ModelConfig(arch="timm/test_resnet"), num_classes=3)


@needs_timm
def test_a_tiny_timm_model_learns_a_batch_through_the_training_step():
    """The trainer's own step (channels_last, logit-adjusted CE + SMC, SGD) on one demo batch: the loss falls."""
    from mixtail.pipelines.loader import build_loader
    from mixtail.trainer.train import build_training

    cfg = load_config("smoke_cpu", [f"--model.arch=timm/{TINY}", "--train.precision=fp32", "--mix.start_epoch=0",
                                    "--mix.mix_prob=1.0"])
    loader = build_loader(cfg.data, cfg.aug, cfg.mix, split="train", device="cpu", seed=0, num_epochs=2)
    batch = copy.deepcopy(next(iter(loader)))
    loader.close()
    torch.manual_seed(0)
    run = build_training(cfg, loader.num_classes, loader.class_counts, torch.device("cpu"))
    losses = [float(run.step(batch, 0.05)[0]) for _ in range(12)]
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.8 * losses[0], losses


@needs_timm
def test_train_runs_with_a_timm_backbone_and_its_checkpoint_evaluates(tmp_path):
    from mixtail.trainer.checkpoint_eval import evaluate_checkpoint
    from mixtail.trainer.train import train

    torch.manual_seed(0)
    source = tmp_path / "start.pth"
    torch.save(timm.create_model(TINY).state_dict(), source)
    cfg = load_config("smoke_cpu", [f"--model.arch=timm/{TINY}", f"--model.pretrained_path={source}",
                                    f"--train.out_dir={tmp_path / 'run'}", "--train.epochs=1"])
    results = train(cfg)
    saved = json.loads((tmp_path / "run" / "final_eval.json").read_text())
    assert saved["all"] == pytest.approx(results["all"])
    again = evaluate_checkpoint(str(tmp_path / "run" / "checkpoint.pt"), [])
    assert again["all"] == pytest.approx(results["all"])
