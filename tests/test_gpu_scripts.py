"""The GPU lease script runs end to end on the CPU at tiny sizes, so the one call a GPU machine gets cannot fail
on a typo: benchmarks/gpu_lease.sh with TINY=1 (every stage, then a lease cut short by its deadline), and its
summary (benchmarks/lease_summary.py) on hand-made stage outputs: a run stopped part-way, the ratio to the
classic loop, the GPU tests' verdict.

    python -m pytest tests/test_gpu_scripts.py -q          # -m "not slow" keeps only the summary's tests
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mixtail.benchmarks import lease_summary

REPO = Path(__file__).resolve().parent.parent


def tiny_jpeg_tar(tmp_path: Path) -> Path:
    """A CIFAR-10-shaped JPEG tree (10 classes, 100 train and 5 test images each, 32 px) as a .tar.gz."""
    rng = np.random.default_rng(0)
    tree = tmp_path / "tree"
    for split, n in (("train", 100), ("test", 5)):
        for k in range(10):
            folder = tree / split / f"class{k}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:04d}.jpg")
    tar = tmp_path / "tiny.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        for split in ("train", "test"):
            t.add(tree / split, arcname=split)
    return tar


def _lease(tmp_path: Path, deadline_s: int) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    env = {**os.environ, "TINY": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", "benchmarks/gpu_lease.sh", str(out), str(tiny_jpeg_tar(tmp_path)), str(deadline_s)],
                         cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    return res, out


def _summary(out: Path) -> dict:
    (path,) = out.glob("gpu_lease_*.json")
    return json.loads(path.read_text())


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="TINY=1 is the CPU rehearsal")
def test_gpu_lease_script_tiny_on_cpu(tmp_path):
    res, out = _lease(tmp_path, 600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = _summary(out)
    stages = {s["stage"]: s for s in summary["config"]["stages"]}
    logs = {name: (out / f"{name}.log").read_text()[-1500:] for name in stages if (out / f"{name}.log").exists()}
    assert {n: s["state"] for n, s in stages.items()} == {
        "tests_gpu": "skipped", "step_r32": "done", "step_experts": "done", "smc_200ep": "done", "smc_report": "done", "classic": "done",
        **{f"run_{n}": "done" for n in ("lace", "smc_mixed", "smc_aa", "ride3")
           if n != "ride3" or (REPO / "configs" / "cifar10_lt_r100_ride3.yaml").exists()}}, logs
    assert summary["config"]["tiny"] is True and summary["config"]["not_run"] == {"tests_gpu": "TINY=1"}
    rows = {r["run"]: r for r in summary["rows"] if "expert_of" not in r}
    assert set(rows) == {"smc_200ep"} | {n for n in stages if n.startswith("run_")}
    # The 3-expert run: its row is the ensemble's, then one row per expert from its final_eval.json.
    if "run_ride3" in rows:
        experts = [r for r in summary["rows"] if r.get("expert_of") == "run_ride3"]
        final = json.loads((out / "run_ride3" / "final_eval.json").read_text())
        assert [r["top1_all"] for r in experts] == [e["all"] for e in final["experts"]] and len(experts) == 3
        assert rows["run_ride3"]["what"] == "SMC, 3 RIDE experts (ensemble)"
        assert rows["run_ride3"]["top1_all"] == final["all"]
    for row in rows.values():
        assert row["finished"] and row["epochs_done"] == 2 and row["schedule"] == "shortened: 2 of 2 epochs"
        assert 0 <= row["top1_all"] <= 100 and row["accuracy_of"] == "final epoch (2)"
    targets = summary["config"]["targets"]
    assert targets["r32_graphs_images_per_s"]["pass"] is None  # graphs need CUDA: no verdict on a CPU
    assert targets["smc_200ep_wall_s"]["pass"] is False  # 2 epochs are not the 200 the target is about
    classic = json.loads(next((out / "classic").glob("classic_*.json")).read_text())["rows"]
    assert [r["workers"] for r in classic] == [0, 2]
    fastest = min(r["extrapolated_s"] for r in classic)
    assert targets["speedup_vs_classic"]["value"] == pytest.approx(fastest / rows["smc_200ep"]["wall_s"])
    assert (out / "smc_200ep" / "report" / "report.json").exists()
    ks = json.loads(next((out / "step_experts").glob("step_*.json")).read_text())["rows"]
    assert [(r["mode"], r["experts"]) for r in ks] == [("eager", k) for k in (1, 2, 3, 4)]
    assert "did not run: tests_gpu" in res.stdout and "TINY=1 CPU rehearsal" in res.stdout
    with tarfile.open(out / "gpu_lease_results.tar.gz") as t:
        names = t.getnames()
    assert any(n.endswith("smc_200ep.log") for n in names) and any(n.endswith("stages.tsv") for n in names)
    assert not any(n.endswith(".pt") for n in names)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="TINY=1 is the CPU rehearsal")
def test_gpu_lease_cut_short_by_its_deadline_keeps_what_finished(tmp_path):
    """A deadline too short for the lease: the stages that ran are summarized, the others listed as not run."""
    res, out = _lease(tmp_path, 25)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = _summary(out)
    stages = {s["stage"]: s for s in summary["config"]["stages"]}
    not_run = summary["config"]["not_run"]
    for name in lease_summary.STAGES:  # every stage is either recorded as it ended or listed as not run
        assert name in stages or name in not_run, (name, stages, not_run)
    runs = [n for n in stages if n.startswith("run_")]
    assert runs and all(stages[n]["state"] == "skipped" for n in runs)
    assert all("deadline" in not_run[n] for n in runs)
    assert "did not run: run_lace" in res.stdout


# --------------------------------------------------------------------------------------------------
# The summary on hand-made stage outputs
# --------------------------------------------------------------------------------------------------


def _run_dir(path: Path, epochs: int, done: int, evals: dict[int, float], final: dict | None) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"train:\n  epochs: {epochs}\n")
    lines = []
    for e in range(1, done + 1):
        lines.append({"epoch": e, "loss": 1.0})
        if e in evals:
            lines.append({"epoch": e, "eval": {"all": evals[e], "many": 1.0, "medium": 2.0, "few": 3.0}})
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"epoch": 9, "lo')
    if final is not None:
        (path / "final_eval.json").write_text(json.dumps(final))
    return path


def test_a_run_stopped_by_the_deadline_reports_its_last_evaluation(tmp_path):
    run = _run_dir(tmp_path / "run_lace", 200, 37, {10: 20.0, 20: 30.0, 30: 40.0}, None)
    row = lease_summary.run_record(run, {"state": "timeout", "wall_s": 95}, "LA-CE")
    assert row["state"] == "timeout" and row["epochs_done"] == 37 and not row["finished"]
    assert row["top1_all"] == 40.0 and row["accuracy_of"] == "last evaluation, epoch 30 (not the final epoch)"
    assert row["schedule"] == "stopped at 37 of 200 epochs"


def test_a_finished_paper_run_and_its_targets(tmp_path):
    final = {"all": 80.5, "many": 90.0, "medium": 75.0, "few": 70.0}
    _run_dir(tmp_path / "smc_200ep", 200, 200, {200: 80.5}, final)
    (tmp_path / "classic").mkdir()
    (tmp_path / "classic" / "classic_x.json").write_text(json.dumps(
        {"rows": [{"workers": 4, "extrapolated_s": 900.0}, {"workers": 16, "extrapolated_s": 600.0}]}))
    (tmp_path / "stages.tsv").write_text("smc_200ep\tdone\t0\t150\t240\t\nclassic\tdone\t0\t40\t90\t\n")
    (tmp_path / "tests_gpu.xml").write_text('<testsuites><testsuite tests="4" failures="1" errors="0" skipped="0">'
                                            '</testsuite></testsuites>')
    s = lease_summary.summarize(tmp_path, tiny=False)
    (row,) = s["rows"]
    assert row["schedule"] == "paper (200 epochs)" and row["top1_all"] == 80.5 and row["accuracy_of"] == "final epoch (200)"
    t = s["targets"]
    assert t["smc_200ep_wall_s"]["pass"] is True and t["smc_200ep_wall_s"]["value"] == 150
    assert t["speedup_vs_classic"]["value"] == pytest.approx(4.0) and t["speedup_vs_classic"]["classic_workers"] == 16
    assert t["speedup_vs_classic"]["pass"] is True
    assert t["graph_tests_pass"]["pass"] is False and t["graph_tests_pass"]["passed"] == 3
    assert set(s["not_run"]) == {"tests_gpu", "step_r32", "step_experts", "smc_report"}  # no stage line: never reached
    assert all(v == "not reached" for v in s["not_run"].values())


def test_over_the_wall_target_or_unfinished_fails(tmp_path):
    _run_dir(tmp_path / "smc_200ep", 200, 200, {}, {"all": 80.0, "many": 1, "medium": 1, "few": 1})
    (tmp_path / "stages.tsv").write_text("smc_200ep\tdone\t0\t181\t240\t\n")
    assert lease_summary.summarize(tmp_path, tiny=False)["targets"]["smc_200ep_wall_s"]["pass"] is False
    other = tmp_path / "b"
    _run_dir(other / "smc_200ep", 200, 120, {}, None)
    (other / "stages.tsv").write_text("smc_200ep\ttimeout\t124\t170\t170\t\n")
    (other / "classic").mkdir()
    (other / "classic" / "classic_x.json").write_text(json.dumps({"rows": [{"workers": 4, "extrapolated_s": 900.0}]}))
    t = lease_summary.summarize(other, tiny=False)["targets"]
    assert t["smc_200ep_wall_s"]["pass"] is False
    assert t["speedup_vs_classic"]["value"] is None and t["speedup_vs_classic"]["pass"] is None
