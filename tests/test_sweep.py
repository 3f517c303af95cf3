"""Tests of trainer/sweep.py (`mixtail sweep`): the grid, its checks, the paper's numbers, the baseline configs,
and real sweeps of the smoke_cpu config on the CPU (sequential, --jobs 2, resumed, with a failing run).

    python -m pytest tests/test_sweep.py -q
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers.checks import cli_error_line
from helpers.train_hooks import SimulatedCrash, wrap_train_loader
from mixtail import cli
from mixtail.errors import ConfigError, UsageError
from mixtail.trainer.config import dump_config, load_config
from mixtail.trainer.sweep import (PAPER_TOP1, differences, expand_grid, paper_top1, parse_set, run_name,
                                   split_values)
from mixtail.trainer.train import train

REPO = Path(__file__).resolve().parent.parent
# The smallest real runs: one optimizer step of 8 pairs per epoch, one evaluation at the end.
TINY = ["--train.epochs=1", "--train.max_steps_per_epoch=1", "--data.batch_size=8", "--train.eval_every_epochs=2"]


def _sweep(*args: str, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixtail", "sweep", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, **kw)


_one_line = functools.partial(cli_error_line, "sweep")  # stderr is one `mixtail sweep: error:` line


def _table(out: Path) -> tuple[dict, list[str]]:
    """sweep.json, and the data rows of sweep.md."""
    rows = [line for line in (out / "sweep.md").read_text().splitlines() if line.startswith("| ")]
    return json.loads((out / "sweep.json").read_text()), rows[1:]  # the first `| ` line is the header


def _check_row_is_its_run(row: dict) -> None:
    """A row's numbers are its own run's final_eval.json, and its overrides are what that run trained with."""
    run_dir = Path(row["run_dir"])
    final = json.loads((run_dir / "final_eval.json").read_text())
    assert row["top1"] == {g: final[g] for g in ("all", "many", "medium", "few")}
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    for key, value in row["overrides"].items():
        section, name = key.split(".")
        assert saved[section][name] == value, (key, saved[section][name], value)


# --------------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,values", [
    ("0.05,0.1", ["0.05", "0.1"]),
    ("[0,1],[0.2,0.8]", ["[0,1]", "[0.2,0.8]"]),
    ("[0, 1], [0.2, 0.8]", ["[0, 1]", "[0.2, 0.8]"]),
    ("[[1,2],[3]],{a: 1, b: [2,3]},x", ["[[1,2],[3]]", "{a: 1, b: [2,3]}", "x"]),
    ("'a,b',\"c,[d\",e", ["'a,b'", "\"c,[d\"", "e"]),
    ("crop", ["crop"]),
])
def test_split_values_at_bracket_depth_zero(text, values):
    assert split_values(text, "here") == values


@pytest.mark.parametrize("text,fragment", [
    ("[0,1", "unclosed '['"), ("0,1]", "unbalanced ']'"), ("[0,1},2", "unbalanced '}'"), ("'a,b", "unclosed"),
    ("0,,1", "empty value"), ("", "empty value"), ("0.1,", "empty value"),
])
def test_split_values_names_the_malformed_text(text, fragment):
    with pytest.raises(UsageError, match=re.escape(fragment)) as info:
        split_values(text, "--set k.x=" + text)
    assert f"--set k.x={text}" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("text,fragment", [
    ("loss.eta", "expected --set section.key=value1"), ("eta=0.1", "expected --set"), ("=0.1", "expected --set"),
    ("loss.eta=[0,1", "unclosed"), ("train.out_dir=a,b", "sets train.out_dir"),
])
def test_malformed_set_is_a_usage_error_naming_it(text, fragment):
    with pytest.raises(UsageError, match=re.escape(fragment)) as info:
        parse_set(text)
    assert f"--set {text}" in str(info.value)


def test_grid_is_the_product_with_yaml_values(tmp_path):
    runs = expand_grid(["smoke_cpu"], ["mix.ratio_range=[0,1],[0.2,0.8]", "loss.eta=0.05,0.1,0.2"],
                       ["--train.epochs=1"], tmp_path)
    assert len(runs) == 6
    got = [(r.cfg.mix.ratio_range, r.cfg.loss.eta) for r in runs]
    assert got == [(rr, eta) for rr in [(0.0, 1.0), (0.2, 0.8)] for eta in (0.05, 0.1, 0.2)]
    assert runs[0].name == "mix.ratio_range=0.0_1.0,loss.eta=0.05"
    assert runs[0].label == "mix.ratio_range=[0.0, 1.0], loss.eta=0.05"
    for r in runs:
        assert r.run_dir == tmp_path / r.name and r.cfg.train.out_dir == str(r.run_dir)
        assert r.cfg.train.epochs == 1  # the common override reaches every run
        assert r.cfg == load_config("smoke_cpu", list(r.overrides) + [f"--train.out_dir={r.run_dir}"])
    assert len({r.name for r in runs}) == 6


def test_several_configs_and_no_set(tmp_path):
    runs = expand_grid(["smoke_cpu", "demo"], ["loss.eta=0,0.1"], [], tmp_path)
    assert [r.name for r in runs] == ["smoke_cpu,loss.eta=0.0", "smoke_cpu,loss.eta=0.1", "demo,loss.eta=0.0",
                                      "demo,loss.eta=0.1"]
    assert runs[2].cfg.model.arch == "resnet8" and runs[2].cfg.train.epochs == 30  # demo's own values
    (single,) = expand_grid(["smoke_cpu"], [], [], tmp_path)
    assert single.name == "smoke_cpu"
    assert single.cfg == load_config("smoke_cpu", [f"--train.out_dir={tmp_path}/smoke_cpu"])


def test_run_names_are_filesystem_safe():
    name = run_name(None, (("data.root", "../a b/c"), ("mix.ratio_range", (0.0, 1.0)),
                           ("train.max_steps_per_epoch", None)))
    assert name == "data.root=.._a_b_c,mix.ratio_range=0.0_1.0,train.max_steps_per_epoch=null"
    assert re.fullmatch(r"[A-Za-z0-9._=+,-]+", name)
    assert run_name(None, (("loss.logit_adjust", False),)) == "loss.logit_adjust=false"


@pytest.mark.parametrize("sets,common,error,fragment", [
    (["loss.etaa=0.1,0.2"], [], ConfigError, "unknown key 'loss.etaa'"),
    (["loss.eta=0.1,-1"], [], ConfigError, "key 'loss.eta': must be >= 0"),
    (["mix.ratio_range=[0,1],[0.9,0.1]"], [], ConfigError, "mix.ratio_range=[0.9,0.1]"),
    (["mix.mix_op=resize,paste"], [], ConfigError, "'mix.mix_op'"),
    (["loss.eta=0.1", "loss.eta=0.2"], [], UsageError, "--set loss.eta is given twice"),
    (["loss.eta=0.1,0.2"], ["--loss.eta=0.3"], UsageError, "loss.eta is both swept"),
    (["loss.eta=0.1,0.10"], [], UsageError, "the same run 'loss.eta=0.1'"),
    (["loss.eta=0.1"], ["--loss.tauu=1"], ConfigError, "unknown key 'loss.tauu'"),
])
def test_bad_grid_is_one_line_naming_the_key(tmp_path, sets, common, error, fragment):
    with pytest.raises(error) as info:
        expand_grid(["smoke_cpu"], sets, common, tmp_path)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert not list(tmp_path.iterdir())  # nothing is created before every point is checked


def test_cli_errors_are_one_line(tmp_path, capsys):
    def error(*argv: str) -> str:
        with pytest.raises(SystemExit) as info:
            cli.main(["sweep", *argv])
        assert info.value.code == 2
        return capsys.readouterr().err

    _one_line(error("smoke_cpu", "--set", "loss.etaa=0,1", "--out", str(tmp_path / "s")), "unknown key 'loss.etaa'")
    _one_line(error("smoke_cpu", "--set", "mix.ratio_range=[0,1,[0.2,0.8]", "--out", str(tmp_path / "s")),
              "--set mix.ratio_range=[0,1,[0.2,0.8]", "unclosed '['")
    _one_line(error("smoke_cpu", "--jobs", "0"), "--jobs must be at least 1")
    _one_line(error("smoke_cpu", "--bogus"), "unrecognized arguments ['--bogus']")
    assert not (tmp_path / "s").exists()
    assert "mixtail sweep CONFIG" in cli.__doc__


# --------------------------------------------------------------------------------------------------
# The paper's numbers
# --------------------------------------------------------------------------------------------------


def _paper(config: str, *overrides: str):
    return paper_top1(load_config(config, list(overrides)))


@pytest.mark.parametrize("config,overrides,top1,source", [
    ("cifar100_lt_r100", [], 48.9, "Table 1: SMC"),
    ("cifar100_lt_r50", [], 52.3, "Table 1: SMC"),
    ("cifar100_lt_r10", [], 62.5, "Table 1: SMC"),
    ("cifar100_lt_r100_cmo", [], 46.6, "Table 1: CMO"),
    ("cifar100_lt_r10_cmo", [], 62.3, "Table 1: CMO"),
    ("cifar100_lt_r50_ce", [], 43.9, "Table 1: CE"),
    ("cifar100_lt_r100_lace", [], 38.6, "Table 1: BS"),
    ("cifar100_lt_r100", ["--mix.ratio_range=[0,1]"], 48.1, "Table 5: ratio range [0, 1]"),
    ("cifar100_lt_r100", ["--mix.mix_op=crop"], 47.6, "Table 5: Crop-SMC"),
    ("cifar100_lt_r100", ["--mix.aug_order=none"], 47.3, "Table 5: no cropping"),
    ("cifar100_lt_r100", ["--mix.aug_order=after_mix"], 47.8, "Table 5: cropping after mixing"),
    ("cifar100_lt_r100", ["--loss.weighting=average"], 46.7, "Table 5: averaging"),
    ("cifar100_lt_r100", ["--loss.weighting=assign_larger"], 47.1, "Table 5: assigning the larger"),
    ("cifar100_lt_r100", ["--loss.eta=0.05"], 47.0, "Table 5: eta 0.05"),
    ("cifar100_lt_r100", ["--loss.eta=0.2"], 47.2, "Table 5: eta 0.2"),
    ("cifar100_lt_r100", ["--loss.eta=0.1", "--mix.ratio_range=[0.2,0.8]"], 48.9, "Table 5: eta 0.1"),
    ("cifar100_lt_r100_ride2", [], 49.6, "Table 6: 2 experts (Many 67.5, Medium 50.9, Few 27.1)"),
    ("cifar100_lt_r100_ride3", [], 50.7, "Table 6: 3 experts (Many 70.5, Medium 50.7, Few 25.8)"),
    ("cifar100_lt_r100_ride4", [], 52.5, "Table 6: 4 experts (Many 71.6, Medium 50.6, Few 32.3)"),
    ("cifar100_lt_r100", ["--model.experts=3"], 50.7, "Table 6: 3 experts (Many 70.5, Medium 50.7, Few 25.8)"),
    ("cifar100_lt_r100_ride4", ["--model.experts=1"], 48.9, "Table 6: 1 expert (Many 61.9, Medium 48.8, Few 33.9)"),
    # Keys that do not make another experiment: the data's place, the seed, the device, the backend, logging.
    ("cifar100_lt_r100", ["--data.root=/elsewhere", "--train.seed=3", "--train.device=cpu", "--data.backend=dali",
                          "--train.precision=fp32", "--train.out_dir=x", "--loss.impl=reference"],
     48.9, "Table 1: SMC"),
])
def test_paper_number_where_the_run_is_that_experiment(config, overrides, top1, source):
    match = _paper(config, *overrides)
    assert match is not None and match.top1 == top1 and source in match.sources
    assert match.note == ""


def test_the_default_run_is_every_entry_it_matches():
    match = _paper("cifar100_lt_r100")
    assert set(match.sources) == {"Table 1: SMC", "Table 5: ratio range [0.2, 0.8]", "Table 5: Resizing-SMC",
                                  "Table 5: cropping before mixing", "Table 5: weighted summation", "Table 5: eta 0.1",
                                  "Table 6: 1 expert (Many 61.9, Medium 48.8, Few 33.9)"}


@pytest.mark.parametrize("config,overrides", [
    ("cifar10_lt_r100", []),  # the paper has no CIFAR-10-LT numbers
    ("cifar10_lt_r100_cmo", []),
    ("cifar100_lt_r100", ["--loss.eta=0.3"]),  # not a value the paper ran
    ("cifar100_lt_r100", ["--loss.eta=0.05", "--mix.mix_op=crop"]),  # two changes: no such experiment
    ("cifar100_lt_r100", ["--optim.lr=0.05"]),
    ("cifar100_lt_r100", ["--data.imbalance_ratio=20"]),
    ("cifar100_lt_r50", ["--loss.eta=0.05"]),  # Table 5 is at ρ = 100 only
    ("cifar100_lt_r100", ["--data.dataset=folder"]),  # an image folder could be anything
    ("cifar100_lt_r100", ["--data.fg_sampling=class"]),
    ("cifar100_lt_r100", ["--loss.prior=mixed"]),
    ("cifar100_lt_r100", ["--aug.policy=autoaugment"]),
    ("cifar100_lt_r100_cmo", ["--data.num_views=2"]),
    ("cifar100_lt_r100_ce", ["--aug.color_prob=0.8"]),
    ("demo", []),
    ("cifar10_lt_r100_ride3", []),  # Table 6 is CIFAR-100-LT only
    ("cifar100_lt_r100_ride3", ["--loss.diversity_weight=0"]),  # not RIDE's diversity weight
    ("cifar100_lt_r100", ["--model.experts=5"]),
])
def test_no_paper_number_for_another_experiment(config, overrides):
    assert _paper(config, *overrides) is None


def test_the_experiment_is_the_config_not_its_name():
    # CE with logit adjustment is LA-CE, i.e. the paper's BS, whichever file it started from.
    match = _paper("cifar100_lt_r100_ce", "--loss.logit_adjust=true")
    assert match.sources == ("Table 1: BS",) and match.top1 == 38.6


@pytest.mark.parametrize("overrides,note", [
    (["--train.epochs=2"], "shortened schedule (2 of 200 epochs)"),
    (["--train.max_steps_per_epoch=5"], "shortened schedule (200 of 200 epochs, 5 steps per epoch)"),
    (["--train.epochs=20", "--optim.milestones=[16,18]"], "shortened schedule (20 of 200 epochs)"),
    (["--train.epochs=400"], "longer schedule (400 of 200 epochs)"),
    (["--optim.milestones=[120,160]"], "other lr schedule (optim.milestones=[120, 160])"),
    (["--optim.warmup_epochs=0"], "other lr schedule (optim.warmup_epochs=0.0)"),
    ([], ""),
])
def test_schedule_label(overrides, note):
    match = _paper("cifar100_lt_r100", "--loss.eta=0.05", *overrides)
    assert match.top1 == 47.0 and match.note == note


def test_paper_table_is_consistent():
    for dataset, rho, config, override, top1, where in PAPER_TOP1:
        cfg = load_config(config, [f"--{override}"] if override else [])
        assert (cfg.data.dataset, cfg.data.imbalance_ratio, cfg.train.epochs) == (dataset, rho, 200), config
        match = paper_top1(cfg)
        # Entries that are the same experiment give the same number (the defaults of Table 5 are Table 1's SMC).
        assert match.top1 == top1 and where in match.sources, (where, match)


# --------------------------------------------------------------------------------------------------
# The baseline configs are what their headers say
# --------------------------------------------------------------------------------------------------

_VIEWS = {("data", "num_views"): 1, ("aug", "color_prob"): 0.0, ("aug", "grayscale_prob"): 0.0}
# LDAM-DRW's and CMO's cifar_train.py where it differs from our defaults: per-epoch warmup, fan-in Kaiming
# initialization, the partial last batch kept, their normalization.
_THEIR_CODE = {("optim", "warmup"): "per_epoch", ("model", "init"): "fan_in", ("data", "drop_last"): False,
               ("data", "mean"): [0.4914, 0.4822, 0.4465], ("data", "std"): [0.2023, 0.1994, 0.2010]}
BASELINE_DELTAS = {  # the keys each baseline changes from the SMC config of the same dataset and ρ
    "ce": {**_VIEWS, **_THEIR_CODE, ("mix", "mix_prob"): 0.0, ("loss", "eta"): 0.0, ("loss", "logit_adjust"): False},
    "lace": {**_VIEWS, **_THEIR_CODE, ("mix", "mix_prob"): 0.0, ("loss", "eta"): 0.0},
    "cmo": {**_VIEWS, **_THEIR_CODE, ("mix", "mix_op"): "crop", ("mix", "ratio_range"): [0.0, 1.0],
            ("mix", "box"): "clipped", ("mix", "box_per"): "batch", ("loss", "eta"): 0.0},
}


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
@pytest.mark.parametrize("rho", [100, 50, 10])
@pytest.mark.parametrize("method", ["ce", "lace", "cmo"])
def test_baseline_configs_change_only_their_method(dataset, rho, method):
    smc = load_config(f"{dataset}_lt_r{rho}")
    base = load_config(f"{dataset}_lt_r{rho}_{method}")
    assert (smc.data.dataset, smc.data.imbalance_ratio) == (dataset, rho)
    diffs = {(s, k): b for s, k, _, b in differences(smc, base, {("train", "out_dir")})}
    assert diffs == BASELINE_DELTAS[method]
    assert base.train.out_dir == f"runs/{dataset}_lt_r{rho}_{method}"
    if method == "cmo":  # CMO's choices that are also SMC's defaults (configs/*_cmo.yaml, naver-ai/cmo)
        assert base.data.fg_sampling == "instance" and base.data.fg_gamma == 1.0
        assert (base.mix.mix_prob, base.mix.mix_per, base.mix.alpha) == (0.5, "batch", 1.0)
        assert [e for e in range(200) if base.mix.active(e, 200)] == list(range(4, 197))
        assert base.loss.logit_adjust and base.loss.prior == "dataset"
    # docs/method.md, "Schedules": 200 epochs, lr 0.1, wd 2e-4, warmup 5, x0.01 at 160, x1e-4 at 180.
    o = base.optim
    assert (base.train.epochs, o.lr, o.weight_decay, o.momentum, o.warmup_epochs) == (200, 0.1, 2e-4, 0.9, 5.0)
    assert (o.milestones, o.lr_factors, base.data.batch_size) == ((160, 180), (0.01, 0.0001), 128)


# --------------------------------------------------------------------------------------------------
# Real sweeps on the CPU
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sequential_2x2_grid_writes_the_table(tmp_path):
    out = tmp_path / "sweep"
    res = _sweep("smoke_cpu", "--set", "mix.ratio_range=[0,1],[0.2,0.8]", "--set", "train.seed=0,1", *TINY,
                 "--out", str(out))
    assert res.returncode == 0, res.stderr
    data, md_rows = _table(out)
    rows = data["rows"]
    assert len(rows) == 4 and len(md_rows) == 4
    assert [r["overrides"] for r in rows] == [{"mix.ratio_range": rr, "train.seed": s}
                                             for rr in ([0.0, 1.0], [0.2, 0.8]) for s in (0, 1)]
    for row, md in zip(rows, md_rows):
        assert row["status"] == "done" and row["wall_s"] > 0 and row["train_s"] > 0 and row["paper"] is None
        _check_row_is_its_run(row)
        cells = [c.strip() for c in md.strip("|").split("|")]
        assert cells[0] == row["label"]
        assert cells[1:5] == [f"{row['top1'][g]:.2f}" for g in ("all", "many", "medium", "few")]
    starts = [line for line in res.stdout.splitlines() if "] start " in line]
    dones = [line for line in res.stdout.splitlines() if "] done " in line]
    assert len(starts) == 4 and len(dones) == 4
    # Sequential: each run ends before the next starts.
    lines = [line for line in res.stdout.splitlines() if "] start " in line or "] done " in line]
    assert [("start" if "] start " in line else "done") for line in lines] == ["start", "done"] * 4


@pytest.mark.slow
def test_jobs_2_runs_at_once(tmp_path):
    out = tmp_path / "sweep"
    res = _sweep("smoke_cpu", "--set", "loss.eta=0,0.1", *TINY, "--out", str(out), "--jobs", "2")
    assert res.returncode == 0, res.stderr
    events = [("start" if "] start " in line else "done") for line in res.stdout.splitlines()
              if "] start " in line or "] done " in line]
    assert events[:2] == ["start", "start"] and events.count("done") == 2  # both started before either ended
    rows = _table(out)[0]["rows"]
    assert [r["overrides"] for r in rows] == [{"loss.eta": 0.0}, {"loss.eta": 0.1}]
    for row in rows:
        _check_row_is_its_run(row)



@pytest.mark.slow
def test_resume_after_a_kill_runs_only_what_is_missing(tmp_path, monkeypatch):
    """One run finished, one killed after its first epoch's checkpoint, one never started: the sweep refuses to
    go on without --resume, then skips the finished run, resumes the killed one and starts the missing one."""
    out = tmp_path / "sweep"
    args = ["smoke_cpu", "--set", "loss.eta=0,0.1,0.2", "--train.epochs=2", *TINY[1:], "--out", str(out)]
    finished, killed, missing = expand_grid(["smoke_cpu"], ["loss.eta=0,0.1,0.2"], ["--train.epochs=2", *TINY[1:]],
                                            out)
    train(finished.cfg)
    batches = []

    def crash_in_epoch_2(batch):
        batches.append(batch)
        if len(batches) == 2:
            raise SimulatedCrash

    with monkeypatch.context() as m:
        wrap_train_loader(m, crash_in_epoch_2)
        with pytest.raises(SimulatedCrash):
            train(killed.cfg)
    assert (killed.run_dir / "checkpoint.pt").exists() and not (killed.run_dir / "final_eval.json").exists()
    finished_stamp = (finished.run_dir / "final_eval.json").stat().st_mtime_ns

    res = _sweep(*args)
    assert res.returncode == 2
    _one_line(res.stderr, "1 run(s)", "unfinished", killed.name, "--resume")
    assert not missing.run_dir.exists()

    res = _sweep(*args, "--resume")
    assert res.returncode == 0, res.stderr
    assert re.search(rf"\[1/3\] skip +{re.escape(finished.label)}: finished earlier", res.stdout), res.stdout
    assert re.search(rf"\[2/3\] resume +{re.escape(killed.label)}", res.stdout), res.stdout
    assert re.search(rf"\[3/3\] start +{re.escape(missing.label)}", res.stdout), res.stdout
    assert (finished.run_dir / "final_eval.json").stat().st_mtime_ns == finished_stamp
    assert not (finished.run_dir / "train.log").exists()  # never launched
    assert "resuming" in (killed.run_dir / "train.log").read_text()
    epochs = lambda d: [json.loads(x)["epoch"] for x in (d / "metrics.jsonl").read_text().splitlines()  # noqa: E731
                        if '"loss"' in x]
    assert epochs(killed.run_dir) == [1, 2]  # epoch 1 from before the kill, epoch 2 resumed
    rows = _table(out)[0]["rows"]
    assert [r["status"] for r in rows] == ["done"] * 3
    for row in rows:
        _check_row_is_its_run(row)

    res = _sweep(*args, "--resume")  # all finished: nothing runs
    assert res.returncode == 0 and res.stdout.count("finished earlier") == 3 and "] start " not in res.stdout


def test_a_finished_run_of_another_config_is_not_reused(tmp_path):
    out = tmp_path / "sweep"
    (run,) = expand_grid(["smoke_cpu"], ["loss.eta=0.1"], TINY, out)
    train(run.cfg)
    res = _sweep("smoke_cpu", "--set", "loss.eta=0.1", *TINY, "--optim.lr=0.05", "--out", str(out), "--resume")
    assert res.returncode == 2
    _one_line(res.stderr, "holds another run", "optim.lr: there 0.1, now 0.05")


@pytest.mark.slow
def test_a_failed_run_is_reported_and_the_sweep_goes_on(tmp_path):
    out = tmp_path / "sweep"
    res = _sweep("smoke_cpu", "--set", "data.dataset=folder,demo", "--data.root=/nonexistent/tree", *TINY,
                 "--out", str(out))
    assert res.returncode == 2
    line = _one_line(res.stderr, "1 of 2 runs failed", "data.dataset=folder", "mixtail train: error:",
                     "/nonexistent/tree")
    assert str(out / "data.dataset=folder" / "train.log") in line
    assert re.search(r"\[1/2\] FAILED data.dataset=folder: mixtail train: error: .*\(log: ", res.stdout)
    rows = _table(out)[0]["rows"]
    assert [r["status"] for r in rows] == ["failed", "done"]
    assert "/nonexistent/tree" in rows[0]["error"] and rows[0]["top1"] is None
    _check_row_is_its_run(rows[1])
    assert "| failed |" in (out / "sweep.md").read_text()


@pytest.mark.slow
def test_a_killed_sweep_process_finishes_only_what_is_missing(tmp_path):
    """SIGKILL the whole sweep (its process group) while its second run trains; --resume finishes it."""
    out = tmp_path / "sweep"
    args = ["smoke_cpu", "--set", "loss.eta=0,0.1", "--train.epochs=3", *TINY[1:], "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "mixtail", "sweep", *args], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first, second = out / "loss.eta=0.0", out / "loss.eta=0.1"
    deadline = time.monotonic() + 240
    while not (second / "metrics.jsonl").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (first / "final_eval.json").exists() and not (second / "final_eval.json").exists()
    stamp = (first / "final_eval.json").stat().st_mtime_ns
    res = _sweep(*args, "--resume")
    assert res.returncode == 0, res.stderr
    assert "finished earlier" in res.stdout and (first / "final_eval.json").stat().st_mtime_ns == stamp
    assert re.search(r"\[2/2\] (resume|restart) ", res.stdout), res.stdout
    for row in _table(out)[0]["rows"]:
        _check_row_is_its_run(row)


def _processes_training_into(run_dir: Path) -> list[int]:
    """Pids of live (not zombie) processes whose command line trains into run_dir (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and f"--train.out_dir={run_dir}".encode() in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's prctl")
def test_sigkill_of_the_sweep_alone_takes_its_running_child_with_it(tmp_path):
    """Only the sweep is SIGKILLed (no handler of its own runs, its process group is left alone): the child
    must not train on as an orphan. It gets SIGTERM from the kernel, and --resume sees its run."""
    out = tmp_path / "sweep"
    args = ["smoke_cpu", "--train.epochs=200", *TINY[1:], "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "mixtail", "sweep", *args], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (run_dir,) = [out / "smoke_cpu"]
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    children = _processes_training_into(run_dir)
    assert proc.poll() is None and children, "the sweep's run did not start"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 60
    while _processes_training_into(run_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_training_into(run_dir) == [], "the child outlived the sweep"
    res = _sweep(*args, "--resume", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert re.match(r"(checkpoint|started) ", res.stdout), res.stdout


def test_a_run_directory_name_too_long_is_refused_before_the_first_run(tmp_path, capsys):
    """A name over 255 bytes trained the runs before it, then stopped with ENAMETOOLONG."""
    from mixtail.trainer.sweep import Sweep

    out = tmp_path / "s"
    runs = expand_grid(["smoke_cpu"], ["data.root=short," + "x" * 300], [], out)
    with pytest.raises(UsageError, match=r"run directory name 'data\.root=x+'\.\.\. is 310 bytes, over the 255"):
        Sweep(runs, out).plan()  # what run() does first
    with pytest.raises(SystemExit) as info:
        cli.main(["sweep", "smoke_cpu", "--set", "data.root=short," + "x" * 300, "--out", str(out)])
    assert info.value.code == 2 and "over the 255" in capsys.readouterr().err
    assert not out.exists()
    deep = Path(tmp_path, *["d" * 250] * 17)  # each name fits, the whole path does not
    with pytest.raises(UsageError, match="over the 4096 a path may have"):
        Sweep(expand_grid(["smoke_cpu"], [], [], deep), deep).plan()


def test_dry_run_lists_an_unfinished_run_instead_of_refusing(tmp_path, capsys):
    """`sweep --dry-run` with an unfinished run lists it instead of stopping with "pass --resume"."""
    out = tmp_path / "s"
    runs = expand_grid(["smoke_cpu"], ["loss.eta=0.1,0.2"], [], out)
    runs[0].run_dir.mkdir(parents=True)
    (runs[0].run_dir / "config.yaml").write_text(dump_config(runs[0].cfg))
    (runs[0].run_dir / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit) as info:
        cli.main(["sweep", "smoke_cpu", "--set", "loss.eta=0.1,0.2", "--out", str(out), "--dry-run"])
    printed = capsys.readouterr()
    assert info.value.code == 0, printed.err
    assert printed.out.splitlines()[:2] == [f"started    {runs[0].run_dir}", f"new        {runs[1].run_dir}"]
    with pytest.raises(SystemExit) as info:  # without --dry-run it still asks for --resume
        cli.main(["sweep", "smoke_cpu", "--set", "loss.eta=0.1,0.2", "--out", str(out)])
    assert info.value.code == 2 and "pass --resume" in capsys.readouterr().err
