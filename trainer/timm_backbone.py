"""Backbones from timm (`model.arch: timm/<name>`; the optional extra: pip install 'mixtail[timm]').

timm builds the network with its classifier removed (`num_classes=0`), so calling it gives the pooled
feature, and trainer/models.py puts mixtail's classifier and MLP head on that feature as for its own
ResNets. Weights are random unless `model.pretrained_path` names a local file (a state_dict saved with
torch.save or a .safetensors file, as timm writes them); nothing is ever downloaded. mixtail reads that file
itself, with torch's weights-only unpickler (a file that asks to construct Python objects is refused, and
nothing in it runs), and hands the state_dict to timm, so its per-model conversions apply and a classifier in
the file is dropped.

    net, dim = timm_backbone("resnet18", pretrained_path="weights/resnet18.pth")
    feature = net(images)     # (B, dim)

Models with a fixed input size (most ViTs) need data.image_size to match theirs.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from mixtail.errors import ConfigError, MixtailError


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
        # timm's own loader with our state_dict in place of its hub address: no download is attempted, and the
        # file is read as plain data whatever timm's version would do with it.
        kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(state_dict=_read_state_dict(path)))
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


def _read_state_dict(path: Path) -> dict:
    """The state_dict in a weights file as timm's own load_state_dict picks it: a .safetensors file as is; a
    torch.save file's EMA weights where present, else its 'state_dict' or 'model' entry, else the file itself;
    DataParallel's `module.` prefixes removed."""
    from mixtail.trainer.checkpoint import read_weights

    what = "key 'model.pretrained_path': file"
    if path.suffix == ".safetensors":  # a format of tensors alone: nothing in it can run
        import safetensors.torch

        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except Exception as err:  # noqa: BLE001 - a damaged file fails in several ways
            raise ConfigError(f"{what} {path} could not be read as safetensors ({type(err).__name__})") from None
    try:
        state = read_weights(path, "weights file")
    except MixtailError as err:
        raise ConfigError(f"key 'model.pretrained_path': {err}") from None
    if isinstance(state, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise ConfigError(f"{what} {path} holds a {type(state).__name__}, not a state_dict")
    return {(k[7:] if isinstance(k, str) and k.startswith("module.") else k): v for k, v in state.items()}
