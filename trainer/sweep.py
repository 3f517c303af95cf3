"""`mixtail sweep`: a grid of runs of the same trainer, resumable, and one table of their results.

    mixtail sweep cifar100_lt_r100 --set loss.eta=0.05,0.1,0.2 --out runs/eta
    mixtail sweep cifar100_lt_r100 --set mix.ratio_range=[0,1],[0.2,0.8] --set mix.mix_op=resize,crop --jobs 2
    mixtail sweep cifar100_lt_r100 cifar100_lt_r100_ce cifar100_lt_r100_lace cifar100_lt_r100_cmo --out runs/t1
    mixtail sweep smoke_cpu --set loss.eta=0,0.1 --train.epochs=1 --out /tmp/sweep --resume   # finish a sweep

The grid is every CONFIG times the cartesian product of the --set values. A value is YAML, as in a
`--section.key=value` override, and the values of one --set are split on the commas outside brackets and
quotes, so `--set mix.ratio_range=[0,1],[0.2,0.8]` is two values. Overrides given as `--section.key=value`
apply to every run. Each run is its own `mixtail train` process writing its own run directory under --out,
named for what it changes (`loss.eta=0.05`, `mix.ratio_range=0.0_1.0,mix.mix_op=crop`, with the config's name
first when several configs are given). Everything is checked before the first run starts: every grid point's
config, and every run directory already there against the config it should hold.

Runs go one after another, or --jobs N at once. N processes share whatever the runs use: on one GPU they share
its memory and time slices, on the CPU they share the cores, each process getting cores/N threads
(OMP_NUM_THREADS, unless you set it yourself). Resuming: a run directory holding final_eval.json is finished
and never run again; one holding an unfinished run is continued from its checkpoint with --resume (and
refused without it, so nothing is resumed by accident); a missing one is started. So a sweep that was killed
and is started again with --resume runs only what is missing.

The table, sweep.md and sweep.json in --out (rewritten after every run), has one row per run: its overrides,
top-1 All / Many / Medium / Few at the final epoch (final_eval.json), its wall time (the sweep's own clock, over
every attempt it saw end), and the paper's number where the paper has one for exactly that experiment
(`paper_top1`). A failed run is reported with its one-line error and log, the sweep goes on, and `mixtail
sweep` exits with an error naming the failures at the end. Runs with a validation split (data.val_per_class)
also show its All, and `--rank-by val` orders the table by it, marking the column that chose; the rows are
never ranked by the test set, which would be choosing a config on it. The table lists the runs of this sweep's grid
(another grid in the same --out keeps its run directories but not its table). --dry-run lists the runs, the
state of each directory and the paper's number, and runs nothing.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from mixtail.errors import ConfigError, UsageError
from mixtail.lifetime import ENV_VAR
from mixtail.trainer.checkpoint import CheckpointStore
from mixtail.trainer.config import RunConfig, config_from_dict, config_path, config_to_dict, load_config
from mixtail.trainer.run_dir import RESUME_FREE_KEYS

GROUPS = ("all", "many", "medium", "few")

# --------------------------------------------------------------------------------------------------
# The paper's numbers (Jeong & Kim, arXiv 2211.11938), CIFAR-100-LT top-1 %
# --------------------------------------------------------------------------------------------------

# (dataset, ρ, the bundled config of the experiment, the override that makes it or None, top-1 %, where).
# Table 1 compares methods (each is one of our bundled configs); Table 5 changes one key of SMC at ρ = 100;
# Table 6 changes the number of RIDE experts (model.experts).
# BS is balanced softmax, the same loss as LA-CE (configs/cifar100_lt_r*_lace.yaml says why).
PAPER_TOP1 = (
    ("cifar100", 100, "cifar100_lt_r100", None, 48.9, "Table 1: SMC"),
    ("cifar100", 50, "cifar100_lt_r50", None, 52.3, "Table 1: SMC"),
    ("cifar100", 10, "cifar100_lt_r10", None, 62.5, "Table 1: SMC"),
    ("cifar100", 100, "cifar100_lt_r100_cmo", None, 46.6, "Table 1: CMO"),
    ("cifar100", 50, "cifar100_lt_r50_cmo", None, 51.4, "Table 1: CMO"),
    ("cifar100", 10, "cifar100_lt_r10_cmo", None, 62.3, "Table 1: CMO"),
    ("cifar100", 100, "cifar100_lt_r100_ce", None, 38.3, "Table 1: CE"),
    ("cifar100", 50, "cifar100_lt_r50_ce", None, 43.9, "Table 1: CE"),
    ("cifar100", 10, "cifar100_lt_r10_ce", None, 55.7, "Table 1: CE"),
    ("cifar100", 100, "cifar100_lt_r100_lace", None, 38.6, "Table 1: BS"),
    ("cifar100", 50, "cifar100_lt_r50_lace", None, 44.6, "Table 1: BS"),
    ("cifar100", 10, "cifar100_lt_r10_lace", None, 57.1, "Table 1: BS"),
    ("cifar100", 100, "cifar100_lt_r100", "mix.ratio_range=[0.0,1.0]", 48.1, "Table 5: ratio range [0, 1]"),
    ("cifar100", 100, "cifar100_lt_r100", "mix.ratio_range=[0.2,0.8]", 48.9, "Table 5: ratio range [0.2, 0.8]"),
    ("cifar100", 100, "cifar100_lt_r100", "mix.mix_op=crop", 47.6, "Table 5: Crop-SMC"),
    ("cifar100", 100, "cifar100_lt_r100", "mix.mix_op=resize", 48.9, "Table 5: Resizing-SMC"),
    ("cifar100", 100, "cifar100_lt_r100", "mix.aug_order=none", 47.3, "Table 5: no cropping"),
    ("cifar100", 100, "cifar100_lt_r100", "mix.aug_order=after_mix", 47.8, "Table 5: cropping after mixing"),
    ("cifar100", 100, "cifar100_lt_r100", "mix.aug_order=before_mix", 48.9, "Table 5: cropping before mixing"),
    ("cifar100", 100, "cifar100_lt_r100", "loss.weighting=average", 46.7, "Table 5: averaging"),
    ("cifar100", 100, "cifar100_lt_r100", "loss.weighting=assign_larger", 47.1, "Table 5: assigning the larger"),
    ("cifar100", 100, "cifar100_lt_r100", "loss.weighting=weighted", 48.9, "Table 5: weighted summation"),
    ("cifar100", 100, "cifar100_lt_r100", "loss.eta=0.05", 47.0, "Table 5: eta 0.05"),
    ("cifar100", 100, "cifar100_lt_r100", "loss.eta=0.1", 48.9, "Table 5: eta 0.1"),
    ("cifar100", 100, "cifar100_lt_r100", "loss.eta=0.2", 47.2, "Table 5: eta 0.2"),
    # Table 6 (SMC with RIDE's experts); its Many/Medium/Few in the label, as the paper gives them.
    ("cifar100", 100, "cifar100_lt_r100", None, 48.9, "Table 6: 1 expert (Many 61.9, Medium 48.8, Few 33.9)"),
    ("cifar100", 100, "cifar100_lt_r100_ride2", None, 49.6, "Table 6: 2 experts (Many 67.5, Medium 50.9, Few 27.1)"),
    ("cifar100", 100, "cifar100_lt_r100_ride3", None, 50.7, "Table 6: 3 experts (Many 70.5, Medium 50.7, Few 25.8)"),
    ("cifar100", 100, "cifar100_lt_r100_ride4", None, 52.5, "Table 6: 4 experts (Many 71.6, Medium 50.6, Few 32.3)"),
)
PAPER_EPOCHS = 200  # docs/method.md, "Schedules", CIFAR-LT

# Keys that do not make another experiment: where the data and outputs live, logging, the device and its
# numerics, the loader backend (tested equal to the torch one), the loss kernel, the seed.
FREE_KEYS = (RESUME_FREE_KEYS - {("train", "epochs")}) | {
    ("train", "seed"), ("train", "device"), ("train", "precision"), ("train", "channels_last"),
    ("train", "compile"), ("train", "on_nonfinite"), ("data", "backend"), ("data", "test_dir"),
    ("data", "on_error"), ("data", "image_check"), ("loss", "impl"),
}
# Keys of the schedule: a run that differs from the paper only here is the paper's experiment, shortened.
SCHEDULE_KEYS = {("train", "epochs"), ("train", "max_steps_per_epoch"), ("optim", "milestones"),
                 ("optim", "lr_factors"), ("optim", "warmup_epochs")}


@dataclass(frozen=True)
class PaperMatch:
    top1: float
    sources: tuple[str, ...]  # every PAPER_TOP1 entry this run is (they agree: a test says so)
    note: str  # "" on the paper's schedule, else "shortened schedule (...)" or similar


def differences(a: RunConfig, b: RunConfig, ignore: set) -> list[tuple[str, str, Any, Any]]:
    """(section, key, a's value, b's value) for every leaf key where a and b differ, except those in ignore."""
    da, db = config_to_dict(a), config_to_dict(b)
    return [(s, k, da[s][k], db[s][k]) for s in da for k in da[s] if (s, k) not in ignore and da[s][k] != db[s][k]]


@cache
def _paper_config(config: str, override: str | None) -> RunConfig:
    return load_config(config, [f"--{override}"] if override else [])


@cache
def config_keys() -> frozenset:
    d = config_to_dict(RunConfig())
    return frozenset((s, k) for s in d for k in d[s])


def schedule_note(cfg: RunConfig, paper: RunConfig) -> str:
    """'' when cfg runs the paper's schedule, else what differs, e.g. 'shortened schedule (2 of 200 epochs)'."""
    t = cfg.train
    steps = f", {t.max_steps_per_epoch} steps per epoch" if t.max_steps_per_epoch is not None else ""
    if t.epochs < paper.train.epochs or t.max_steps_per_epoch is not None:
        return f"shortened schedule ({t.epochs} of {paper.train.epochs} epochs{steps})"
    if t.epochs > paper.train.epochs:
        return f"longer schedule ({t.epochs} of {paper.train.epochs} epochs)"
    diffs = differences(cfg, paper, {k for k in config_keys() if k not in SCHEDULE_KEYS})
    if diffs:
        return "other lr schedule (" + ", ".join(f"{s}.{k}={v!r}" for s, k, v, _ in diffs) + ")"
    return ""


