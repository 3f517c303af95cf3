"""Typed run configuration, loaded strictly from YAML.

Every knob of a run lives in one frozen dataclass per concern, nested in `RunConfig`. Defaults live only
here (they are the paper's CIFAR-LT recipe); YAML files in `configs/` hold deltas. Loading is strict:
duplicate keys, unknown keys and wrongly typed values are errors that name the key and the file, and
dotted command-line overrides (`--optim.lr=0.05`) go through the same checks.

    from mixtail.trainer.config import load_config
    cfg = load_config("configs/cifar100_lt_r100.yaml", ["--optim.lr=0.05"])
    print(dump_config(cfg))
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from mixtail.errors import ConfigError, quote
from mixtail.pipelines.config import (CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, AugConfig, DataConfig,
                                      MixConfig, need, normalization)

__all__ = ["ConfigError", "RunConfig", "DataConfig", "AugConfig", "MixConfig", "ModelConfig", "LossConfig",
           "OptimConfig", "TrainConfig", "RouterConfig", "load_config", "apply_overrides", "config_from_dict",
           "config_to_dict", "dump_config", "config_path", "validate", "normalization", "CIFAR_MEAN", "CIFAR_STD", "IMAGENET_MEAN",
           "IMAGENET_STD"]

# --------------------------------------------------------------------------------------------------
# The dataclasses (data, aug and mix live with the code that reads them, in pipelines/config.py)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The network (trainer/models.py): the backbone (a CIFAR ResNet, a torchvision model, or timm/<name> with
    an optional local weights file) under mixtail's classifier and MLP head of width head_dim.

    >>> import mixtail
    >>> model = mixtail.ModelConfig(arch="resnet50")
    >>> model.arch, model.head_dim
    ('resnet50', 128)
    """

    # resnet{8,14,20,32,44,56,110} for 32 px, a torchvision model name, or timm/<name> (the `timm` extra)
    arch: str = "resnet32"
    pretrained_path: str = ""  # timm/<name>: a local weights file to start from; "" keeps random weights
    head_dim: int = 128  # output width of the contrastive MLP head (the paper: 128)
    # RIDE's multiple experts (trainer/experts.py): K > 1 shares the stem and first stage and gives
    # each expert its own later stages, classifier and MLP head; 1 is the single network of trainer/models.py.
    experts: int = 1
    # The experts' classifiers (K > 1 only): a linear layer as the single network's, or RIDE's cosine
    # classifier 30·cos(feature, w_c), whose logits are bounded (docs/experts.md, "Classifier").
    expert_classifier: Literal["linear", "cosine"] = "linear"
    # Initialization of a CIFAR ResNet's convolutions and the classifier. fan_out: Kaiming normal with fan-out
    # on the convolutions, PyTorch's default for the classifier. fan_in: Kaiming normal with fan-in on every
    # convolution and the classifier (LDAM-DRW's and CMO's resnet_cifar.py, _weights_init).
    init: Literal["fan_out", "fan_in"] = "fan_out"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        need(self.head_dim > 0, "model.head_dim", f"must be positive, got {self.head_dim}")
        need(self.experts >= 1, "model.experts", f"must be >= 1, got {self.experts}")
        need(self.init in ("fan_out", "fan_in"), "model.init", f"must be fan_out or fan_in, got {str(self.init)[:40]!r}")
        need(self.init == "fan_out" or self.experts == 1, "model.init",
             "fan_in is implemented for the single network (model.experts 1)")


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """The objective (trainer/losses.py, kernels/): logit-adjusted soft cross-entropy plus η times the SMC loss,
    and RIDE's diversity term when there are several experts."""

    eta: float = 0.1  # η of L = L_CE + η·L_SMC (the paper's Eq. 6)
    tau: float = 0.1  # temperature τ of the SMC loss (the paper's Eq. 4)
    # How the three positive sets are weighted (Table 5): weighted by the anchor's λ (the paper), average
    # (1/3 each), or assign_larger (SupCon on the label of each image's larger component).
    weighting: Literal["weighted", "average", "assign_larger"] = "weighted"
    impl: Literal["auto", "reference", "triton"] = "auto"  # triton on a CPU needs TRITON_INTERPRET=1
    logit_adjust: bool = True  # add the log prior to the logits in the cross-entropy (the paper's Eq. 5)
    # The prior the logits are adjusted by (docs/method.md, "Logit adjustment and the mixed prior"): `dataset`
    # is log P_Y, the paper's; `mixed` is log π, the marginal of the soft labels the network sees under mixing
    # (losses.mixed_prior).
    prior: Literal["dataset", "mixed"] = "dataset"
    # RIDE's diversity term (model.experts > 1; trainer/experts.py), its CIFAR config's values: the loss
    # subtracts diversity_weight · T̄² · Σ_k KL(ensemble ‖ expert k) (RIDE's additional_diversity_factor −0.45),
    # at temperature diversity_temperature; from epoch diversity_reweight_epoch (0-based; null: never) the
    # temperature is reweighted per class with diversity_reweight_factor (RIDE's reweight_epoch 160, 0.05).
    diversity_weight: float = 0.45
    diversity_temperature: float = 1.0  # the diversity term's temperature T (RIDE's)
    diversity_reweight_epoch: int | None = 160  # first epoch (0-based) of per-class temperatures; null: never
    diversity_reweight_factor: float = 0.05  # f of the per-class temperatures T·w_k (RIDE's reweight_factor)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        need(self.diversity_weight >= 0, "loss.diversity_weight", f"must be >= 0 (it is subtracted: RIDE's "
             f"additional_diversity_factor -0.45 is diversity_weight 0.45), got {self.diversity_weight}")
        need(self.diversity_weight < 1, "loss.diversity_weight", f"must be < 1 (from 1 on, CE minus the diversity "
             f"term is no longer convex in an expert's logits), got {self.diversity_weight}")
        need(self.diversity_temperature > 0, "loss.diversity_temperature",
             f"must be positive, got {self.diversity_temperature}")
        need(0 <= self.diversity_reweight_factor < 1, "loss.diversity_reweight_factor",
             f"must be in [0, 1), got {self.diversity_reweight_factor}")
        need(self.diversity_reweight_epoch is None or self.diversity_reweight_epoch >= 0,
             "loss.diversity_reweight_epoch", f"must be >= 0 or null, got {self.diversity_reweight_epoch}")
        need(self.tau > 0, "loss.tau", f"must be positive, got {self.tau}")
        need(self.eta >= 0, "loss.eta", f"must be >= 0, got {self.eta}")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """SGD with momentum and a step schedule after a linear warmup (docs/method.md, "Schedules")."""

    lr: float = 0.1  # for the global batch data.batch_size
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 2e-4  # L2 weight decay, on every parameter
    nesterov: bool = False  # Nesterov momentum
    warmup_epochs: float = 5.0  # linear warmup, per step
    # per_step: lr·(s + 1)/(warmup_epochs·steps per epoch) at step s; per_epoch: lr·(e + 1)/warmup_epochs for
    # the whole of epoch e (LDAM-DRW's and CMO's adjust_learning_rate, set once at the start of each epoch).
    warmup: Literal["per_step", "per_epoch"] = "per_step"
    milestones: tuple[int, ...] = (160, 180)  # epochs where the lr factor changes
    lr_factors: tuple[float, ...] = (0.01, 0.0001)  # lr = base·factor from each milestone on

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        need(self.lr > 0, "optim.lr", f"must be positive, got {self.lr}")
        need(self.warmup_epochs >= 0, "optim.warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        need(self.warmup in ("per_step", "per_epoch"), "optim.warmup",
             f"must be per_step or per_epoch, got {str(self.warmup)[:40]!r}")
        need(len(self.milestones) == len(self.lr_factors), "optim.lr_factors",
             f"needs one factor per milestone: {len(self.milestones)} milestones, {len(self.lr_factors)} factors")
        need(list(self.milestones) == sorted(self.milestones), "optim.milestones",
             f"must be increasing, got {list(self.milestones)}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The loop: length, seed, run directory, device and precision, checkpoints, logging and stopping."""

    epochs: int = 200  # E: the run's length in epochs (the mixing window and lr milestones count in them)
    eval_every_epochs: int = 10  # evaluate on the test set every this many epochs, and after the last
    seed: int = 0  # seeds the model's initialization, the sampling, the augmentation and the mixing
    out_dir: str = "runs/cifar100_lt_r100"  # the run directory: config.yaml, metrics.jsonl, checkpoints
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda where available, else cpu
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast where the GPU has it
    channels_last: bool = True  # the model and images in channels-last memory format
    compile: bool = False  # torch.compile the model (cuda_graphs then defaults to off)
    # The whole step as CUDA graphs (trainer/step.py); null: on where CUDA is and the run is one process.
    cuda_graphs: bool | None = None
    # Under cuda_graphs, capture the torch loader's on-device work (gather, augmentation, paste) in the same
    # graph (pipelines/batch.py PlanRender); false makes each batch before the graphed step.
    graph_loader: bool = True
    accumulate_steps: int = 1  # batches whose gradients are summed per SGD step (DDP: all-reduced once, no_sync)
    sync_batchnorm: bool = False  # BatchNorm statistics over all ranks (CUDA only: SyncBatchNorm has no CPU kernel)
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss stops the run, or its step is skipped
    tensorboard: bool = False  # also write loss parts, lr, images/s and evaluations as TensorBoard events
    checkpoint_every_steps: int = 0  # 0: checkpoint at the end of every epoch only
    keep_checkpoints: int = 2  # checkpoint.pt plus this many - 1 older ones to fall back on
    max_steps_per_epoch: int | None = None  # truncate epochs (smoke tests)
    log_every_steps: int = 10  # steps between progress updates (loss, lr, images/s) and non-finite checks
    # Signals that stop the run cleanly: the current step is finished and checkpointed, then the process exits
    # 128 + the signal's number (trainer/stop.py; under DDP at the next log step, agreed by all ranks).
    stop_signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        need(self.epochs > 0, "train.epochs", f"must be positive, got {self.epochs}")
        need(self.eval_every_epochs > 0, "train.eval_every_epochs", f"must be positive, got {self.eval_every_epochs}")
        need(self.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", "must be >= 0")
        need(self.accumulate_steps >= 1, "train.accumulate_steps", f"must be >= 1, got {self.accumulate_steps}")
        need(not (self.sync_batchnorm and self.device == "cpu"), "train.sync_batchnorm",
             "needs CUDA: torch's SyncBatchNorm has no CPU kernel")
        need(self.keep_checkpoints >= 1, "train.keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        need(self.max_steps_per_epoch is None or self.max_steps_per_epoch > 0, "train.max_steps_per_epoch",
             "must be positive or null")
        need(self.log_every_steps > 0, "train.log_every_steps", "must be positive")
        from mixtail.trainer.stop import parse_signals  # ConfigError naming train.stop_signals

        parse_signals(self.stop_signals)


# Where stage 2 writes in a run directory: the router (checkpoint format) and its evaluation.
ROUTER_FILE = "router.pt"
ROUTER_EVAL = "router_eval.json"


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """Stage 2 of RIDE (`mixtail train CONFIG --stage router`, trainer/router.py): the expert-assignment router
    on the frozen stage-1 experts. Defaults are RIDE's CIFAR-100 EA config (5 epochs, batches of 512, lr 0.01
    cosine, positives weighted 100, the top 30 logits, a hidden layer of 16); none changes stage 1."""

    epochs: int = 5  # the router's training epochs
    lr: float = 0.01  # its initial learning rate, with a cosine decay
    batch_size: int = 512  # its batch size
    pos_weight: float = 100.0  # BCE weight of "the next expert helps" (rare: most samples are right early)
    top_k: int = 30  # the largest running-mean logits the router reads (capped at the number of classes)
    hidden_dim: int = 16  # width of the router's hidden layer on each expert's pooled feature
    threshold: float = 0.5  # consult the next expert while sigmoid(score) > threshold

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for key in ("epochs", "batch_size", "top_k", "hidden_dim"):
            need(getattr(self, key) > 0, f"router.{key}", f"must be positive, got {getattr(self, key)}")
        need(self.lr > 0, "router.lr", f"must be positive, got {self.lr}")
        need(self.pos_weight > 0, "router.pos_weight", f"must be positive, got {self.pos_weight}")
        need(0 < self.threshold < 1, "router.threshold", f"must be in (0, 1), got {self.threshold}")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """A whole run: one frozen section per concern. Defaults are the paper's CIFAR-LT recipe; build one with
    `load_config` (YAML deltas and overrides, strictly checked) or directly, section by section.

    >>> import dataclasses, mixtail
    >>> cfg = mixtail.RunConfig(model=mixtail.ModelConfig(arch="resnet8"))
    >>> cfg.model.arch, cfg.data.dataset, cfg.loss.eta
    ('resnet8', 'cifar100', 0.1)
    >>> dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=256)).data.batch_size
    256
    """

    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    router: RouterConfig = field(default_factory=RouterConfig)


# --------------------------------------------------------------------------------------------------
# Strict YAML
# --------------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"duplicate key {quote(key)} (line {key_node.start_mark.line + 1}, "
                    f"first on line {seen[key]})"
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


# PyYAML follows YAML 1.1, where a float needs a dot: `5e-4` would load as the *string* '5e-4' and fail
# the float check. YAML 1.2 (and everyone writing a weight decay) reads it as a number.
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What PyYAML found wrong and where, in one line; never the file's text (its message quotes the lines)."""
    problem = getattr(err, "problem", None) or getattr(err, "context", None) or type(err).__name__
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{problem}{where}"


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:  # the offset, never the bytes: the file may be anything
        raise ConfigError(f"{path}: not UTF-8 text: byte offset {err.start} is not valid UTF-8") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; return it in the field's own type (tuples, floats)."""

    def fail(expected: str):
        # Quoted through a short prefix: the value may be a YAML alias bomb (10^8 shared references).
        raise ConfigError(f"{source}: key '{key}': expected {expected}, got {type(value).__name__} {quote(value)}")

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:  # a section whose keys are all commented out
            value = {}
        if not isinstance(value, dict):
            fail(f"a mapping (section {tp.__name__})")
        return _checked(tp, value, key, source)
    if origin is Literal:
        # By type first: `in` compares a list with each choice, and equality walks it.
        if not isinstance(value, (str, int, float, bool)) or value not in typing.get_args(tp):
            choices = " | ".join(repr(a) for a in typing.get_args(tp))
            raise ConfigError(f"{source}: key '{key}': expected one of {choices}, got {quote(value)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            fail(" | ".join(_type_name(a) for a in args))
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as err:
                errors.append(str(err))
        fail(" or ".join(_type_name(a) for a in args if a is not type(None)))
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            fail(f"a list ({_type_name(tp)})")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            fail(f"a list of {len(args)} items")
        return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        if not math.isfinite(value):  # no knob of a run is meaningful at inf or NaN (e.g. --optim.lr=.inf)
            fail("a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    raise TypeError(f"config field '{key}' has an unsupported annotation {tp!r}")


def _checked(cls, values: dict, prefix: str, source: str) -> dict:
    """The keys of `values` checked and typed against the dataclass `cls`: a dict, sections as nested dicts.
    Nothing is built yet, so rules that tie keys together see the file's values and the overrides at once."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{source}: unknown key '{path}' (known keys here: {known})")
        kwargs[key] = _coerce(value, hints[key], path, source)
    return kwargs


def _make(cls, values: dict):
    """Build `cls` from checked values (nested dicts for sections); each section checks its rules as it is built."""
    hints = typing.get_type_hints(cls)
    return cls(**{key: _make(hints[key], value) if dataclasses.is_dataclass(hints[key]) else value
                  for key, value in values.items()})


def _as_values(cfg) -> dict:
    """A built config as the nested dict `_make` takes back."""
    return {f.name: _as_values(getattr(cfg, f.name)) if dataclasses.is_dataclass(getattr(cfg, f.name))
            else getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _apply_override(values: dict, text: str) -> None:
    """Set one `--section.key=value` override, type-checked, in the nested dict `values` of a RunConfig."""
    source = f"command-line override '{text}'"
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(f"{source}: expected --section.key=value")
    dotted, raw = body.split("=", 1)
    parts = dotted.split(".")
    try:
        value = yaml.load(raw, Loader=_StrictLoader) if raw != "" else ""  # noqa: S506
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: value is not valid YAML: {_yaml_problem(err)}") from None
    cls, node, done = RunConfig, values, ""
    for i, key in enumerate(parts):
        hints = typing.get_type_hints(cls)
        full = f"{done}.{key}" if done else key
        if key not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"{source}: unknown key '{full}' (known keys here: {known})")
        if i == len(parts) - 1:
            node[key] = _coerce(value, hints[key], full, source)
            return
        if not dataclasses.is_dataclass(hints[key]):
            raise ConfigError(f"{source}: key '{full}' is a value, not a section")
        cls, node, done = hints[key], node.setdefault(key, {}), full


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def config_path(name_or_path: str | Path) -> Path:
    """A YAML path as given, or a bare name (`demo`, `cifar10_lt_r100`) from the bundled configs/."""
    path = Path(name_or_path)
    if path.exists():
        return path
    bundled = resources.files("mixtail.configs").joinpath(f"{path.stem}.yaml")
    if path.suffix in ("", ".yaml") and path.parent == Path(".") and bundled.is_file():
        return Path(str(bundled))
    raise ConfigError(f"config file {name_or_path} does not exist (and is not a bundled config name)")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Load a YAML file of deltas onto the defaults, apply dotted overrides, and validate.

    path: a YAML file, the name of a bundled config (demo, smoke_cpu, cifar10_lt_r100, ...), or None for
    the defaults. overrides: `--section.key=value` strings, values read as YAML. An unknown or duplicate
    key, a wrongly typed or out-of-range value is a ConfigError naming the key and where it came from.

    >>> import mixtail
    >>> cfg = mixtail.load_config("cifar10_lt_r100", ["--optim.lr=0.05", "--mix.ratio_range=[0,1]"])
    >>> cfg.data.dataset, cfg.optim.lr, cfg.mix.ratio_range
    ('cifar10', 0.05, (0.0, 1.0))
    >>> try:
    ...     mixtail.load_config("demo", ["--optim.lrr=0.1"])
    ... except mixtail.ConfigError as err:
    ...     print(str(err).split(" (")[0])
    command-line override '--optim.lrr=0.1': unknown key 'optim.lrr'
    """
    values = {}
    if path is not None:
        path = config_path(path)
        values = _checked(RunConfig, _read_yaml(path), "", str(path))
    for text in overrides:
        _apply_override(values, text)
    return _make(RunConfig, values)


def apply_overrides(cfg: RunConfig, overrides: list[str] = ()) -> RunConfig:
    """Apply `--section.key=value` overrides (values parsed as YAML, checked like file values) to a built config;
    the result is built once, after all of them, so overrides that must change together (milestones and
    lr_factors) can."""
    values = _as_values(cfg)
    for text in overrides:
        _apply_override(values, text)
    return _make(RunConfig, values)


def config_from_dict(values: dict, source: str) -> RunConfig:
    return _make(RunConfig, _checked(RunConfig, values, "", source))


def config_to_dict(cfg) -> dict:
    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(_as_values(cfg))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def validate(cfg: RunConfig) -> None:
    """Check every section again (each section checks its own keys when it is built, so a config made in
    Python, by YAML or by dataclasses.replace meets the same rules); a ConfigError names the first bad key."""
    for f in dataclasses.fields(cfg):
        getattr(cfg, f.name).validate()
