"""The public API (mixtail/__init__.py): every name imports from `mixtail`, is listed in docs/guide.md's "Use it
as a library" section, and has a docstring example that runs; `import mixtail` stays cheap; render_plan and
build_planner; examples/custom_loop.py trains.

    python -m pytest tests/test_api.py -q
"""

from __future__ import annotations

import doctest
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mixtail

REPO = Path(__file__).resolve().parent.parent
SLOW_EXAMPLES = {"train"}  # a few training steps and an evaluation


def _library_section() -> str:
    text = (REPO / "docs" / "guide.md").read_text() + "\n## "
    match = re.search(r"^## Use it as a library\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "docs/guide.md has no '## Use it as a library' section"
    return match.group(1)


def test_every_public_name_resolves_from_mixtail_and_is_in_the_readme():
    listed = _library_section()
    for name in mixtail.__all__:
        obj = getattr(mixtail, name)
        assert obj.__module__.startswith("mixtail."), (name, obj.__module__)
        assert f"`{name}" in listed, f"{name} is public but the library section of docs/guide.md does not list it"
    assert set(mixtail.__all__) <= set(dir(mixtail))


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'build_trainer'"):
        mixtail.build_trainer  # noqa: B018
    assert not hasattr(mixtail, "reference_smc_loss")  # internal names are not reachable from mixtail


def test_names_are_the_objects_of_their_modules():
    from mixtail.kernels.smc_loss import smc_loss
    from mixtail.pipelines.loader import build_loader
    from mixtail.trainer.train import train

    assert mixtail.smc_loss is smc_loss and mixtail.build_loader is build_loader and mixtail.train is train


def test_import_mixtail_loads_no_heavy_module():
    code = ("import sys, mixtail; heavy = [m for m in ('torch', 'numpy', 'triton', 'nvidia.dali', 'ffcv', 'timm') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def _run_docstring_examples(name: str) -> None:
    obj = getattr(mixtail, name)
    tests = doctest.DocTestFinder(recurse=False).find(obj, f"mixtail.{name}", globs={})
    examples = sum(len(t.examples) for t in tests)
    assert examples >= 2, f"mixtail.{name} has no runnable example in its docstring"
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for t in tests:
        runner.run(t, out=report.append)
    assert runner.failures == 0, "".join(report)


@pytest.mark.parametrize("name", sorted(set(mixtail.__all__) - SLOW_EXAMPLES))
def test_docstring_example_runs(name):
    _run_docstring_examples(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_EXAMPLES))
def test_slow_docstring_example_runs(name):
    _run_docstring_examples(name)


# --------------------------------------------------------------------------------------------------
# build_planner and render_plan
# --------------------------------------------------------------------------------------------------


def _demo_planner(split: str, **kw):
    cfg = mixtail.load_config("demo", ["--mix.start_epoch=0", "--mix.mix_prob=1.0", "--data.batch_size=16"])
    labels = np.repeat(np.arange(3), [20, 12, 8])
    return cfg, mixtail.build_planner(labels, cfg.data, cfg.aug, cfg.mix, split=split, **kw)


def test_render_plan_gathers_the_plans_images():
    """Against the gather-then-render_views reference, for a host and a device plan, with valid sizes."""
    from mixtail.pipelines.ops.mixing import render_test_view, render_views

    cfg, planner = _demo_planner("train")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    sizes = torch.randint(20, 33, (40, 2), generator=g)
    plan = planner.plan(0, 1)
    assert plan.mixed
    dp = plan.to("cpu")
    fg, bg = dp["fg_index"].long(), dp["bg_index"].long()
    want = render_views(images[fg], images[bg], dp, out_size=32, fg_hw=sizes[fg], bg_hw=sizes[bg])
    for p in (plan, dp):
        got = mixtail.render_plan(p, images, out_size=32, sizes=sizes)
        assert len(got) == 2
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    _, test_planner = _demo_planner("test")
    tp = test_planner.plan(0, 0).to("cpu")
    (view,) = mixtail.render_plan(tp, images, out_size=24)
    torch.testing.assert_close(view, render_test_view(images[tp["index"].long()], tp, 24), rtol=0, atol=0)


def test_render_plan_follows_the_plan_not_the_images_order():
    """Permuting the dataset and the plan's indices together gives the same views."""
    cfg, planner = _demo_planner("train")
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    plan = planner.plan(0, 0)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(2))
    inverse = torch.argsort(perm)  # images[perm][inverse[i]] == images[i]
    moved = plan.to("cpu")
    table = moved.table.clone()
    for col in ("fg_index", "bg_index"):
        at, _, _ = plan.layout.offsets[col]
        table[:, at] = inverse[moved[col].long()].to(torch.int32).view(torch.float32)
    from mixtail.pipelines.plan import DevicePlan

    a = mixtail.render_plan(plan, images, out_size=32)
    b = mixtail.render_plan(DevicePlan(plan, table), images[perm], out_size=32)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_build_planner_checks_its_inputs():
    with pytest.raises(ValueError, match="split must be one of train, val, test"):
        _demo_planner("training")
    cfg = mixtail.load_config("demo")
    with pytest.raises(mixtail.ConfigError, match="key 'data.batch_size': 10 training images"):
        mixtail.build_planner(np.arange(10) % 2, cfg.data, cfg.aug, cfg.mix, split="train")
    _, planner = _demo_planner("train", world_size=2, rank=1)
    assert planner.batch_size == 8  # data.batch_size is global


