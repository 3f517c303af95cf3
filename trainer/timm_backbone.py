"""Backbones from timm (`model.arch: timm/<name>`; the optional extra: pip install 'mixtail[timm]').

timm builds the network with its classifier removed (`num_classes=0`), so calling it gives the pooled
feature, and trainer/models.py puts mixtail's classifier and MLP head on that feature as for its own
ResNets. Weights are random unless `model.pretrained_path` names a local file (a state_dict saved with
torch.save or a .safetensors file, as timm writes them); nothing is ever downloaded. timm loads that file
itself, so its per-model conversions apply and a classifier in the file is dropped.

    net, dim = timm_backbone("resnet18", pretrained_path="weights/resnet18.pth")
    feature = net(images)     # (B, dim)

Models with a fixed input size (most ViTs) need data.image_size to match theirs.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from mixtail.errors import ConfigError


def timm_backbone(name: str, pretrained_path: str = "") -> tuple[nn.Module, int]:
    """(backbone, pooled feature dim) of timm model `name`, with the weights of `pretrained_path` if given."""
    try:
        import timm
    except ImportError as err:
        raise ConfigError(f"key 'model.arch': timm/{name} needs timm: pip install 'mixtail[timm]' ({err})") from None
    if not timm.is_model(name):
        raise ConfigError(f"key 'model.arch': timm has no model {name!r} (timm.list_models() lists them)")
    kwargs = {}
    if pretrained_path:
        path = Path(pretrained_path)
        if not path.is_file():
            raise ConfigError(f"key 'model.pretrained_path': no file {path}")
        # timm's own loader with a local file in place of its hub address: no download is attempted.
        kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    try:
        net = timm.create_model(name, num_classes=0, **kwargs)
    except Exception as err:  # noqa: BLE001 - a bad file fails in many ways (unpickling, shapes, keys)
        if not pretrained_path:
            raise
        first = next(iter(str(err).strip().splitlines()), type(err).__name__)
        raise ConfigError(f"key 'model.pretrained_path': {pretrained_path} does not load into timm/{name}: "
                          f"{first}") from None
    # With num_classes=0 the forward ends in the pre-logits features: head_hidden_size where the model has a
    # hidden layer before its classifier (MambaOut, some ConvNeXts), num_features otherwise.
    dim = getattr(net, "head_hidden_size", None) or net.num_features
    return net, int(dim)