def paper_top1(cfg: RunConfig) -> PaperMatch | None:
    """The paper's top-1 for the experiment cfg runs, or None where the paper has no number for it.

    cfg is that experiment when it equals the entry's config (with the entry's override) on every key but
    FREE_KEYS and SCHEDULE_KEYS: the same dataset (cifar100: the paper's numbers are for CIFAR-100, an image
    folder cannot be told apart from any other), ρ, method and hyperparameters. A different schedule keeps
    the number and says so in the note.
    """
    ignore = FREE_KEYS | SCHEDULE_KEYS
    found = [(top1, where, _paper_config(config, override))
             for dataset, rho, config, override, top1, where in PAPER_TOP1
             if cfg.data.dataset == dataset and cfg.data.imbalance_ratio == rho
             and not differences(cfg, _paper_config(config, override), ignore)]
    if not found:
        return None
    return PaperMatch(found[0][0], tuple(where for _, where, _ in found), schedule_note(cfg, found[0][2]))


# --------------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------------

_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
_CLOSE = {"[": "]", "{": "}"}


def split_values(text: str, where: str) -> list[str]:
    """Split `v1,v2,...` on the commas outside brackets and quotes: `[0,1],[0.2,0.8]` -> ['[0,1]', '[0.2,0.8]']."""
    values, start, stack, quote = [], 0, [], None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in _CLOSE:
            stack.append(_CLOSE[ch])
        elif ch in "]}":
            if not stack or stack.pop() != ch:
                raise UsageError(f"{where}: unbalanced '{ch}' at character {i + 1} of '{text}'")
        elif ch == "," and not stack:
            values.append(text[start:i])
            start = i + 1
    if quote or stack:
        raise UsageError(f"{where}: unclosed {quote or {']': '[', '}': '{'}[stack[-1]]!r} in '{text}'")
    values.append(text[start:])
    if any(v.strip() == "" for v in values):
        raise UsageError(f"{where}: an empty value in '{text}' (values are separated by commas)")
    return [v.strip() for v in values]


