"""trainer/models.py and trainer/losses.py: network shapes, the head, and the logit-adjusted soft CE.

    python -m pytest tests/test_models.py -q
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixtail.trainer.config import ModelConfig
from mixtail.trainer.losses import log_class_prior, logit_adjusted_soft_ce
from mixtail.trainer.backbones import CifarResNet
from mixtail.trainer.models import build_model


def _params(module):
    return sum(p.numel() for p in module.parameters())


def test_fan_in_init_is_ldam_and_cmo_weights_init():
    """model.init=fan_in: Kaiming normal with fan-in on every convolution and the classifier (std √(2/fan_in)),
    as LDAM-DRW's and CMO's _weights_init; fan_out keeps fan-out convolutions and torch's default classifier."""
    torch.manual_seed(0)
    net_in = build_model(ModelConfig(arch="resnet8", init="fan_in"), num_classes=10)
    net_out = build_model(ModelConfig(arch="resnet8"), num_classes=10)
    conv_in, conv_out = net_in.backbone.conv1.weight.detach(), net_out.backbone.conv1.weight.detach()  # (16, 3, 3, 3)
    assert float(conv_in.std()) == pytest.approx(math.sqrt(2 / 27), rel=0.15)
    assert float(conv_out.std()) == pytest.approx(math.sqrt(2 / 144), rel=0.15)
    stage = [m.weight.detach() for m in net_in.backbone.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels == 32]
    assert all(float(w.std()) == pytest.approx(math.sqrt(2 / (32 * 9)), rel=0.15) for w in stage)
    assert float(net_in.classifier.weight.detach().std()) == pytest.approx(math.sqrt(2 / 64), rel=0.15)
    assert float(net_out.classifier.weight.detach().abs().max()) <= 1 / 8  # torch's U(±1/√64)


def test_fan_in_init_names_the_key_where_it_does_not_apply():
    from mixtail.errors import ConfigError

    with pytest.raises(ConfigError, match="model.init.*resnet50"):
        build_model(ModelConfig(arch="resnet50", init="fan_in"), num_classes=10)
    with pytest.raises(ConfigError, match="model.init"):
        ModelConfig(init="xavier")
    with pytest.raises(ConfigError, match="model.init"):
        ModelConfig(init="fan_in", experts=3)


def test_resnet32_is_the_cifar_resnet():
    net = CifarResNet(32)
    # He et al. report 0.46M parameters for ResNet-32 on CIFAR (option A shortcuts have none).
    assert 0.45e6 < _params(net) < 0.48e6
    blocks = [m for m in net.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == 15  # 3 stages of 5
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 64)


@pytest.mark.parametrize("depth", [2, 7, 33])
def test_cifar_resnet_rejects_other_depths(depth):
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(depth)


def test_model_outputs_logits_and_unit_embeddings():
    model = build_model(ModelConfig(arch="resnet8", head_dim=128), num_classes=10).eval()
    logits, z = model(torch.randn(5, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    assert logits.shape == (5, 10) and z.shape == (5, 128)
    assert torch.allclose(z.norm(dim=1), torch.ones(5), atol=1e-6)
    # docs/method.md, "Network": Linear(d, d) -> ReLU -> Linear(d, 128) on the pooled feature.
    first, _, last = model.head
    assert (first.in_features, first.out_features, last.out_features) == (64, 64, 128)


def test_torchvision_resnet50_backbone():
    model = build_model(ModelConfig(arch="resnet50"), num_classes=7).eval()
    assert model.classifier.in_features == 2048 and model.head[0].out_features == 2048
    with torch.no_grad():
        logits, z = model(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 7) and z.shape == (1, 128)


def test_unknown_arch_names_the_key():
    with pytest.raises(ValueError, match="model.arch='resnet-9000'"):
        build_model(ModelConfig(arch="resnet-9000"), num_classes=3)


def test_logit_adjusted_soft_ce_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g)
    y_f, y_b = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([3, 3, 1, 0, 0, 2])
    lam = torch.rand(6, generator=g)
    targets = lam[:, None] * F.one_hot(y_f, 4) + (1 - lam[:, None]) * F.one_hot(y_b, 4)
    counts = np.array([100, 30, 10, 1])
    prior = log_class_prior(counts)
    assert torch.allclose(prior, torch.log(torch.tensor(counts / counts.sum(), dtype=torch.float32)))
    got = logit_adjusted_soft_ce(logits, targets, prior)
    want = 0.0
    for i in range(6):
        adjusted = logits[i] + torch.log(torch.tensor(counts / counts.sum(), dtype=torch.float32))
        log_p = adjusted - torch.logsumexp(adjusted, 0)
        want -= float((targets[i] * log_p).sum())
    assert got.item() == pytest.approx(want / 6, rel=1e-6)
    # Without the prior it is plain soft cross-entropy; with one-hot targets, F.cross_entropy.
    hard = F.one_hot(y_f, 4).float()
    assert logit_adjusted_soft_ce(logits, hard, None).item() == pytest.approx(F.cross_entropy(logits, y_f).item())
    # The adjustment favours rare classes in training, so a head-class target costs less than a tail one.
    flat = torch.zeros(1, 4)
    head = logit_adjusted_soft_ce(flat, F.one_hot(torch.tensor([0]), 4).float(), prior)
    tail = logit_adjusted_soft_ce(flat, F.one_hot(torch.tensor([3]), 4).float(), prior)
    assert head.item() < tail.item() and math.isfinite(tail.item())
