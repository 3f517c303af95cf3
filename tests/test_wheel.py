"""The wheel: `pip wheel . --no-deps` builds one that holds the package and its bundled configs and nothing
else, and, installed into a fresh venv and run from outside the checkout, `mixtail train` (the demo), a
bundled config lookup and examples/custom_loop.py work from it.

    python -m pytest tests/test_wheel.py -q     # slow: builds, installs and runs (about half a minute)

The fresh venv gets mixtail from the wheel alone; its dependencies (torch and the rest, about 6 GB) come from
this test environment's site-packages through a .pth file written after the install, so pip never sees the
checkout's editable mixtail. Each run asserts that the mixtail it imported is the venv's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from test_api import run_custom_loop

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _source_tree(dest: Path) -> Path:
    """The checkout's files that git tracks or would track (not ignored), copied to dest: the wheel is built
    from what a clone holds, never from a stale build/ or a local .venv."""
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True)
    for rel in filter(None, out.stdout.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _build_wheel(src: Path, dist: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-w", str(dist), "-q"]
    # This environment's setuptools where it is new enough (no download); else pip fetches one, as README's does.
    if int(metadata.version("setuptools").split(".")[0]) >= 68:
        cmd.append("--no-build-isolation")
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    (wheel,) = dist.glob("mixtail-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, environment, cwd outside the checkout, the wheel)."""
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(_source_tree(tmp / "src"), tmp / "dist")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # This environment's pip installs into the venv's interpreter; the venv sees nothing else yet.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    # Appended after the venv's own site-packages: a plain path line, so the .pth files there (the
    # checkout's editable-install hook among them) are not run.
    (purelib / "zz_test_dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(deps)))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    return python, env, cwd, wheel, purelib


def test_wheel_holds_the_package_and_its_configs_only(installed):
    *_, wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    configs = {p.name for p in (REPO / "configs").glob("*.yaml")}
    assert {Path(n).name for n in names if n.startswith("mixtail/configs/") and n.endswith(".yaml")} == configs
    assert {"mixtail/cli.py", "mixtail/pipelines/sources/build.py", "mixtail/kernels/smc_loss.py", "mixtail/trainer/train.py",
            "mixtail/benchmarks/bench_train.py"} <= set(names)  # `mixtail bench` needs mixtail.benchmarks
    for n in names:
        assert n.startswith(("mixtail/", "mixtail-0.1.0.dist-info/")), n
        assert not n.startswith(("mixtail/tests", "mixtail/benchmarks/results")) and not n.endswith(".sh"), n
    entry_points = zipfile.ZipFile(wheel).read("mixtail-0.1.0.dist-info/entry_points.txt").decode()
    assert "mixtail = mixtail.cli:main" in entry_points


def test_the_installed_api_finds_its_bundled_configs(installed):
    python, env, cwd, _, purelib = installed
    code = ("import os, sys, mixtail, mixtail.pipelines.sources.build as base; from mixtail.trainer.config import config_path; "
            "cfg = mixtail.load_config('cifar10_lt_r100'); "
            "print(mixtail.__file__); print(base.__file__); print(config_path('cifar10_lt_r100')); "
            "print(cfg.data.dataset, cfg.model.arch); "
            f"print(any(os.path.realpath(p or '.') == {str(REPO.resolve())!r} for p in sys.path))")
    out = subprocess.run([str(python), "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    package, module, config, fields, checkout_on_path = out.stdout.strip().splitlines()
    for path in (package, module, config):  # the package, a mapped subpackage and the bundled YAML
        assert Path(path).is_relative_to(purelib), path
    assert fields == "cifar10 resnet32" and checkout_on_path == "False"


def test_mixtail_train_runs_the_demo_from_the_wheel(installed):
    python, env, cwd, _, purelib = installed
    mixtail = python.parent / "mixtail"
    help_out = subprocess.run([str(mixtail), "train", "cifar10_lt_r100", "--help"], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=300)
    assert help_out.returncode == 0 and "bundled config name" in help_out.stdout
    # The demo config, shortened to one epoch of 2 steps: what matters here is that it runs from the wheel.
    out = subprocess.run([str(mixtail), "train", "--train.epochs=1", "--train.max_steps_per_epoch=2",
                          "--train.device=cpu", "--train.out_dir=demo_run"], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "demo: " in out.stdout and "top-1 %" in out.stdout
    assert (cwd / "demo_run" / "final_eval.json").is_file() and (cwd / "demo_run" / "checkpoint.pt").is_file()
    # The console script ran the venv's mixtail, not the checkout's.
    which = subprocess.run([str(python), "-c", "import mixtail.cli; print(mixtail.cli.__file__)"], cwd=cwd, env=env,
                           capture_output=True, text=True, check=True)
    assert Path(which.stdout.strip()).is_relative_to(purelib)


def test_the_custom_loop_example_runs_from_the_wheel(installed):
    python, env, cwd, _, _ = installed
    script = shutil.copy(REPO / "examples" / "custom_loop.py", cwd / "custom_loop.py")
    losses = run_custom_loop(str(python), Path(script), cwd, steps=8, env=env)
    assert all(0 < loss < 10 for loss in losses)