@dataclass(frozen=True)
class Axis:
    key: str  # dotted: loss.eta
    texts: tuple[str, ...]  # the YAML text of each value, as given


def parse_set(text: str) -> Axis:
    """`--set key=v1,v2`: the key and its values (YAML texts; they are checked against the config later)."""
    where = f"--set {text}"
    key, eq, values = text.partition("=")
    if not eq or not _KEY.fullmatch(key.strip()):
        raise UsageError(f"{where}: expected --set section.key=value1,value2,... (e.g. --set loss.eta=0.05,0.1)")
    key = key.strip()
    if key == "train.out_dir":
        raise UsageError(f"{where}: the sweep sets train.out_dir of each run (under --out)")
    return Axis(key, tuple(split_values(values, where)))


@dataclass(frozen=True)
class SweepRun:
    name: str  # also the run directory's name under --out
    config: Path  # the YAML file
    assignments: tuple[tuple[str, Any], ...]  # (dotted key, the value the config holds) for each --set axis
    overrides: tuple[str, ...]  # what `mixtail train` gets besides the config and train.out_dir
    cfg: RunConfig  # resolved, train.out_dir = run_dir
    run_dir: Path
    label: str  # the table's row: the config's name when the sweep has several, then key=value per axis


def value_text(value: Any, brackets: bool = False) -> str:
    """A config value as short text: 0.05, true, null, crop, and lists as 0.2_0.8 (or [0.2, 0.8])."""
    if isinstance(value, (list, tuple)):
        items = [value_text(v) for v in value]
        return "[" + ", ".join(items) + "]" if brackets else "_".join(items)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return repr(value) if isinstance(value, float) else str(value)


