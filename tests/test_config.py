"""Tests of trainer/config.py: strict YAML loading, dotted overrides, validation, dump round-trips, and
every bundled config in configs/.

    python -m pytest tests/test_config.py -q
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from mixtail.trainer.config import (CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, ConfigError, DataConfig,
                                    MixConfig, OptimConfig, RunConfig, config_from_dict, config_path,
                                    dump_config, load_config, normalization)

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))


def write_yaml(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_error(path: Path, overrides: list[str] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


# --------------------------------------------------------------------------------------------------
# Strict YAML files
# --------------------------------------------------------------------------------------------------

WRONG_TYPES = [
    ("optim:\n  lr: '0.1'\n", "optim.lr"),  # a string for a float
    ("optim:\n  lr: true\n", "optim.lr"),  # a bool for a float
    ("train:\n  epochs: 200.0\n", "train.epochs"),  # a float for an int
    ("train:\n  epochs: true\n", "train.epochs"),  # a bool for an int
    ("train:\n  seed: '0'\n", "train.seed"),  # a string for an int
    ("train:\n  compile: 1\n", "train.compile"),  # an int for a bool
    ("train:\n  compile: 'yes'\n", "train.compile"),  # a string for a bool
    ("data:\n  root: 5\n", "data.root"),  # an int for a string
    ("mix:\n  mix_op: paste\n", "mix.mix_op"),  # not one of the Literal choices
    ("data:\n  dataset: CIFAR100\n", "data.dataset"),  # Literal choices are case-sensitive
    ("mix:\n  ratio_range: [0.2, 0.5, 0.8]\n", "mix.ratio_range"),  # a fixed tuple of the wrong length
    ("mix:\n  ratio_range: [0.2]\n", "mix.ratio_range"),
    ("mix:\n  ratio_range: 0.5\n", "mix.ratio_range"),  # a scalar for a tuple
    ("mix:\n  ratio_range: [0.2, 'x']\n", "mix.ratio_range[1]"),  # a bad tuple item names its index
    ("optim:\n  milestones: [100, 150.5]\n", "optim.milestones[1]"),  # variadic tuple[int, ...]
    ("data:\n  mean: [0.5, 0.5]\n", "data.mean"),  # Optional fixed tuple of the wrong length
    ("mix:\n  unmixed_last_epochs: 1.5\n", "mix.unmixed_last_epochs"),  # an int given a float
    ("train:\n  max_steps_per_epoch: false\n", "train.max_steps_per_epoch"),  # Optional int given a bool
    ("optim: 0.1\n", "optim"),  # a scalar where a section belongs
    ("optim:\n  - lr\n", "optim"),  # a list where a section belongs
]


@pytest.mark.parametrize("text,key", WRONG_TYPES, ids=[k + "-" + str(i) for i, (_, k) in enumerate(WRONG_TYPES)])
def test_wrong_type_names_dotted_key_and_file(tmp_path, text, key):
    path = write_yaml(tmp_path, text)
    msg = load_error(path)
    assert f"'{key}'" in msg, msg
    assert str(path) in msg, msg


@pytest.mark.parametrize("text,key", [
    ("optim:\n  lrr: 0.1\n", "optim.lrr"),
    ("optimizer:\n  lr: 0.1\n", "optimizer"),
    ("data:\n  dataset: demo\n  image_sz: 32\n", "data.image_sz"),
])
def test_unknown_key_names_dotted_key_and_file(tmp_path, text, key):
    path = write_yaml(tmp_path, text)
    msg = load_error(path)
    assert f"unknown key '{key}'" in msg, msg
    assert str(path) in msg, msg


def test_duplicate_key_in_section_is_an_error(tmp_path):
    # PyYAML would silently keep the last value; FFCV's example YAML repeats a key exactly like this.
    path = write_yaml(tmp_path, "optim:\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.2\n")
    msg = load_error(path)
    assert "duplicate key 'lr'" in msg, msg
    assert "line 4" in msg and "line 2" in msg, msg
    assert str(path) in msg, msg


def test_duplicate_section_is_an_error(tmp_path):
    path = write_yaml(tmp_path, "optim:\n  lr: 0.1\ntrain:\n  epochs: 3\noptim:\n  momentum: 0.8\n")
    msg = load_error(path)
    assert "duplicate key 'optim'" in msg, msg
    assert str(path) in msg, msg


@pytest.mark.parametrize("text,what", [
    ("- 1\n- 2\n", "top level must be a mapping"),
    ("optim: {lr: 0.1\n", "not valid YAML"),
])
def test_malformed_file_names_file(tmp_path, text, what):
    path = write_yaml(tmp_path, text)
    msg = load_error(path)
    assert what in msg and str(path) in msg, msg


def _alias_bomb(levels: int) -> str:
    """`train.out_dir` as a YAML "billion laughs": 9**levels references to one string, in a few hundred bytes."""
    lines = ["train:", "  out_dir:", '    - &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"    - &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_in_a_string_key_fails_at_once_in_one_short_line(tmp_path):
    """The type error must not print the whole expanded value (a 424-byte file would run past 60 s at 1.9 GB):
    the value is quoted through a short prefix. The small bomb shows it deterministically (its full repr is
    4 MB); the full one in a child process must end well inside a timeout that printing it exceeds many times
    over."""
    msg = load_error(write_yaml(tmp_path, _alias_bomb(6)))
    assert msg.startswith(f"{tmp_path / 'run.yaml'}: key 'train.out_dir': expected a string, got list [[")
    assert len(msg) < 300 and "\n" not in msg, len(msg)
    import subprocess
    import sys

    path = write_yaml(tmp_path, _alias_bomb(9), "bomb.yaml")
    assert len(path.read_bytes()) < 600
    code = f"import mixtail; mixtail.load_config({str(path)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 1 and err[-1].startswith("mixtail.errors.ConfigError: ") and len(err[-1]) < 300, err[-1:]


def test_a_yaml_syntax_error_names_the_place_not_the_text(tmp_path):
    """PyYAML's message quotes the offending lines; ours gives the problem, line and column in one line."""
    path = write_yaml(tmp_path, "data:\n  root: /data\ntoken: [hunter2-secret\n")
    msg = load_error(path)
    assert "hunter2" not in msg and "\n" not in msg and msg.startswith(f"{path}: not valid YAML: "), msg
    assert "(line 4, column 1)" in msg, msg


