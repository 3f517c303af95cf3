"""The network: backbone + linear classifier + 2-layer MLP contrastive head (docs/method.md, "Network").

- `resnet{8,14,20,32,44,56,110}`: the CIFAR ResNets of He et al. (3 stages of (depth−2)/6 BasicBlocks,
  16/32/64 channels, parameter-free "option A" shortcuts), as used by LDAM, CMO and SMC for 32 px data.
- any torchvision classification model with an `fc` layer (`resnet50`, `resnext50_32x4d`, ...),
  randomly initialized, its `fc` removed.
- `timm/<name>`: any timm model, its classifier removed, randomly initialized or loaded from
  model.pretrained_path (trainer/timm_backbone.py; the `timm` extra).

    model = build_model(ModelConfig(arch="resnet32"), num_classes=100)
    logits, z = model(images)    # z: (B, 128), L2-normalized
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from mixtail.errors import ConfigError


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # Option A: subsample and zero-pad channels, no parameters (He et al. 2016, CIFAR experiments).
        self.pad = planes - in_planes if (stride != 1 or in_planes != planes) else None
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.pad is not None:
            shortcut = x[:, :, :: self.stride, :: self.stride]
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 inputs; forward returns the pooled 64-d feature."""

    def __init__(self, depth: int, init: str = "fan_out"):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(_BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.out_dim = 64
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode=init, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


CIFAR_DEPTHS = (8, 14, 20, 32, 44, 56, 110)  # resnet50 and friends are torchvision's ImageNet models


def build_backbone(arch: str, pretrained_path: str = "", init: str = "fan_out") -> tuple[nn.Module, int]:
    """(backbone, feature dim) for an arch name; pretrained_path: a local weights file (timm backbones);
    init (model.init): the Kaiming mode of a CIFAR ResNet's convolutions (other backbones keep their own)."""
    match = re.fullmatch(r"resnet(\d+)", arch)
    cifar = bool(match) and int(match.group(1)) in CIFAR_DEPTHS
    if init != "fan_out" and not cifar:
        raise ConfigError(f"key 'model.init': {init} is for the CIFAR ResNets (resnet8 .. resnet110); "
                          f"model.arch={arch[:60]!r} keeps its own initialization")
    if arch.startswith("timm/"):
        from mixtail.trainer.timm_backbone import timm_backbone

        return timm_backbone(arch.removeprefix("timm/"), pretrained_path)
    if pretrained_path:
        raise ConfigError(f"key 'model.pretrained_path': read for timm/<name> backbones only, not "
                          f"model.arch={arch!r}")
    if cifar:
        net = CifarResNet(int(match.group(1)), init)
        return net, net.out_dim
    import torchvision

    try:
        net = torchvision.models.get_model(arch, weights=None)
    except ValueError:
        raise ValueError(f"model.arch={arch!r} is neither a CIFAR ResNet (resnet8, 14, 20, 32, 44, 56, 110) "
                         f"nor a torchvision model name") from None
    if not isinstance(getattr(net, "fc", None), nn.Linear):
        raise ValueError(f"model.arch={arch!r}: only torchvision models with an `fc` classifier are supported")
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


class SMCNet(nn.Module):
    """Backbone → (classifier logits, L2-normalized contrastive embedding)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, head_dim: int = 128):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(feature_dim, num_classes)
        # docs/method.md, "Network": Linear(d, d) -> ReLU -> Linear(d, 128); the hidden size is the feature size.
        self.head = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(inplace=True),
                                  nn.Linear(feature_dim, head_dim))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.backbone(x)
        h = self.head(feat)
        # The norm in fp32, the embedding back in the head's dtype: under bf16 autocast the fused SMC kernel
        # then reads bf16 (half the traffic, tensor cores) and accumulates in fp32 (kernels/smc_loss.py).
        return self.classifier(feat), F.normalize(h.float(), dim=1).to(h.dtype)


def build_model(cfg, num_classes: int) -> SMCNet:
    """The network of a ModelConfig: backbone, linear classifier and MLP head, randomly initialized (seed
    torch first). Calling it gives (logits (B, num_classes), z (B, head_dim) L2-normalized).

    >>> import torch, mixtail
    >>> model = mixtail.build_model(mixtail.ModelConfig(arch="resnet8"), num_classes=10)
    >>> logits, z = model(torch.randn(4, 3, 32, 32))
    >>> logits.shape, z.shape, model.features(torch.randn(4, 3, 32, 32)).shape
    (torch.Size([4, 10]), torch.Size([4, 128]), torch.Size([4, 64]))
    """
    if cfg.experts > 1:  # RIDE's multi-expert network; K = 1 stays this network, unchanged
        from mixtail.trainer.experts import build_experts_model

        return build_experts_model(cfg, num_classes)
    init = getattr(cfg, "init", "fan_out")
    backbone, dim = build_backbone(cfg.arch, cfg.pretrained_path, init)
    model = SMCNet(backbone, dim, num_classes, cfg.head_dim)
    if init == "fan_in":  # LDAM-DRW's and CMO's _weights_init also draws the classifier (its bias keeps torch's)
        nn.init.kaiming_normal_(model.classifier.weight)
    return model