def _get(cfg: RunConfig, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def run_name(config_stem: str | None, assignments: tuple[tuple[str, Any], ...]) -> str:
    """A readable, filesystem-safe directory name: `loss.eta=0.05,mix.ratio_range=0.0_1.0`."""
    parts = ([config_stem] if config_stem else []) + [f"{k}={value_text(v)}" for k, v in assignments]
    name = re.sub(r"[^A-Za-z0-9._=+,-]", "_", ",".join(parts)) or "run"
    return "_" + name if name.startswith((".", "-")) else name


def expand_grid(configs: list[str], sets: list[str], common: list[str], out: str | Path) -> list[SweepRun]:
    """Every config times the product of the --set axes, each checked as the config its run will train."""
    out = Path(out)
    if not configs:
        raise UsageError("give at least one CONFIG")
    axes = [parse_set(s) for s in sets]
    keys = [a.key for a in axes]
    for key in keys:
        if keys.count(key) > 1:
            raise UsageError(f"--set {key} is given twice; put all its values in one --set {key}=v1,v2")
        if any(o.lstrip("-").split("=", 1)[0] == key for o in common):
            raise UsageError(f"{key} is both swept (--set) and fixed (--{key}=...); give it once")
    paths = [config_path(c) for c in configs]
    if len(set(paths)) < len(paths):
        raise UsageError("a CONFIG is given twice")
    runs = []
    for path in paths:
        for texts in itertools.product(*(a.texts for a in axes)):
            sets_here = tuple(f"--{k}={t}" for k, t in zip(keys, texts))
            try:
                cfg = load_config(path, [*common, *sets_here])
            except ConfigError as err:
                point = ", ".join(f"{k}={t}" for k, t in zip(keys, texts))
                raise ConfigError(f"sweep run {path.stem}{': ' + point if point else ''}: {err}") from None
            assignments = tuple((k, _get(cfg, k)) for k in keys)
            stem = path.stem if len(paths) > 1 or not axes else None
            name = run_name(stem, assignments)
            label = ", ".join(([stem] if stem else [])
                              + [f"{k}={value_text(v, brackets=True)}" for k, v in assignments])
            run_dir = out / name
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(run_dir)))
            runs.append(SweepRun(name, path, assignments, (*common, *sets_here), cfg, run_dir, label))
    names = [r.name for r in runs]
    for name in names:
        if names.count(name) > 1:
            raise UsageError(f"two runs of the grid would be the same run '{name}': a --set gives the same value "
                             f"twice (as YAML, e.g. 0.1 and 0.10)")
    return runs


# --------------------------------------------------------------------------------------------------
# Run directories: what each holds, and the row it gives
# --------------------------------------------------------------------------------------------------

SWEEP_RECORD = "sweep_run.json"  # per run directory: the sweep's wall clock over the attempts it saw end