def test_missing_file_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_empty_file_and_no_file_give_defaults(tmp_path):
    assert load_config(write_yaml(tmp_path, "# nothing\n")) == RunConfig()
    assert load_config(None) == RunConfig()


def test_valid_values_are_converted_to_field_types(tmp_path):
    path = write_yaml(tmp_path, "optim:\n  lr: 1\n  milestones: [3, 5]\n  lr_factors: [1, 0.5]\n"
                                "mix:\n  ratio_range: [0, 1]\n  unmixed_last_epochs: 7\n"
                                "data:\n  mean: [0.5, 0.5, 0.5]\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float  # an int is a valid float, stored as float
    assert cfg.optim.milestones == (3, 5) and cfg.optim.lr_factors == (1.0, 0.5)
    assert type(cfg.optim.lr_factors[0]) is float
    assert cfg.mix.ratio_range == (0.0, 1.0) and all(type(v) is float for v in cfg.mix.ratio_range)
    assert cfg.mix.unmixed_last_epochs == 7
    assert cfg.data.mean == (0.5, 0.5, 0.5)
    # Untouched keys keep the dataclass defaults (YAML holds deltas only).
    assert cfg.optim.momentum == OptimConfig().momentum and cfg.train == RunConfig().train


@pytest.mark.parametrize("text,expected", [
    ("optim:\n  weight_decay: 5e-4\n", 5e-4),
    ("optim:\n  weight_decay: 1E-3\n", 1e-3),
    ("optim:\n  weight_decay: 2.0e-4\n", 2e-4),
])
def test_exponent_floats_without_a_dot_are_numbers(tmp_path, text, expected):
    # YAML 1.1 (PyYAML's default) reads `5e-4` as a *string*; the paper and every user write weight decay
    # this way, so the strict loader must read it as the float it is (YAML 1.2 does).
    cfg = load_config(write_yaml(tmp_path, text))
    assert cfg.optim.weight_decay == expected


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().optim.lr = 0.5  # type: ignore[misc]


# --------------------------------------------------------------------------------------------------
# Dotted overrides
# --------------------------------------------------------------------------------------------------


def test_overrides_apply_on_top_of_yaml(tmp_path):
    path = write_yaml(tmp_path, "optim:\n  lr: 0.2\ndata:\n  mean: [0.1, 0.1, 0.1]\n")
    cfg = load_config(path, ["--optim.lr=0.05", "--mix.ratio_range=[0,1]", "--data.mean=null",
                             "--train.out_dir=runs/x", "--optim.weight_decay=5e-4", "--data.std=[0.5,0.4,0.3]"])
    assert cfg.optim.lr == 0.05
    assert cfg.mix.ratio_range == (0.0, 1.0) and all(type(v) is float for v in cfg.mix.ratio_range)
    assert cfg.data.mean is None
    assert cfg.train.out_dir == "runs/x"
    assert cfg.optim.weight_decay == 5e-4
    assert cfg.data.std == (0.5, 0.4, 0.3)


def test_later_override_wins():
    cfg = load_config(None, ["--optim.lr=0.3", "--optim.lr=0.4"])
    assert cfg.optim.lr == 0.4


@pytest.mark.parametrize("override,key", [
    ("--optim.lr=abc", "optim.lr"),
    ("--optim.lr='0.1'", "optim.lr"),
    ("--train.epochs=1.5", "train.epochs"),
    ("--train.epochs=true", "train.epochs"),
    ("--train.compile=1", "train.compile"),
    ("--mix.mix_op=paste", "mix.mix_op"),
    ("--mix.ratio_range=[0.1]", "mix.ratio_range"),
    ("--mix.ratio_range=[0.1,0.2,0.3]", "mix.ratio_range"),
    ("--mix.start_epoch=2.5", "mix.start_epoch"),
])
def test_override_wrong_type_names_key_and_override(override, key):
    msg = load_error(None, [override])
    assert f"'{key}'" in msg, msg
    assert f"override '{override}'" in msg, msg


@pytest.mark.parametrize("override,key", [
    ("--optim.lrr=0.1", "optim.lrr"),
    ("--nope.lr=0.1", "nope"),
    ("--data.image_sz=32", "data.image_sz"),
])
def test_override_unknown_key(override, key):
    msg = load_error(None, [override])
    assert f"unknown key '{key}'" in msg, msg
    assert override in msg, msg


@pytest.mark.parametrize("override,what", [
    ("--optim.lr", "expected --section.key=value"),
    ("--optim.lr.x=1", "is a value, not a section"),
    ("--optim.lr=[1", "not valid YAML"),
])
def test_malformed_override(override, what):
    msg = load_error(None, [override])
    assert what in msg and override in msg, msg


# --------------------------------------------------------------------------------------------------
# validate()
# --------------------------------------------------------------------------------------------------

INVALID_VALUES = [
    ("mix:\n  ratio_range: [0.8, 0.2]\n", "--mix.ratio_range=[0.8,0.2]", "mix.ratio_range"),
    ("mix:\n  ratio_range: [-0.1, 0.5]\n", "--mix.ratio_range=[-0.1,0.5]", "mix.ratio_range"),
    ("mix:\n  ratio_range: [0.2, 1.5]\n", "--mix.ratio_range=[0.2,1.5]", "mix.ratio_range"),
    ("optim:\n  milestones: [100]\n", "--optim.milestones=[100]", "optim.lr_factors"),
    ("optim:\n  milestones: [180, 160]\n", "--optim.milestones=[180,160]", "optim.milestones"),
    ("optim:\n  lr: 0\n", "--optim.lr=0", "optim.lr"),
    ("data:\n  batch_size: 0\n", "--data.batch_size=0", "data.batch_size"),
    ("data:\n  num_views: 3\n", "--data.num_views=3", "data.num_views"),
    ("data:\n  imbalance_ratio: 0.5\n", "--data.imbalance_ratio=0.5", "data.imbalance_ratio"),
    ("data:\n  std: [0.2, 0.0, 0.2]\n", "--data.std=[0.2,0.0,0.2]", "data.std"),
    ("mix:\n  mix_prob: 1.5\n", "--mix.mix_prob=1.5", "mix.mix_prob"),
    ("mix:\n  alpha: 0\n", "--mix.alpha=0", "mix.alpha"),
    ("mix:\n  unmixed_last_epochs: -1\n", "--mix.unmixed_last_epochs=-1", "mix.unmixed_last_epochs"),
    ("mix:\n  start_epoch: -2\n", "--mix.start_epoch=-2", "mix.start_epoch"),
    ("mix:\n  mix_per: pair\n", "--mix.mix_per=pair", "mix.mix_per"),
    ("aug:\n  policy: randaugment\n", "--aug.policy=randaugment", "aug.policy"),
    ("loss:\n  prior: uniform\n", "--loss.prior=uniform", "loss.prior"),
    ("aug:\n  scale: [0.0, 1.0]\n", "--aug.scale=[0.0,1.0]", "aug.scale"),
    ("aug:\n  hue: 0.6\n", "--aug.hue=0.6", "aug.hue"),
    ("loss:\n  tau: 0\n", "--loss.tau=0", "loss.tau"),
    ("train:\n  epochs: 0\n", "--train.epochs=0", "train.epochs"),
    ("train:\n  accumulate_steps: 0\n", "--train.accumulate_steps=0", "train.accumulate_steps"),

    ("train:\n  keep_checkpoints: 0\n", "--train.keep_checkpoints=0", "train.keep_checkpoints"),
]


@pytest.mark.parametrize("text,override,key", INVALID_VALUES, ids=[k for _, _, k in INVALID_VALUES])
def test_validate_rejects_bad_values_from_file_and_override(tmp_path, text, override, key):
    assert f"'{key}'" in load_error(write_yaml(tmp_path, text))
    assert f"'{key}'" in load_error(None, [override])


def test_data_on_error_and_image_check():
    """data.on_error (stop | skip) and data.image_check (header | decode): defaults, choices, validate()."""
    cfg = load_config(None, [])
    assert cfg.data.on_error == "stop" and cfg.data.image_check == "header"
    cfg = load_config(None, ["--data.on_error=skip", "--data.image_check=decode"])
    assert cfg.data.on_error == "skip" and cfg.data.image_check == "decode"
    for override, key in (("--data.on_error=ignore", "data.on_error"), ("--data.image_check=full", "data.image_check")):
        assert f"'{key}'" in load_error(None, [override])
    for field, value in (("on_error", "ignore"), ("image_check", "none")):
        with pytest.raises(ConfigError, match=f"'data.{field}'"):
            DataConfig(**{field: value}).validate()


# (key, the edge value that must load, the value just past it that must be refused)
EDGES = [
    ("mix.ratio_range", "[0,1]", "[-0.01,1]"),
    ("mix.ratio_range", "[0,1]", "[0,1.01]"),
    ("mix.mix_prob", "0", "-0.01"),
    ("mix.mix_prob", "1", "1.01"),
    ("mix.start_epoch", "0", "-1"),
    ("mix.unmixed_last_epochs", "0", "-1"),
    ("train.keep_checkpoints", "1", "0"),
]


@pytest.mark.parametrize("key,edge,past", EDGES)
def test_validate_draws_the_line_at_the_edge(key, edge, past):
    """Each range's edge value is accepted, and the value just past it is refused naming the key."""
    load_config(None, [f"--{key}={edge}"])
    assert f"'{key}'" in load_error(None, [f"--{key}={past}"])


def test_empty_schedules_are_accepted():
    cfg = load_config(None, ["--optim.milestones=[]", "--optim.lr_factors=[]"])
    assert cfg.optim.milestones == () and cfg.optim.lr_factors == ()


# A bad value given in Python, as the CLI would give it: each config class checks its own keys when it is built
# (directly, by dataclasses.replace, from YAML), with the message the command line prints.
BUILT_IN_PYTHON = [
    ("mix", {"ratio_range": (2.0, 3.0)}, "--mix.ratio_range=[2.0,3.0]"),
    ("mix", {"ratio_range": (0.9, 0.1)}, "--mix.ratio_range=[0.9,0.1]"),
    ("loss", {"eta": -5.0}, "--loss.eta=-5"),
    ("data", {"batch_size": -4}, "--data.batch_size=-4"),
    ("aug", {"hue": 0.6}, "--aug.hue=0.6"),
    ("model", {"head_dim": 0}, "--model.head_dim=0"),
    ("optim", {"milestones": (5,)}, "--optim.milestones=[5]"),
    ("train", {"epochs": 0}, "--train.epochs=0"),
    ("router", {"threshold": 1.0}, "--router.threshold=1.0"),
]


@pytest.mark.parametrize("section,changes,override", BUILT_IN_PYTHON, ids=[o for _, _, o in BUILT_IN_PYTHON])
def test_a_config_built_in_python_is_checked_with_the_cli_message(section, changes, override):
    good = getattr(RunConfig(), section)
    with pytest.raises(ConfigError) as replaced:
        dataclasses.replace(good, **changes)
    with pytest.raises(ConfigError) as built:
        type(good)(**changes)
    assert str(replaced.value) == str(built.value) == load_error(None, [override])


def test_keys_that_change_together_are_checked_once_all_are_set(tmp_path):
    """The rules run when a section is built, which is after the file and every override are applied: a file's
    milestones can take their factors from an override, and two overrides can change both."""
    path = write_yaml(tmp_path, "optim:\n  milestones: [1, 2, 3]\n")
    assert load_config(path, ["--optim.lr_factors=[0.1,0.01,0.001]"]).optim.milestones == (1, 2, 3)
    assert "'optim.lr_factors'" in load_error(path)


def test_image_size_is_bounded():
    """--data.image_size=100000 is refused when the config loads, not an internal MemoryError (terabytes of
    batch) at the first step."""
    assert load_error(None, ["--data.image_size=100000"]) == "key 'data.image_size': must be in [8, 1024], got 100000"
    assert load_config(None, ["--data.image_size=1024"]).data.image_size == 1024


def test_a_config_file_that_is_not_utf8_is_named_with_the_offset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"train:\n  out_dir: 'r\xff'\n")
    assert load_error(path) == f"{path}: not UTF-8 text: byte offset 20 is not valid UTF-8"


