"""The summary of a GPU lease (benchmarks/gpu_lease.sh): what each stage left in OUT_DIR, read into one JSON and
one table, with PASS or FAIL per target. The lease script runs it after every stage, so a lease cut
short still leaves the stages that finished summarized; it reads only files and never fails on a missing one
(a stage that did not run is listed with the reason).

    python -m mixtail.benchmarks.lease_summary OUT_DIR [--tiny 1]

Writes OUT_DIR/gpu_lease_<gpu-or-cpu>_<yyyymmdd>.json: rows (one per training run: epochs done, wall time,
final-epoch or last evaluated All/Many/Medium/Few, labelled; a multi-expert run's row is its ensemble, followed by
one row per expert marked `expert_of`), config.targets, config.stages, config.not_run.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import yaml

from mixtail.benchmarks.common import environment, format_table, write_json

# The lease's targets (the speed targets of docs/gpu_checks.md, measured in one lease).
GRAPHS_IMAGES_PER_S = 25_000
WALL_200EP_S = 180
CLASSIC_RATIO = 3.0
PAPER_EPOCHS = 200
GROUPS = ("all", "many", "medium", "few")
# The stages in the lease's order, and what each is for (printed beside the ones that did not run).
STAGES = {
    "tests_gpu": "the graphed step and the captured loader (CUDA tests)",
    "step_r32": "bench step, ResNet-32, eager vs graphs",
    "smc_200ep": "the solo 200-epoch SMC run",
    "smc_report": "mixtail eval --report of that run",
    "classic": "the classic loop, extrapolated to 200 epochs",
    "step_experts": "bench step with 1-4 RIDE experts, eager and graphs",
}
RUNS = {"run_lace": "LA-CE", "run_smc_mixed": "SMC + loss.prior=mixed", "run_smc_aa": "SMC + AutoAugment",
        "run_ride3": "SMC, 3 RIDE experts"}


def read_stages(out: Path) -> dict[str, dict[str, Any]]:
    """stages.tsv: name, state (done | failed | timeout | skipped), exit status, wall and cap seconds, note."""
    stages = {}
    path = out / "stages.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, state, rc, wall, cap, note = (line.split("\t") + [""] * 6)[:6]
        stages[name] = {"stage": name, "state": state, "exit": int(rc) if rc.strip() else None,
                        "wall_s": int(wall or 0), "cap_s": int(cap or 0), "note": note}
    return stages


def latest_record(folder: Path) -> dict[str, Any]:
    """The newest benchmark JSON a stage wrote into `folder` ({} if none)."""
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    return json.loads(files[-1].read_text()) if files else {}


def junit_counts(path: Path) -> dict[str, int] | None:
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return total


def run_record(run_dir: Path, stage: dict[str, Any] | None, label: str) -> dict[str, Any]:
    """One training run as it stands: finished (final-epoch accuracy) or not (its last evaluation, if any)."""
    row: dict[str, Any] = {"run": run_dir.name, "what": label, "state": stage["state"] if stage else "running",
                           "wall_s": stage["wall_s"] if stage else None}
    config_path = run_dir / "config.yaml"
    configured = None
    if config_path.exists():
        configured = (yaml.safe_load(config_path.read_text()) or {}).get("train", {}).get("epochs")
    lines = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        for text in metrics.read_text().splitlines():
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError:  # a line cut by the kill
                pass
    done = sum(1 for r in lines if "loss" in r)
    evals = [r for r in lines if "eval" in r]
    final = run_dir / "final_eval.json"
    row.update(epochs=configured, epochs_done=done, finished=final.exists())
    if final.exists():
        result = json.loads(final.read_text())
        row.update({f"top1_{g}": result.get(g) for g in GROUPS}, accuracy_of=f"final epoch ({done})")
        if "val" in result:
            row.update({f"val_{g}": result["val"].get(g) for g in GROUPS})
    elif evals:
        row.update({f"top1_{g}": evals[-1]["eval"].get(g) for g in GROUPS},
                   accuracy_of=f"last evaluation, epoch {evals[-1]['epoch']} (not the final epoch)")
    if final.exists() and "experts" in result:  # a multi-expert run: its top1 is the ensemble's
        row["what"] += " (ensemble)"
    if configured is not None:
        row["schedule"] = ("paper (200 epochs)" if configured == done == PAPER_EPOCHS and final.exists()
                           else f"{'stopped at' if not final.exists() else 'shortened:'} {done} of {configured} epochs")
    return row


def expert_rows(run_dir: Path, row: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per expert of a finished multi-expert run (its final_eval.json "experts"), labelled as such and
    tied to the run's row by `expert_of`; [] for any other run."""
    final = run_dir / "final_eval.json"
    experts = json.loads(final.read_text()).get("experts", []) if final.exists() else []
    base = row["what"].removesuffix(" (ensemble)")
    return [{"run": f"{row['run']}/expert{k + 1}", "what": f"{base}: expert {k + 1} alone", "expert_of": row["run"],
             "state": row["state"], "epochs": row.get("epochs"), "epochs_done": row.get("epochs_done"),
             "finished": True, **{f"top1_{g}": e.get(g) for g in GROUPS}, "accuracy_of": row.get("accuracy_of"),
             "schedule": row.get("schedule")}
            for k, e in enumerate(experts)]