def run_state(run: SweepRun) -> str:
    """'done' (final_eval.json), 'checkpoint' (unfinished, resumable), 'started' (unfinished, before its first
    checkpoint: started again) or 'new'."""
    d = run.run_dir
    if (d / "final_eval.json").exists():
        return "done"
    if CheckpointStore(d, keep=run.cfg.train.keep_checkpoints).paths():
        return "checkpoint"
    return "started" if (d / "metrics.jsonl").exists() else "new"


NAME_MAX, PATH_MAX = 255, 4096  # bytes, Linux's limits for one name and a whole path
LONGEST_FILE = 64  # bytes: room for the longest name a run writes inside its directory (temporary checkpoints)


def check_path_lengths(run_dir: Path) -> None:
    """A run directory whose name, or whose files' paths, the filesystem cannot hold would fail only when its
    run started (ENAMETOOLONG after the runs before it had trained): refuse it before the first run."""
    name = os.fsencode(run_dir.name)
    if len(name) > NAME_MAX:
        raise UsageError(f"run directory name {run_dir.name[:60]!r}... is {len(name)} bytes, over the {NAME_MAX} a "
                         f"file name may have: shorten the --set values or the config's name")
    full = len(os.fsencode(os.path.abspath(run_dir))) + 1 + LONGEST_FILE
    if full > PATH_MAX:
        raise UsageError(f"run directory {str(run_dir)[:60]!r}... makes paths of {full} bytes, over the {PATH_MAX} a "
                         f"path may have: choose a shorter --out")


def check_run_dir(run: SweepRun, state: str) -> None:
    """A run directory must hold the run the grid says: its config.yaml against run.cfg. A finished run must
    match in train.epochs too; an unfinished one may be extended (the trainer's --resume allows it)."""
    saved_path = run.run_dir / "config.yaml"
    if state == "new" or not saved_path.exists():
        return
    try:
        saved = config_from_dict(yaml.safe_load(saved_path.read_text()) or {}, str(saved_path))
    except (ConfigError, yaml.YAMLError) as err:
        raise ConfigError(f"{saved_path} cannot be read as a run config ({err}); remove {run.run_dir} or choose "
                          f"another --out") from None
    ignore = RESUME_FREE_KEYS - ({("train", "epochs")} if state == "done" else set())
    diffs = differences(saved, run.cfg, ignore)
    if diffs:
        shown = "; ".join(f"{s}.{k}: there {a!r}, now {b!r}" for s, k, a, b in diffs[:4])
        raise ConfigError(f"run directory {run.run_dir} holds another run ({shown}{'; ...' if len(diffs) > 4 else ''})"
                          f": remove it or choose another --out")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def train_seconds(run_dir: Path) -> float | None:
    """Training time the run logged (metrics.jsonl's train_time_s per epoch; evaluation and startup excluded)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    times = [json.loads(line).get("train_time_s", 0.0) for line in lines if line.strip() and '"loss"' in line]
    return float(sum(times)) if times else None


def make_row(run: SweepRun, status: str, error: str | None = None) -> dict:
    """One table row; the accuracies are copied from the run's final_eval.json."""
    final = _read_json(run.run_dir / "final_eval.json") if status == "done" else None
    paper = paper_top1(run.cfg)
    record = _read_json(run.run_dir / SWEEP_RECORD) or {}
    return {
        "name": run.name, "label": run.label, "config": str(run.config),
        "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in run.assignments},
        "status": status, "run_dir": str(run.run_dir),
        "top1": {g: final.get(g) for g in GROUPS} if final else None,
        "val": {g: final["val"].get(g) for g in GROUPS} if final and "val" in final else None,
        "epochs": run.cfg.train.epochs, "wall_s": record.get("wall_s"), "train_s": train_seconds(run.run_dir),
        "paper": dataclasses.asdict(paper) if paper else None,
        "error": error, "log": str(run.run_dir / "train.log") if error else None,
    }


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


RANK_BY = ("val",)  # the one column a sweep may rank by: never the test set


def ranked(rows: list[dict], rank_by: str | None) -> list[dict]:
    """The rows in grid order, or by validation All (best first; runs without a result last, in grid order)."""
    if rank_by is None:
        return list(rows)
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {RANK_BY} or None, got {rank_by!r}")
    score = lambda r: r["val"]["all"] if r.get("val") and r["val"].get("all") is not None else None  # noqa: E731
    return sorted(rows, key=lambda r: (score(r) is None, -(score(r) or 0.0)))


