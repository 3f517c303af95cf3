"""The one-stage SMC trainer: backbone + classifier + MLP head, L = logit-adjusted soft CE + η·SMC.

    mixtail train                                            # the built-in demo (configs/demo.yaml)
    mixtail train configs/cifar100_lt_r100.yaml --data.root=/data/cifar --data.download=true
    mixtail train configs/cifar100_lt_r100.yaml --resume     # continue from <out_dir>/checkpoint.pt
    torchrun --standalone --nproc_per_node 8 -m mixtail train configs/cifar100_lt_r100.yaml

A run directory (train.out_dir) receives config.yaml (the resolved config), metrics.jsonl (one line per
epoch and per evaluation), checkpoint.pt and the previous train.keep_checkpoints − 1 (checksummed, atomic;
every epoch and every train.checkpoint_every_steps), final_eval.json and per_class_accuracy.png. A run
directory that holds a run is never overwritten silently: pass --resume to continue it or --overwrite to
start again. A resumed run reaches the same final weights as an uninterrupted one: every batch is a
function of (seed, epoch, rank, batch), so nothing but the model, optimizer and position needs saving.
Non-finite losses are detected on the device every step and read where the loop synchronizes anyway
(train.on_nonfinite: stop | skip); a checkpoint is never written from non-finite weights. A signal of
train.stop_signals (SIGTERM, SIGUSR1, Ctrl-C) finishes the step, checkpoints it and ends the run with one line
and exit status 128 + the signal (trainer/stop.py), so a preempted job loses nothing.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mixtail.errors import ConfigError, NonFiniteCheckpointError
from mixtail.pipelines.loader import build_loader, loader_for_dataset
from mixtail.pipelines.sources.build import build_dataset
from mixtail.pipelines.sources.folders import report_skipped
from mixtail.pipelines.sources.subsets import VAL_RECORD, validation_record
from mixtail.pipelines.sampling import foreground_class_probs
from mixtail.trainer.checkpoint import CheckpointStore
from mixtail.trainer.config import RunConfig, config_to_dict, dump_config
from mixtail.trainer.dist import DistInfo, barrier, cleanup, init_distributed
from mixtail.trainer.run_dir import (check_classes, check_resume_config, data_source, holds_run, prepare_run_dir,
                                     run_dir_lock)
from mixtail.trainer.evaluate import evaluate_splits, format_table
from mixtail.trainer.losses import log_prior_vector, mean_mix_ratio, mixed_prior
from mixtail.trainer.models import build_model
from mixtail.trainer.report import plot_per_class
from mixtail.trainer.step import SGD, Health, NonFiniteError, Objective, TrainStep
from mixtail.trainer.stop import StopSignals


def lr_at(optim, step: int, steps_per_epoch: int) -> float:
    """Linear warmup over optim.warmup_epochs (optim.warmup: per step, or one value per epoch), then the
    milestone factors (per epoch)."""
    epoch = step // steps_per_epoch
    if optim.warmup == "per_epoch":
        if epoch + 1 <= optim.warmup_epochs:  # adjust_learning_rate's test: never above lr
            return optim.lr * (epoch + 1) / optim.warmup_epochs
    else:
        warmup_steps = optim.warmup_epochs * steps_per_epoch
        if step < warmup_steps:
            return optim.lr * (step + 1) / warmup_steps
    factor = 1.0
    for milestone, f in zip(optim.milestones, optim.lr_factors):
        if epoch >= milestone:
            factor = f
    return optim.lr * factor


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked, or on 'auto' where the GPU supports it; fp32 otherwise."""
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if use_bf16:
        # No cast cache: a CUDA graph must not capture it (PyTorch's CUDA graph notes), and a CNN uses each
        # weight once per forward anyway.
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def class_priors(cfg: RunConfig, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P_Y, π): the dataset prior and the marginal of the soft labels inside the mixing window (losses.py)."""
    counts = np.asarray(counts, dtype=np.float64)
    p_y = counts / counts.sum()
    q = foreground_class_probs(counts, cfg.data.fg_sampling, cfg.data.fg_gamma)
    return p_y, mixed_prior(counts, q, mean_mix_ratio(cfg.mix), cfg.mix.mix_prob)


def adjustment_prior(cfg: RunConfig, counts: np.ndarray, mixing: bool) -> np.ndarray | None:
    """The prior the CE adjusts by in an epoch: None without logit adjustment; log P_Y (loss.prior=dataset);
    with loss.prior=mixed, π in an epoch whose batches may mix and P_Y in one where no pair is mixed.

    mixing: whether the epoch lies in the mixing window, as the training loader's planner decides it
    (`Loader.mixing_on`): the window is decided there alone, so the prior can never follow another window
    than the batches do."""
    if not cfg.loss.logit_adjust:
        return None
    p_y, pi = class_priors(cfg, counts)
    if cfg.loss.prior == "mixed" and mixing:
        return pi
    return p_y


class RunLog:
    """metrics.jsonl (and, with train.tensorboard, TensorBoard events), written by rank 0 only; on resume
    metrics.jsonl is cut back to the lines the checkpoint had seen."""

    def __init__(self, path: Path, enabled: bool, keep_lines: int | None, tensorboard: bool):
        self.path, self.enabled, self.lines = path, enabled, 0
        self.tb = None
        if not enabled:
            return
        kept = self.path.read_text().splitlines()[:keep_lines] if keep_lines and self.path.exists() else []
        self.path.write_text("".join(line + "\n" for line in kept))
        self.lines = len(kept)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ConfigError(f"key 'train.tensorboard': needs the tensorboard package "
                                  f"(pip install 'mixtail[tensorboard]'): {err}") from None
            self.tb = SummaryWriter(str(path.parent / "tensorboard"), purge_step=None)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.lines += 1
        if self.tb is not None:
            step = record.get("step", 0)
            for key in ("loss", "ce", "smc", "lr", "img_per_s"):
                if key in record:
                    self.tb.add_scalar(f"train/{key}", record[key], step)
            for split, name in (("eval", "eval"), ("val", "val")):
                for key, value in record.get(split, {}).items():
                    if value is not None:
                        self.tb.add_scalar(f"{name}/top1_{key}", value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def resolve_cuda_graphs(cfg: RunConfig, device: torch.device, world_size: int) -> bool:
    """train.cuda_graphs: null means on for a single CUDA process. Graphs are not used under DDP here (its
    gradient all-reduce and the gathered SMC features would have to be captured too)."""
    wanted = cfg.train.cuda_graphs
    if wanted is None:
        return device.type == "cuda" and world_size == 1 and not cfg.train.compile and cfg.train.accumulate_steps == 1
    if wanted and cfg.train.accumulate_steps > 1:
        raise ConfigError("key 'train.cuda_graphs': a graph is one whole step; it cannot accumulate gradients")
    if wanted and device.type != "cuda":
        raise ConfigError("key 'train.cuda_graphs': true needs a CUDA device (train.device)")
    if wanted and world_size > 1:
        raise ConfigError("key 'train.cuda_graphs': not supported under DDP yet; set it to false or null")
    return wanted


def refresh_diversity(objective, cfg: RunConfig, counts: np.ndarray, epoch: int) -> None:
    """Set a multi-expert objective's per-class diversity temperatures for `epoch`, in place (a CUDA graph
    reads the same tensor); a single-expert objective has none."""
    temperatures = getattr(objective, "temperatures", None)
    if temperatures is None:
        return
    from mixtail.trainer.experts import diversity_temperatures

    start = cfg.loss.diversity_reweight_epoch
    t = diversity_temperatures(counts, cfg.loss.diversity_temperature, cfg.loss.diversity_reweight_factor,
                               start is not None and epoch >= start)
    temperatures.copy_(torch.as_tensor(t, dtype=torch.float32))


@dataclass
class Training:
    """What a training process runs, built by `build_training`; the loop reaches the DDP-wrapped forward model
    as step.model, the autocast and the (in place updated) log prior through objective."""

    raw_model: torch.nn.Module  # parameters, state_dict, BatchNorm statistics
    net: torch.nn.Module  # raw_model or its torch.compile wrapper: what evaluation runs
    sgd: SGD
    objective: Objective
    health: Health
    step: TrainStep


def build_training(cfg: RunConfig, num_classes: int, counts: np.ndarray, device: torch.device,
                   world_size: int = 1) -> Training:
    """The model, SGD, objective and step of a run, as `mixtail train` uses them; `mixtail bench step | train`
    time exactly these. The initial weights come from torch's generator: seed it first."""
    raw_model = build_model(cfg.model, num_classes).to(device)
    if cfg.train.sync_batchnorm and world_size > 1:
        if device.type != "cuda":
            raise ConfigError("key 'train.sync_batchnorm': needs CUDA: torch's SyncBatchNorm has no CPU kernel")
        raw_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
    if cfg.train.channels_last:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    net = torch.compile(raw_model) if cfg.train.compile else raw_model
    model = net
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    o = cfg.optim
    sgd = SGD(raw_model.parameters(), momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov)
    prior = adjustment_prior(cfg, counts, mixing=False)  # each epoch then sets its own (Run.begin_epoch)
    objective = Objective(num_classes=num_classes, log_prior=log_prior_vector(prior, device) if prior is not None
                          else None, eta=cfg.loss.eta, tau=cfg.loss.tau, weighting=cfg.loss.weighting,
                          impl=cfg.loss.impl, autocast=autocast_for(cfg.train.precision, device))
    if cfg.model.experts > 1:  # each expert on SMC's objective, plus RIDE's diversity term
        from mixtail.trainer.experts import ExpertsObjective

        objective = ExpertsObjective(objective, cfg.loss.diversity_weight,
                                     torch.zeros(num_classes, dtype=torch.float32, device=device))
        refresh_diversity(objective, cfg, counts, 0)
    health = Health(device)
    step = TrainStep(model, sgd, objective, health=health, skip_nonfinite=cfg.train.on_nonfinite == "skip",
                     cuda_graphs=resolve_cuda_graphs(cfg, device, world_size), state_modules=[raw_model],
                     accumulate=cfg.train.accumulate_steps, graph_loader=cfg.train.graph_loader)
    return Training(raw_model, net, sgd, objective, health, step)


