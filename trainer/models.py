"""The network: backbone + linear classifier + 2-layer MLP contrastive head (docs/method.md, "Network").

The backbones (CIFAR ResNets, torchvision and timm models) are trainer/backbones.py's.

    model = build_model(ModelConfig(arch="resnet32"), num_classes=100)
    logits, z = model(images)    # z: (B, 128), L2-normalized
"""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from mixtail.trainer.backbones import build_backbone




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