def test_build_loader_defaults_are_one_cpu_process():
    cfg = mixtail.load_config("demo")
    loader = mixtail.build_loader(cfg.data, cfg.aug, cfg.mix, split="test")
    first = next(iter(loader))
    assert first.images.device.type == "cpu" and loader.planner.world_size == 1
    loader.close()


# --------------------------------------------------------------------------------------------------
# Arguments: each public function names the argument it refuses
# --------------------------------------------------------------------------------------------------


def _smc_inputs(n: int = 6):
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=1)
    y = torch.arange(n) % 3
    return z, y, y.roll(1), torch.full((n,), 0.5)


def _smc_call(**changes):
    z, y_f, y_b, lam = _smc_inputs()
    args = {"features": z, "fg_labels": y_f, "bg_labels": y_b, "lam": lam, "tau": 0.1, "num_anchors": None,
            **changes}
    return mixtail.smc_loss(args.pop("features"), args.pop("fg_labels"), args.pop("bg_labels"), args.pop("lam"),
                            impl="reference", **args)


# Unchecked, each would give NaN, a silently wrong number (tau=-1: 1.546; a count of -5 taken as 1) or an error
# from deep inside (AttributeError 'is_cuda', ZeroDivisionError, numpy 19 frames down).
BAD_ARGUMENTS = [
    ("tau=0", lambda: _smc_call(tau=0.0), ValueError, "tau must be positive"),
    ("tau=-1", lambda: _smc_call(tau=-1.0), ValueError, "tau must be positive"),
    ("tau=nan", lambda: _smc_call(tau=float("nan")), ValueError, "tau must be positive and finite"),
    ("tau=str", lambda: _smc_call(tau="0.1"), TypeError, "tau must be a number"),
    ("empty", lambda: _smc_call(features=torch.zeros(0, 8), fg_labels=torch.zeros(0, dtype=torch.long),
                                bg_labels=torch.zeros(0, dtype=torch.long), lam=torch.zeros(0)),
     ValueError, "features is empty"),
    ("num_anchors=0", lambda: _smc_call(num_anchors=0), ValueError, "num_anchors must be positive"),
    ("lam>1", lambda: _smc_call(lam=torch.tensor([0.5, 1.5, 0.5, 0.5, 0.5, 0.5])), ValueError,
     r"lam must lie in \[0, 1\].*1\.5 at row 1"),
    ("lam<0", lambda: _smc_call(lam=torch.full((6,), -0.1)), ValueError, r"lam must lie in \[0, 1\]"),
    ("lam=nan", lambda: _smc_call(lam=torch.full((6,), float("nan"))), ValueError, r"lam must lie in \[0, 1\]"),
    ("numpy", lambda: _smc_call(features=_smc_inputs()[0].numpy()), TypeError, "features must be a torch.Tensor"),
    ("float labels", lambda: _smc_call(fg_labels=torch.zeros(6)), TypeError, "fg_labels must be an integer tensor"),
    ("world_size=0", lambda: _demo_loader(world_size=0), ValueError, "world_size must be >= 1, got 0"),
    ("rank=world_size", lambda: _demo_loader(rank=2, world_size=2), ValueError, "rank must be below world_size"),
    ("seed=-1", lambda: _demo_loader(seed=-1), ValueError, "seed must be >= 0, got -1"),
    ("seed=str", lambda: _demo_loader(seed="0"), TypeError, "seed must be an integer"),
    ("log_class_prior -5", lambda: mixtail.log_class_prior([10, -5]), ValueError,
     "counts must be finite and >= 0, got -5.0 for class 1"),
    ("log_class_prior nan", lambda: mixtail.log_class_prior([10, float("nan")]), ValueError,
     "counts must be finite and >= 0, got nan for class 1"),
    ("log_class_prior empty", lambda: mixtail.log_class_prior([]), ValueError, "counts must be a non-empty"),
]