def format_markdown(rows: list[dict], command: str, rank_by: str | None = None) -> str:
    with_val = any(r.get("val") for r in rows)
    val_head = ["val All ▼ (ranks the rows)" if rank_by == "val" else "val All"] if with_val else []
    order = ("Ranked by the validation split's All (data.val_per_class: images held out of training); the test "
             "columns chose nothing." if rank_by == "val" else
             "Rows in grid order: nothing is ranked" + ("; --rank-by val ranks by the validation split." if with_val
                                                         else "."))
    head = ["run", *val_head, "All", "Many", "Medium", "Few", "epochs", "wall", "paper", "note"]
    lines = [f"# `{command}`", "",
             "Top-1 % on the balanced test set at the final epoch (Many: more than 100 training images, Medium: "
             "20 to 100, Few: fewer than 20). Wall: the sweep's clock over the run's attempts. Paper: Jeong & Kim, "
             "arXiv 2211.11938, where the run is that experiment. " + order, "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ranked(rows, rank_by):
        if r["top1"]:
            acc = ["–" if r["top1"][g] is None else f"{r['top1'][g]:.2f}" for g in GROUPS]
        else:
            acc = [r["status"]] + [""] * 3
        if with_val:
            v = (r.get("val") or {}).get("all")
            acc.insert(0, "–" if v is None else f"{v:.2f}")
        paper = f"{r['paper']['top1']:.1f} ({'; '.join(r['paper']['sources'])})" if r["paper"] else "–"
        note = r["error"] or (r["paper"]["note"] if r["paper"] else "")
        if r["error"]:
            note = f"{note} (log: {r['log']})"
        cells = [r["label"], *acc, str(r["epochs"]), _duration(r["wall_s"]), paper, note.replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_table(rows: list[dict], out: Path, command: str, rank_by: str | None = None) -> None:
    """sweep.md and sweep.json in out (rows ranked as the table shows them)."""
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "sweep.json", json.dumps({"command": command, "rank_by": rank_by,
                                                  "rows": ranked(rows, rank_by)}, indent=1) + "\n")
    _write_atomic(out / "sweep.md", format_markdown(rows, command, rank_by))


# --------------------------------------------------------------------------------------------------
# Running the grid
# --------------------------------------------------------------------------------------------------


def _error_line(log: Path, returncode: int) -> str:
    """The trainer's one-line error from the end of its log, or how the process ended."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            tail = f.read().decode(errors="replace")
    except OSError:
        tail = ""
    lines = [line.strip() for line in re.split(r"[\r\n]", tail) if line.strip().startswith("mixtail train: ")]
    if lines:
        return lines[-1]
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    if returncode == 0:
        return "exited without writing final_eval.json"
    return f"exited with status {returncode}"


class Sweep:
    """Runs SweepRuns (up to `jobs` at once), prints one line per start and end, keeps the table current."""

    def __init__(self, runs: list[SweepRun], out: Path, *, jobs: int = 1, resume: bool = False,
                 command: str = "mixtail sweep", log=None, rank_by: str | None = None):
        if rank_by == "val":
            without = [r.name for r in runs if not r.cfg.data.val_per_class]
            if without:
                raise UsageError(f"--rank-by val ranks by the validation split, and {len(without)} run(s) have none "
                                 f"(e.g. {without[0]}): add --data.val_per_class=K to every run")
        self.runs, self.out, self.jobs, self.resume, self.rank_by = runs, Path(out), jobs, resume, rank_by
        self.command, self._log = command, log or _print_line
        self._log_lock = threading.Lock()
        self.rows: list[dict | None] = [None] * len(runs)
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.stopping = False

    def plan(self, dry_run: bool = False) -> list[str]:
        """Each run's state; refuses (before anything runs) run directories whose names the filesystem cannot
        hold, directories that hold another run, and unfinished runs without --resume (a dry run lists them)."""
        for run in self.runs:
            check_path_lengths(run.run_dir)
        states = [run_state(r) for r in self.runs]
        for run, state in zip(self.runs, states):
            check_run_dir(run, state)
        unfinished = [r.name for r, s in zip(self.runs, states) if s in ("checkpoint", "started")]
        if unfinished and not self.resume and not dry_run:
            raise UsageError(f"{len(unfinished)} run(s) in {self.out} are unfinished (e.g. {unfinished[0]}): pass "
                             f"--resume to continue them, or choose another --out")
        return states

    def run(self) -> list[dict]:
        states = self.plan()
        n = len(self.runs)
        for i, (run, state) in enumerate(zip(self.runs, states)):
            self.rows[i] = make_row(run, "done" if state == "done" else "pending")
            if state == "done":
                self.log(f"[{i + 1}/{n}] skip    {run.label}: finished earlier: {_result_text(self.rows[i])}")
        self._write()
        todo = [(i, s) for i, s in enumerate(states) if s != "done"]
        pool = ThreadPoolExecutor(max_workers=self.jobs)
        try:
            for future in [pool.submit(self._one, i, s) for i, s in todo]:
                future.result()
        finally:  # also on Ctrl-C or an error: start nothing more, stop what runs, keep the table current
            pool.shutdown(wait=False, cancel_futures=True)
            with self.lock:
                self.stopping = True
                for p in self.procs:
                    p.terminate()
            pool.shutdown(wait=True)
            self._write()
        return list(self.rows)

    def log(self, line: str) -> None:
        with self._log_lock:  # whole lines: two runs ending at once must not interleave their output
            self._log(line)

    def _write(self) -> None:
        with self.lock:
            write_table([r for r in self.rows if r is not None], self.out, self.command, self.rank_by)

    def _env(self) -> dict:
        # The child dies with this process, even by SIGKILL, instead of training on as an orphan (mixtail/lifetime.py).
        env = {**os.environ, "PYTHONUNBUFFERED": "1", ENV_VAR: str(os.getpid())}
        if self.jobs > 1 and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.jobs))
        return env

    def _one(self, i: int, state: str) -> None:
        run, n = self.runs[i], len(self.runs)
        flag = {"checkpoint": ["--resume"], "started": ["--overwrite"]}.get(state, [])
        cmd = [sys.executable, "-m", "mixtail", "train", str(run.config), *run.overrides,
               f"--train.out_dir={run.run_dir}", *flag]
        run.run_dir.mkdir(parents=True, exist_ok=True)
        log_path = run.run_dir / "train.log"
        how = {"checkpoint": "resume", "started": "restart"}.get(state, "start")
        self.log(f"[{i + 1}/{n}] {how:<7} {run.label} (log: {log_path})")
        t0 = time.perf_counter()
        with open(log_path, "a") as log:
            log.write(f"\n$ {shlex.join(cmd)}\n")
            log.flush()
            with self.lock:
                if self.stopping:
                    return
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env())
                self.procs.add(proc)
            returncode = proc.wait()
            with self.lock:
                self.procs.discard(proc)
        wall = time.perf_counter() - t0
        record = _read_json(run.run_dir / SWEEP_RECORD) or {}
        _write_atomic(run.run_dir / SWEEP_RECORD, json.dumps(
            {"wall_s": record.get("wall_s", 0.0) + wall, "attempts": record.get("attempts", 0) + 1}) + "\n")
        if returncode == 0 and (run.run_dir / "final_eval.json").exists():
            row = make_row(run, "done")
            self.log(f"[{i + 1}/{n}] done    {run.label}: {_result_text(row)} in {_duration(wall)}")
        else:
            status = "interrupted" if self.stopping else "failed"  # stopped by the sweep, or failed by itself
            row = make_row(run, status, _error_line(log_path, returncode))
            self.log(f"[{i + 1}/{n}] {status.upper()} {run.label}: {row['error']} (log: {log_path})")
        self.rows[i] = row
        self._write()


def _print_line(line: str) -> None:
    sys.stdout.write(line + "\n")  # one write per line (print writes the newline separately)
    sys.stdout.flush()


def _result_text(row: dict) -> str:
    t = row["top1"]
    text = ", ".join(f"{g} {'–' if t[g] is None else format(t[g], '.2f')}" for g in GROUPS)
    if row.get("val") and row["val"].get("all") is not None:
        text = f"val all {row['val']['all']:.2f}; test {text}"
    if row["paper"]:
        text += f" (paper {row['paper']['top1']:.1f}{', ' + row['paper']['note'] if row['paper']['note'] else ''})"
    return text