def train(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Train (or resume) the run described by cfg; returns the final evaluation. What `mixtail train` runs.

    The run directory is cfg.train.out_dir (config.yaml, metrics.jsonl, checkpoints, final_eval.json); one
    that already holds a run needs resume=True (continue from its last good checkpoint) or overwrite=True.
    The result has top-1 accuracy in percent for "all", "many", "medium" and "few" classes.

    >>> import tempfile, mixtail
    >>> with tempfile.TemporaryDirectory() as out:
    ...     cfg = mixtail.load_config("smoke_cpu", [f"--train.out_dir={out}", "--train.epochs=1"])
    ...     results = mixtail.train(cfg)  # doctest: +ELLIPSIS
    demo: ...
    >>> {"all", "many", "medium", "few"} <= set(results), bool(0 <= results["all"] <= 100)
    (True, True)
    """
    info = init_distributed(cfg.train.device)
    try:
        with run_dir_lock(Path(cfg.train.out_dir), info):
            return Run(cfg, info, resume=resume, overwrite=overwrite).run()
    finally:
        cleanup()


class Run:
    """One training process's run, from its run directory to the final evaluation. The phases, in order:

    - set-up (__init__): claim the run directory, load the checkpoint to resume (if any), build the loaders and
      the model, restore the position (epoch, batch, step) and the running sums.
    - train_epoch: one epoch's steps, with the progress line, a checkpoint every train.checkpoint_every_steps and
      a stop signal acted on after a whole SGD step.
    - end_epoch: the epoch's metrics line, the evaluation when due, the epoch's checkpoint, a late stop signal.
    - checkpoint, evaluate, stopped (the checkpoint and message of a stop signal): what the epoch phases call.
    - finish: the final evaluation files and table.
    """

    def __init__(self, cfg: RunConfig, info: DistInfo, *, resume: bool, overwrite: bool):
        self.cfg, self.info, self.device = cfg, info, info.device
        self.out_dir = Path(cfg.train.out_dir)
        self.log_line = (lambda msg: tqdm.write(msg)) if info.is_main else (lambda msg: None)
        self.store = CheckpointStore(self.out_dir, keep=cfg.train.keep_checkpoints, log=self.log_line)
        state = self.open_run_dir(resume, overwrite)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        self.build_data()
        if state is not None:  # before the model: other classes would load as an internal error, or silently
            check_classes(state, self.ckpt_path, self.classes, data_source(cfg.data), self.counts,
                          prefix="--resume: ")
        self.training = build_training(cfg, self.num_classes, self.counts, self.device, info.world_size)
        self.steps_per_epoch = len(self.train_loader)
        if cfg.train.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.train.max_steps_per_epoch)
        self.restore(state)
        self.announce(state)
        self.results = None
        self.checkpoint_due = False
        self.images_per_step = cfg.data.batch_size * cfg.data.num_views
        self.saved_step = self.step if state is not None else -1
        self.stop = StopSignals(cfg.train.stop_signals, self.device)

    def run(self) -> dict:
        """Train the remaining epochs, then the final evaluation; returns it."""
        with self.stop:
            for epoch in range(self.start_epoch, self.cfg.train.epochs):
                self.train_epoch(epoch)
                self.end_epoch(epoch)
        return self.finish()

    # --- set-up ---

    def open_run_dir(self, resume: bool, overwrite: bool) -> dict | None:
        """Check and prepare the run directory; with --resume, the checkpoint's state (None: start the run)."""
        out_dir, store, info = self.out_dir, self.store, self.info
        prepare_run_dir(out_dir, store, resume=resume, overwrite=overwrite, is_main=info.is_main)
        barrier()
        state, self.ckpt_path = None, store.latest
        if resume:
            found = store.load_latest(map_location=self.device)
            if found is None and holds_run(out_dir, store):
                raise FileNotFoundError(f"--resume: {out_dir} holds a run (metrics.jsonl) but no checkpoint to "
                                        f"resume; --overwrite starts it again")
            if found is None:
                # Nothing to resume yet: start the run. So one command serves a first attempt and every restart
                # (torchrun --max-restarts; docs/scaling.md), also after a kill before the first checkpoint.
                if info.is_main:
                    started = (out_dir / "config.yaml").exists()
                    print(f"--resume: no checkpoint in {out_dir} yet, starting the run"
                          + (" from scratch (an earlier attempt stopped before its first checkpoint)"
                             if started else ""))
            else:
                self.ckpt_path, state = found
                check_resume_config(self.cfg, state["config"], self.ckpt_path, state["epoch"])
        if info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            store.clean_stale()
            (out_dir / "config.yaml").write_text(dump_config(self.cfg))
        barrier()
        return state

    def build_data(self) -> None:
        """The train, test and (with data.val_per_class) validation loaders, and the training classes."""
        cfg, info, out_dir = self.cfg, self.info, self.out_dir
        loader_kw = dict(rank=info.rank, world_size=info.world_size, device=self.device, seed=cfg.train.seed,
                         channels_last=cfg.train.channels_last)
        self.train_loader = build_loader(cfg.data, cfg.aug, cfg.mix, split="train", num_epochs=cfg.train.epochs,
                                         **loader_kw)
        self.test_loader = build_loader(cfg.data, cfg.aug, cfg.mix, split="test", **loader_kw)
        self.val_loader = None
        if cfg.data.val_per_class:  # held out of the training images: model choices are made here, never on test
            val_set = build_dataset(cfg.data, "val", decoded=False)
            self.val_loader = loader_for_dataset(val_set, cfg.data, cfg.aug, cfg.mix, split="val", **loader_kw)
            if info.is_main:
                record = validation_record(cfg.data, val_set)
                # One key a line: the image lists stay one line each, so the file reads at a glance.
                (out_dir / VAL_RECORD).write_text("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}"
                                                                      for k, v in record.items()) + "\n}\n")
                print(f"validation split: {len(val_set)} images ({cfg.data.val_per_class} per class, "
                      f"data.val_seed={cfg.data.val_seed}) held out of training, listed in {out_dir / VAL_RECORD}")
        if info.is_main:  # the bad files data.on_error=skip left out, named rather than silently missing
            line = report_skipped({"train": self.train_loader.skipped,
                                   "val": self.val_loader.skipped if self.val_loader else (),
                                   "test": self.test_loader.skipped}, out_dir)
            if line:
                print(line, flush=True)
        self.num_classes = self.train_loader.num_classes
        self.counts = self.train_loader.class_counts
        self.classes = list(self.train_loader.classes)

    def restore(self, state: dict | None) -> None:
        """The position, running sums and weights: the checkpoint's, or a fresh run's; then metrics.jsonl."""
        cfg, training = self.cfg, self.training
        self.start_epoch, self.start_batch, self.step = 0, 0, 0
        self.epoch_sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, ce, smc summed over steps
        self.epoch_time, self.extended = 0.0, []
        if state is not None:
            training.raw_model.load_state_dict(state["model"])
            training.sgd.load_state_dict(state["optimizer"])
            self.start_epoch, self.start_batch, self.step = state["epoch"], state["batch"], state["step"]
            self.epoch_sums = state["epoch_sums"].to(self.device)
            self.epoch_time = state["epoch_time"]
            self.extended = list(state.get("extended", []))
            saved_epochs = state["config"]["train"]["epochs"]
            if saved_epochs != cfg.train.epochs:
                self.extended.append({"from_epochs": saved_epochs, "to_epochs": cfg.train.epochs,
                                      "at_epoch": self.start_epoch})
        training.health.sync_step(self.step)
        self.log = RunLog(self.out_dir / "metrics.jsonl", self.info.is_main,
                          state["metrics_lines"] if state else None, cfg.train.tensorboard)
        # (step, epoch, batch, plan) of the last steps, to name the batch of a non-finite loss
        self.recent: deque = deque(maxlen=max(cfg.train.log_every_steps, cfg.train.checkpoint_every_steps or 1) + 1)

    def announce(self, state: dict | None) -> None:
        """The run's one-line summary, and where it resumes."""
        if not self.info.is_main:
            return
        counts = self.counts
        print(f"{self.cfg.data.dataset}: {int(counts.sum())} training images in {self.num_classes} classes "
              f"({int(counts.max())}..{int(counts.min())} per class), {self.steps_per_epoch} steps/epoch, "
              f"device {self.device}, world size {self.info.world_size}"
              + (", CUDA graphs" if self.training.step.cuda_graphs else ""))
        if state is not None:
            print(f"resuming {self.ckpt_path} at epoch {self.start_epoch}, batch {self.start_batch} "
                  f"(step {self.step})")

    # --- one epoch ---

    def begin_epoch(self, epoch: int) -> None:
        """Training mode, the epoch's priors and diversity temperatures, the loader at the epoch's position."""
        cfg, objective = self.cfg, self.training.objective
        self.training.step.model.train()
        if objective.log_prior is not None:
            prior = adjustment_prior(cfg, self.counts, self.train_loader.mixing_on(epoch))
            objective.log_prior.copy_(log_prior_vector(prior, self.device))
        refresh_diversity(objective, cfg, self.counts, epoch)
        self.train_loader.set_epoch(epoch, self.start_batch)

    def train_epoch(self, epoch: int) -> None:
        """The steps of `epoch` from start_batch; the loss and throughput are read every train.log_every_steps."""
        cfg, step_fn = self.cfg.train, self.training.step
        self.begin_epoch(epoch)
        bar = tqdm(total=self.steps_per_epoch, initial=self.start_batch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not self.info.is_main, dynamic_ncols=True, leave=False)
        t_last, steps_since = time.perf_counter(), 0
        batches = iter(self.train_loader)
        for b in range(self.start_batch, self.steps_per_epoch):
            batch = next(batches)
            lr = lr_at(self.cfg.optim, self.step, self.steps_per_epoch)
            parts = step_fn(batch, lr)
            self.recent.append((self.step, epoch, b, batch.plan))
            self.step += 1
            steps_since += 1
            self.epoch_sums += parts.double()
            bar.update(1)
            synced = steps_since == cfg.log_every_steps or b + 1 == self.steps_per_epoch
            if synced:
                self.training.health.check(cfg.on_nonfinite, self.describe)  # synchronizes: the interval is honest
                now = time.perf_counter()
                rate = steps_since * self.images_per_step / (now - t_last)
                self.epoch_time += now - t_last
                bar.set_postfix(loss=f"{float(parts[0]):.3f}", lr=f"{lr:.4g}", img_s=f"{rate:,.0f}")
                t_last, steps_since = now, 0
            if cfg.checkpoint_every_steps and self.step % cfg.checkpoint_every_steps == 0:
                self.checkpoint_due = True
            if self.checkpoint_due and step_fn.pending == 0:  # never between the batches of one accumulated step
                self.checkpoint(epoch, b + 1)
                self.checkpoint_due = False
            # A stop signal is acted on after a whole SGD step: every step alone, where ranks synchronize anyway
            # under DDP (they all reach the same `synced` steps and agree there).
            if step_fn.pending == 0 and (self.info.world_size == 1 or synced):
                sig = self.stop.agreed(sync=self.info.world_size > 1)
                if sig is not None:
                    bar.close()
                    raise self.stopped(sig, epoch, b + 1)
        step_fn.flush()  # a partial accumulation group at the end of the epoch
        self.checkpoint_due = False  # the epoch's own checkpoint follows
        bar.close()
        self.start_batch = 0

    def end_epoch(self, epoch: int) -> None:
        """After the last step of `epoch`: its metrics line, the evaluation when due, its checkpoint."""
        self.log_epoch(epoch)
        last = epoch + 1 == self.cfg.train.epochs
        if (epoch + 1) % self.cfg.train.eval_every_epochs == 0 or last:
            self.evaluate(epoch)
        self.checkpoint(epoch + 1, 0)
        sig = self.stop.agreed(sync=True)  # a signal during the last steps or the evaluation
        if sig is not None and not last:
            raise self.stopped(sig, epoch + 1, 0)

    def log_epoch(self, epoch: int) -> None:
        """The epoch's mean losses, last lr and throughput to metrics.jsonl and the console; resets the sums."""
        sums = (self.epoch_sums / self.steps_per_epoch).tolist()
        record = {"epoch": epoch + 1, "step": self.step, "loss": sums[0], "ce": sums[1], "smc": sums[2],
                  "lr": lr_at(self.cfg.optim, self.step - 1, self.steps_per_epoch), "train_time_s": self.epoch_time,
                  "img_per_s": self.steps_per_epoch * self.images_per_step / max(self.epoch_time, 1e-9)}
        self.log.write(record)
        self.log_line(f"epoch {epoch + 1}: loss {sums[0]:.4f} (ce {sums[1]:.4f}, smc {sums[2]:.4f}), "
                      f"{record['img_per_s']:,.0f} img/s")
        self.epoch_sums.zero_()
        self.epoch_time = 0.0

    # --- checkpoint, evaluate, stop, finish ---

    def describe(self, bad_step: int) -> str:
        """Where a non-finite step was: its epoch, batch and background images when still in `recent`."""
        for s, e, b, plan in self.recent:
            if s == bad_step:
                idx = plan["bg_index"][:8].tolist() if plan is not None else []
                return f"epoch {e}, step {s}, batch {b} (background indices {idx}...)"
        return f"step {bad_step}"

    def checkpoint(self, epoch: int, batch: int) -> None:
        """Save the position (epoch, batch): rank 0 writes it, every rank first checks the losses were finite."""
        training = self.training
        training.health.check(self.cfg.train.on_nonfinite, self.describe)  # never write a non-finite step's weights
        if self.info.is_main:
            state = {"model": training.raw_model.state_dict(), "optimizer": training.sgd.state_dict(),
                     "epoch": epoch, "batch": batch, "step": self.step, "epoch_sums": self.epoch_sums.cpu(),
                     "epoch_time": self.epoch_time, "metrics_lines": self.log.lines,
                     "config": config_to_dict(self.cfg),
                     # Plain data only: checkpoints are read with torch's weights-only unpickler.
                     "class_counts": [int(c) for c in self.counts], "classes": self.classes,
                     "extended": self.extended}
            try:
                self.store.save(state)
            except NonFiniteCheckpointError as err:  # finite losses, but the weights (or BN statistics) blew up
                raise NonFiniteError(f"non-finite model at epoch {epoch}, step {self.step}, batch {batch}: {err}; "
                                     f"the previous checkpoint in {self.out_dir} is kept") from None
        self.saved_step = self.step

    def evaluate(self, epoch: int) -> None:
        """Test (and validation) accuracy after `epoch`, to metrics.jsonl and the console."""
        # Without the DDP wrapper: ranks may see different numbers of test batches.
        self.results = results = self.evaluate_now()
        groups = lambda r: {k: r[k] for k in ("all", "many", "medium", "few")}  # noqa: E731
        self.log.write({"epoch": epoch + 1, "step": self.step, "eval": groups(results),
                        **({"val": groups(results["val"])} if "val" in results else {})})
        self.log_line(f"eval after epoch {epoch + 1}: all {results['all']:.2f}%"
                      + (f" (val {results['val']['all']:.2f}%)" if "val" in results else ""))

    def evaluate_now(self) -> dict:
        """Top-1 accuracy of the current weights on the test split (and the validation split)."""
        return evaluate_splits(self.training.net, self.test_loader, self.val_loader, self.counts, self.device,
                               self.training.objective.autocast)

    def stopped(self, sig, epoch: int, batch: int) -> Exception:
        """After the checkpoint of (epoch, batch): the one-line exception that ends the run."""
        if self.saved_step != self.step:
            self.checkpoint(epoch, batch)
        barrier()  # rank 0's checkpoint is complete before any rank leaves
        self.log.close()
        where = (f"end of epoch {epoch}" if batch == 0
                 else f"epoch {epoch + 1}, batch {batch} of {self.steps_per_epoch}")
        return self.stop.stopped(sig, f"after step {self.step} ({where}); checkpoint {self.store.latest} written: "
                                      f"continue the run with --resume")

    def finish(self) -> dict:
        """The final evaluation (that of the last epoch) to final_eval.json, the per-class plot and the table."""
        if self.results is None:  # resumed a finished run: evaluate its final weights
            self.results = self.evaluate_now()
        results, out_dir = self.results, self.out_dir
        self.log.close()
        if self.info.is_main:
            plot_per_class(results, self.counts, self.classes, out_dir / "per_class_accuracy.png")
            (out_dir / "final_eval.json").write_text(json.dumps(results, indent=1))
            print(format_table(results))
            print(f"run directory: {out_dir}")
        return results