def _demo_loader(**kw):
    cfg = mixtail.load_config("demo")
    return mixtail.build_loader(cfg.data, cfg.aug, cfg.mix, split="test", **kw)


@pytest.mark.parametrize("call,error,match", [c[1:] for c in BAD_ARGUMENTS], ids=[c[0] for c in BAD_ARGUMENTS])
def test_public_functions_name_the_bad_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_set_epoch_names_a_bad_epoch():
    loader = _demo_loader()
    try:
        with pytest.raises(ValueError, match="epoch must be >= 0, got -1"):
            loader.set_epoch(-1)
        with pytest.raises(TypeError, match="epoch must be an integer, got float"):
            loader.set_epoch(1.5)
        loader.set_epoch(0)
    finally:
        loader.close()


def test_the_checks_keep_good_arguments_and_the_trainer_path_agrees():
    """The checks refuse nothing valid: λ at 0 and 1, a zero count (taken as one), integer tau; and the
    trainer's entry (distributed_smc_loss, which skips the host read of λ) gives the same loss."""
    from mixtail.kernels import distributed_smc_loss

    z, y_f, y_b, _ = _smc_inputs()
    lam = torch.tensor([0.0, 1.0, 0.3, 1.0, 0.0, 0.7])
    loss = mixtail.smc_loss(z, y_f, y_b, lam, tau=1, impl="reference")
    assert torch.isfinite(loss)
    assert torch.equal(distributed_smc_loss(z, y_f, y_b, lam, tau=1, impl="reference"), loss)
    assert torch.allclose(mixtail.log_class_prior(np.array([3, 0, 1])).exp(), torch.tensor([0.6, 0.2, 0.2]))


# --------------------------------------------------------------------------------------------------
# examples/custom_loop.py
# --------------------------------------------------------------------------------------------------


def run_custom_loop(python: str, script: Path, cwd: Path, steps: int, env: dict | None = None) -> list[float]:
    """Run the example for `steps` steps; its per-step losses (also used by the wheel test)."""
    out = subprocess.run([python, str(script), "--steps", str(steps), "--device", "cpu"], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(m.group(1)) for m in re.finditer(r"^step \d+ loss (\S+)$", out.stdout, re.M)]
    assert len(losses) == steps, out.stdout[-2000:]
    return losses


def assert_loss_falls(losses: list[float], window: int = 10) -> None:
    first, last = np.mean(losses[:window]), np.mean(losses[-window:])
    # Measured on the CPU (40 steps): 2.80 -> 2.68; an untrained network stays near its start.
    assert last < first - 0.05, f"loss did not fall: first {window} steps {first:.3f}, last {window} {last:.3f}"


@pytest.mark.slow
def test_custom_loop_example_trains(tmp_path):
    losses = run_custom_loop(sys.executable, REPO / "examples" / "custom_loop.py", tmp_path, steps=40)
    assert all(np.isfinite(losses))
    assert_loss_falls(losses)
