"""The run directory: whether it holds a run, the one-process lock on it, preparing it for a new or resumed run,
and what a resumed run (or an evaluation of its checkpoint) must match: the config keys that shape the
trajectory, and the classes.

`mixtail train` (trainer/train.py), the router stage (trainer/router.py), `mixtail eval`
(trainer/checkpoint_eval.py) and the sweep (trainer/sweep.py) share these rules, so each is stated once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from pathlib import Path

from mixtail.errors import ConfigError, DataError
from mixtail.locks import DirectoryLock
from mixtail.pipelines.sources.subsets import VAL_RECORD
from mixtail.trainer.checkpoint import CheckpointStore
from mixtail.trainer.config import (ROUTER_EVAL, ROUTER_FILE, RouterConfig, RunConfig, config_from_dict,
                                    config_to_dict)
from mixtail.trainer.dist import DistInfo

# Keys that do not change a run's trajectory: a resumed run may differ in them (a moved run or data
# directory, other logging). train.epochs may grow (the schedule is recomputed and the checkpoint says so).
RESUME_FREE_KEYS = {
    ("train", "out_dir"), ("train", "eval_every_epochs"), ("train", "log_every_steps"),
    ("train", "checkpoint_every_steps"), ("train", "keep_checkpoints"), ("train", "tensorboard"),
    ("train", "epochs"), ("train", "cuda_graphs"), ("train", "graph_loader"), ("data", "root"),
    ("data", "train_list"), ("data", "test_list"), ("data", "val_list"), ("data", "download"), ("data", "num_threads"),
    ("data", "eval_batch_size"), ("train", "stop_signals"),
    # Stage 2 (the router, trainer/router.py) reads these; stage 1 never does.
    *(("router", f.name) for f in dataclasses.fields(RouterConfig)),
}


def check_resume_config(cfg: RunConfig, saved: dict, path: Path, done_epochs: int) -> None:
    """--resume: refuse a config that would change the trajectory of the run in `path`."""
    saved_cfg = config_from_dict(saved, f"{path} (saved config)")
    mine, theirs = config_to_dict(cfg), config_to_dict(saved_cfg)
    diffs = [f"{s}.{k}: checkpoint {theirs[s][k]!r} vs now {mine[s][k]!r}"
             for s in mine for k in mine[s] if mine[s][k] != theirs[s][k] and (s, k) not in RESUME_FREE_KEYS]
    if diffs:
        raise ConfigError(f"--resume: the config differs from the one {path} was trained with: " + "; ".join(diffs))
    if cfg.train.epochs < done_epochs:
        raise ConfigError(f"--resume: key 'train.epochs': {path} has already trained {done_epochs} epochs, "
                          f"more than train.epochs={cfg.train.epochs}")


def holds_run(out_dir: Path, store: CheckpointStore) -> bool:
    """A checkpoint, or a metrics.jsonl with a line (an epoch done). A run killed before either (in its set-up or
    first steps) left only config.yaml and an empty metrics.jsonl: nothing to lose, so it starts again from
    scratch, with or without --resume."""
    metrics = out_dir / "metrics.jsonl"
    return bool(store.paths()) or (metrics.exists() and metrics.stat().st_size > 0)


def data_source(data, split: str = "train") -> str:
    """Where a split's classes come from, for messages: data.root and the split's list, or the built-in set."""
    lists = {"train": data.train_list, "test": data.test_list}
    parts = [f"data.root={data.root}"] if data.root else []
    if lists.get(split):
        parts.append(f"data.{split}_list={lists[split]}")
    return " ".join(parts) or f"data.dataset={data.dataset}"


def check_classes(state: dict, path: Path, names: list[str], where: str, counts=None, prefix: str = "") -> None:
    """The data's classes must be the checkpoint's: the same names in the same order (label i means the same
    class) and, for training (counts given), the same number of training images each. The first difference is a
    DataError (otherwise a label meaning another class would run on silently). Every mixtail checkpoint holds both
    (since the first trainer); what a checkpoint lacks cannot be compared and is not (the model's shapes are)."""
    def fail(message: str):
        raise DataError(prefix + message)

    saved = list(state.get("classes") or [])
    if saved:
        for i, (theirs, mine) in enumerate(zip(saved, names)):
            if mine != theirs:
                fail(f"class {i} is {theirs!r} in {path} but {mine!r} in {where} (label {i} would mean another "
                     f"class)")
        i = min(len(saved), len(names))  # the first class only one side has
        if len(names) < len(saved):
            fail(f"class {i} is {saved[i]!r} in {path} but {where} has only {len(names)} classes (the checkpoint "
                 f"has {len(saved)})")
        if len(saved) < len(names):
            fail(f"class {i} is {names[i]!r} in {where} but {path} has only {len(saved)} classes")
    saved_counts = state.get("class_counts")
    if counts is None or saved_counts is None:
        return
    saved_counts, counts = [int(c) for c in saved_counts], [int(c) for c in counts]
    if len(saved_counts) != len(counts):
        fail(f"{path} has {len(saved_counts)} classes but {where} has {len(counts)}")
    for i, (theirs, mine) in enumerate(zip(saved_counts, counts)):
        if theirs != mine:
            name = f" {names[i]!r}" if i < len(names) else ""
            fail(f"class {i}{name} has {theirs} training images in {path} but {mine} in {where}: resuming on "
                 f"other training data would change the run")


def prepare_run_dir(out_dir: Path, store: CheckpointStore, *, resume: bool, overwrite: bool, is_main: bool) -> None:
    """A run directory that holds a run needs --resume or --overwrite; --overwrite clears its outputs."""
    holds = holds_run(out_dir, store)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if holds and not (resume or overwrite):
        raise ConfigError(f"run directory {out_dir} already holds a run (checkpoint or metrics.jsonl): pass --resume "
                          f"to continue it, --overwrite to start again, or another --train.out_dir")
    if overwrite and holds and is_main:
        # Everything the run wrote, its stage-2 router included: a router of the old run beside the new run's
        # checkpoint would be read as the new run's.
        for p in store.paths() + [out_dir / n for n in ("metrics.jsonl", "final_eval.json", "per_class_accuracy.png",
                                                        VAL_RECORD, ROUTER_FILE, ROUTER_EVAL)]:
            p.unlink(missing_ok=True)
        shutil.rmtree(out_dir / "tensorboard", ignore_errors=True)


RUN_LOCK = ".mixtail-train.lock"


def run_dir_lock(out_dir: Path, info: DistInfo) -> contextlib.AbstractContextManager:
    """One training process per run directory: two at once would both succeed and mix their metrics and
    checkpoints. Only global rank 0 takes the lock: it alone writes the directory, and on a shared filesystem a
    lock per node would refuse the job's own other nodes. A second job is refused at its rank 0 (torchrun then
    ends its other ranks)."""
    if not info.is_main:
        return contextlib.nullcontext()
    out_dir.mkdir(parents=True, exist_ok=True)
    return DirectoryLock(out_dir / RUN_LOCK, what="mixtail train", where=f"run directory {out_dir}",
                         advice="choose another --train.out_dir")