def test_validate_accepts_edge_values():
    cfg = load_config(None, ["--mix.ratio_range=[0,1]", "--mix.mix_prob=0", "--optim.milestones=[]",
                             "--optim.lr_factors=[]", "--mix.start_epoch=0", "--mix.unmixed_last_epochs=0",
                             "--train.keep_checkpoints=1"])
    assert cfg.mix.ratio_range == (0.0, 1.0) and cfg.optim.milestones == ()
    assert cfg.train.keep_checkpoints == 1 and load_config(None).train.keep_checkpoints == 2


# --------------------------------------------------------------------------------------------------
# Dump round-trip and the bundled configs
# --------------------------------------------------------------------------------------------------


def roundtrip(cfg: RunConfig) -> RunConfig:
    return config_from_dict(yaml.safe_load(dump_config(cfg)), "round-trip")


def test_dump_roundtrip_defaults_and_non_defaults():
    assert roundtrip(RunConfig()) == RunConfig()
    cfg = load_config(None, ["--data.mean=[0.1,0.2,0.3]", "--data.std=[0.3,0.2,0.1]", "--mix.unmixed_last_epochs=9",
                             "--mix.ratio_range=[0.0,1.0]", "--optim.lr=0.0123456789", "--optim.weight_decay=1e-5",
                             "--aug.ratio=[0.5,2.0]", "--train.max_steps_per_epoch=3", "--data.dataset=folder",
                             "--optim.milestones=[1,2,3]", "--optim.lr_factors=[0.1,0.01,0.001]"])
    back = roundtrip(cfg)
    assert back == cfg
    assert type(back.mix.ratio_range) is tuple and type(back.data.mean) is tuple