def targets_of(out: Path, stages: dict[str, dict[str, Any]], smc: dict[str, Any] | None) -> dict[str, dict]:
    targets: dict[str, dict[str, Any]] = {}
    tests = junit_counts(out / "tests_gpu.xml")
    if tests is not None:
        targets["graph_tests_pass"] = {"value": f"{tests['passed']} of {tests['tests']} passed", **tests,
                                       "target": "all pass",
                                       "pass": tests["tests"] > 0 and tests["passed"] == tests["tests"]}
    step_record = latest_record(out / "step_r32")
    steps = {r["mode"]: r for r in step_record.get("rows", [])}
    if "eager" in steps:
        targets["r32_eager_images_per_s"] = {"value": steps["eager"]["images_per_s"], "target": "reference",
                                             "pass": None}
    if "graphs" in steps:
        rate = steps["graphs"]["images_per_s"]
        targets["r32_graphs_images_per_s"] = {"value": rate, "target": f">= {GRAPHS_IMAGES_PER_S}",
                                              "pass": rate >= GRAPHS_IMAGES_PER_S}
    elif "step_r32" in stages:
        # bench step skips graphs where there is no CUDA (a CPU rehearsal): that is no verdict on the target.
        why = step_record.get("config", {}).get("skipped", {}).get("graphs")
        targets["r32_graphs_images_per_s"] = {"value": None, "target": f">= {GRAPHS_IMAGES_PER_S}",
                                              "pass": None if why else False,
                                              "note": why or "no graphs row (see step_r32.log)"}
    if smc is not None and smc.get("wall_s") is not None:
        ok = smc["finished"] and smc["epochs_done"] == PAPER_EPOCHS and smc["wall_s"] <= WALL_200EP_S
        targets["smc_200ep_wall_s"] = {"value": smc["wall_s"], "epochs_done": smc["epochs_done"],
                                       "finished": smc["finished"], "target": f"<= {WALL_200EP_S}", "pass": ok}
        if smc.get("top1_all") is not None:
            targets["smc_200ep_top1_all"] = {"value": smc["top1_all"], "of": smc.get("accuracy_of"),
                                             "target": "accuracy", "pass": None}
    classic = [r for r in latest_record(out / "classic").get("rows", []) if r.get("extrapolated_s")]
    if classic:
        fastest = min(classic, key=lambda r: r["extrapolated_s"])
        entry: dict[str, Any] = {"classic_extrapolated_s": fastest["extrapolated_s"], "classic_workers":
                                 fastest["workers"], "classic_label": fastest.get("extrapolated"),
                                 "target": f">= {CLASSIC_RATIO:g}"}
        if smc is not None and smc.get("finished") and smc.get("wall_s"):
            entry["value"] = fastest["extrapolated_s"] / smc["wall_s"]
            entry["pass"] = entry["value"] >= CLASSIC_RATIO
        else:
            entry.update({"value": None, "pass": None, "note": "the SMC run did not finish: no ratio"})
        targets["speedup_vs_classic"] = entry
    return targets


def summarize(out: Path, tiny: bool) -> dict[str, Any]:
    stages = read_stages(out)
    smc = run_record(out / "smc_200ep", stages.get("smc_200ep"), "SMC, default recipe") \
        if (out / "smc_200ep").is_dir() else None
    rows = [smc] if smc else []
    for name, label in RUNS.items():
        if (out / name).is_dir():
            rows.append(run_record(out / name, stages.get(name), label))
            rows += expert_rows(out / name, rows[-1])
    targets = targets_of(out, stages, smc)
    expected = list(STAGES) + [n for n in RUNS if n in stages or (out / n).is_dir()]
    not_run = {n: (stages[n]["note"] or stages[n]["state"]) if n in stages else "not reached"
               for n in expected if n not in stages or stages[n]["state"] == "skipped"}
    config = {"tiny": tiny, "targets": targets, "stages": list(stages.values()), "not_run": not_run,
              "note": ("TINY=1 CPU rehearsal: these numbers test the script and measure nothing" if tiny else
                       "one GPU lease, benchmarks/gpu_lease.sh")}
    path = write_json("gpu_lease", rows, config=config, env=environment({}), out_dir=str(out))
    return {"path": path, "rows": rows, **config}


def _verdict(t: dict[str, Any]) -> str:
    return {True: "PASS", False: "FAIL", None: "info"}[t.get("pass")]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="lease_summary", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--tiny", default="0", help="1: a TINY=1 rehearsal")
    args = p.parse_args(argv)
    s = summarize(Path(args.out), args.tiny == "1")
    if s["tiny"]:
        print(f"** {s['note']} **")
    print(format_table(s["stages"], ["stage", "state", "exit", "wall_s", "cap_s", "note"]))
    print()
    print(format_table([{"target": name, "value": t.get("value"), "wanted": t["target"], "verdict": _verdict(t)}
                        for name, t in s["targets"].items()]))
    if s["rows"]:
        print()
        print(format_table(s["rows"], ["run", "what", "state", "epochs_done", "epochs", "wall_s", "top1_all",
                                       "top1_many", "top1_medium", "top1_few", "accuracy_of"]))
    for name, why in s["not_run"].items():
        print(f"did not run: {name} ({STAGES.get(name) or RUNS.get(name)}): {why}")
    print(f"wrote {s['path']}")


if __name__ == "__main__":
    main(sys.argv[1:])