def test_config_from_dict_is_strict():
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.lrr'"):
        config_from_dict({"optim": {"lrr": 1.0}}, "a dict")
    with pytest.raises(ConfigError, match="mix.ratio_range"):
        config_from_dict({"mix": {"ratio_range": [0.9, 0.1]}}, "a dict")


def test_configs_folder_is_not_empty():
    assert (REPO_ROOT / "configs" / "demo.yaml") in BUNDLED_CONFIGS


@pytest.mark.parametrize("path", BUNDLED_CONFIGS, ids=[p.stem for p in BUNDLED_CONFIGS])
def test_bundled_config_loads_and_roundtrips(path):
    cfg = load_config(path)
    assert roundtrip(cfg) == cfg
    # The bare name resolves to the packaged copy of the same file.
    assert config_path(path.stem).name == path.name
    assert load_config(path.stem) == cfg


def test_normalization_defaults_by_image_size():
    assert normalization(DataConfig(image_size=32)) == (CIFAR_MEAN, CIFAR_STD)
    assert normalization(DataConfig(image_size=224)) == (IMAGENET_MEAN, IMAGENET_STD)
    mean, std = normalization(DataConfig(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    assert mean == (0.5, 0.5, 0.5) and std == (0.25, 0.25, 0.25)


def test_mix_defaults_follow_method():
    # docs/method.md, "Mixing": λ ~ Beta(1, 1) normalized into [0.2, 0.8], resize (not crop); CMO's strategy mixes
    # a whole batch with probability 0.5 (one coin per batch) and only in epochs 3 < e < E − 3 (counted from 0).
    # docs/method.md, "Augmentation before mixing" and "Foreground sampling" (`data.fg_sampling: instance`).
    m = MixConfig()
    assert m.ratio_range == (0.2, 0.8) and m.alpha == 1.0 and m.mix_op == "resize"
    assert m.aug_order == "before_mix" and m.mix_prob == 0.5 and m.mix_per == "batch"
    assert [e for e in range(200) if m.active(e, 200)] == [e for e in range(200) if 3 < e < 200 - 3]
    assert DataConfig().fg_sampling == "instance" and DataConfig().fg_gamma == 1.0
    assert DataConfig().lt_subset == "ldam"


@pytest.mark.parametrize("override", ["--optim.lr=.inf", "--optim.lr=-.inf", "--optim.lr=.nan", "--loss.tau=.inf",
                                      "--mix.ratio_range=[0,.inf]", "--data.fg_gamma=.nan"])
def test_nonfinite_numbers_are_config_errors(override):
    key = override[2:].split("=")[0]
    msg = load_error(None, [override])
    assert f"'{key}" in msg and "finite" in msg, msg


# --------------------------------------------------------------------------------------------------
# The paper's defaults, pinned with the docs/method.md sentence each one comes from
# --------------------------------------------------------------------------------------------------

METHOD = REPO_ROOT / "docs" / "method.md"


def _method_pins() -> list[tuple[str, object, object]]:
    """(docs/method.md quote, value in the config, value the quote gives): the defaults (the CIFAR-LT recipe) and
    the bundled ImageNet-LT and iNaturalist configs. The paper gives no weight decay, momentum or warmup for the
    last two (its §4.2), so those are not pinned there."""
    d = load_config(None)
    inet = load_config("imagenet_lt_rn50")
    inat = load_config("inat18_rn50")
    pins = [
        ("L = L_CE + η·L_SMC, with η = `loss.eta` = 0.1.", d.loss.eta, 0.1),
        ("`loss.tau` is τ = 0.1.", d.loss.tau, 0.1),
        ("Linear(d, d) → ReLU → Linear(d, 128)", d.model.head_dim, 128),
        ("The paper draws the ratio from Beta(α, α) with α = 1 (`mix.alpha`)", d.mix.alpha, 1.0),
        ("[lo, hi] = `mix.ratio_range` = [0.2, 0.8];", d.mix.ratio_range, (0.2, 0.8)),
        ("| `weighted` (default) | the formula above |", d.loss.weighting, "weighted"),
        ("`loss.prior: dataset` (default) is the paper's log P_Y throughout.", d.loss.prior, "dataset"),
        ("The classifier's loss is a soft cross-entropy with logit adjustment", d.loss.logit_adjust, True),
        ("| backbone | ResNet-32 | ResNet-50 | ResNet-50 |", (d.model.arch, inet.model.arch, inat.model.arch),
         ("resnet32", "resnet50", "resnet50")),
        ("| epochs | 200 | 100 | 200 |", (d.train.epochs, inet.train.epochs, inat.train.epochs), (200, 100, 200)),
        ("| batch (pairs) | 128 | 128 | 256 |", (d.data.batch_size, inet.data.batch_size, inat.data.batch_size),
         (128, 128, 256)),
        ("| optimizer | SGD, momentum 0.9, weight decay 2e-4 | SGD, lr 0.1 | SGD, lr 0.1 |",
         (d.optim.momentum, d.optim.weight_decay, d.optim.nesterov, inet.optim.lr, inat.optim.lr),
         (0.9, 2e-4, False, 0.1, 0.1)),
        ("| lr | 0.1, linear warmup over 5 epochs, ×0.01 from epoch 160, ×0.0001 from 180 |",
         (d.optim.lr, d.optim.warmup_epochs, d.optim.milestones, d.optim.lr_factors),
         (0.1, 5.0, (160, 180), (0.01, 0.0001))),
        ("×0.1 at 60 and again at 80 | ×0.1 at 75 and again at 160 |",
         (inet.optim.milestones, inet.optim.lr_factors, inat.optim.milestones, inat.optim.lr_factors),
         ((60, 80), (0.1, 0.01), (75, 160), (0.1, 0.01))),
    ]
    for name, cfg in (("imagenet_lt_rn50", inet), ("inat18_rn50", inat)):
        pins.append((f"For every dataset: η = 0.1, head output 128, α = 1, τ = 0.1. ({name})",
                     (cfg.loss.eta, cfg.model.head_dim, cfg.mix.alpha, cfg.loss.tau), (0.1, 128, 1.0, 0.1)))
    return pins


@pytest.mark.parametrize("quote,value,expected", _method_pins(), ids=lambda v: v[:40] if isinstance(v, str) else "")
def test_paper_defaults_are_pinned_by_method(quote, value, expected):
    assert value == expected, f"docs/method.md: {quote!r}"


def test_the_quoted_sentences_are_in_method():
    """The quotes above are the method page's own words (docs/method.md), so it and the defaults cannot drift
    apart."""
    text = " ".join(METHOD.read_text().split())
    for quote, _, _ in _method_pins():
        words = quote.split(" (")[0] if quote.endswith(")") else quote
        assert " ".join(words.split()) in text, words


def test_the_schedule_the_defaults_give():
    """docs/method.md, "Schedules": linear warmup over 5 epochs (per step), lr 0.1, ×0.01 from epoch 160,
    ×0.0001 from 180."""
    from mixtail.trainer.train import lr_at

    o, spe = load_config(None).optim, 97
    assert [lr_at(o, s, spe) for s in (0, 5 * spe - 1)] == pytest.approx([0.1 / (5 * spe), 0.1])
    assert [lr_at(o, e * spe, spe) for e in (5, 159, 160, 179, 180, 199)] == pytest.approx(
        [0.1, 0.1, 0.001, 0.001, 1e-5, 1e-5])


def test_accumulation_and_sync_batchnorm_rules():
    assert "'train.sync_batchnorm'" in load_error(None, ["--train.device=cpu", "--train.sync_batchnorm=true"])
    # A checkpoint due between the batches of one accumulated step waits for the step (tests/test_train.py).
    cfg = load_config(None, ["--train.accumulate_steps=2", "--train.checkpoint_every_steps=3"])
    assert cfg.train.accumulate_steps == 2
