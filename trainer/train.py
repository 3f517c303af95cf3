"""The one-stage SMC trainer: backbone + classifier + MLP head, L = logit-adjusted soft CE + η·SMC.

    mixtail train                                            # the built-in demo (configs/demo.yaml)
    mixtail train configs/cifar100_lt_r100.yaml --data.root=/data/cifar --data.download=true
    mixtail train configs/cifar100_lt_r100.yaml --resume     # continue from <out_dir>/checkpoint.pt
    torchrun --standalone --nproc_per_node 8 -m mixtail train configs/cifar100_lt_r100.yaml

A run directory (train.out_dir) receives config.yaml (the resolved config), metrics.jsonl (one line per
epoch and per evaluation), checkpoint.pt (atomic; every epoch and every train.checkpoint_every_steps)
and per_class_accuracy.png. A resumed run reaches the same final weights as an uninterrupted one:
every batch's randomness is a function of (seed, epoch, rank, batch), so nothing but the model,
optimizer and position needs saving.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mixtail.kernels import distributed_smc_loss
from mixtail.pipelines.base import build_loader
from mixtail.trainer.checkpoint import load_checkpoint, save_checkpoint
from mixtail.trainer.config import (ConfigError, RunConfig, apply_overrides, config_from_dict, config_to_dict,
                                    dump_config)
from mixtail.trainer.dist import DistInfo, barrier, cleanup, init_distributed
from mixtail.trainer.evaluate import evaluate, format_table, plot_per_class
from mixtail.trainer.losses import log_class_prior, logit_adjusted_soft_ce
from mixtail.trainer.models import build_model


def lr_at(optim, step: int, steps_per_epoch: int) -> float:
    """Linear warmup over optim.warmup_epochs (per step), then the milestone factors (per epoch)."""
    warmup_steps = optim.warmup_epochs * steps_per_epoch
    if step < warmup_steps:
        return optim.lr * (step + 1) / warmup_steps
    epoch = step // steps_per_epoch
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
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def contrastive_loss(z: torch.Tensor, y_f: torch.Tensor, y_b: torch.Tensor, lam: torch.Tensor, loss_cfg) -> torch.Tensor:
    """SMC over this rank's anchors; under DDP they score against the gathered features of all ranks."""
    return distributed_smc_loss(z, y_f, y_b, lam, tau=loss_cfg.tau, weighting=loss_cfg.weighting, impl=loss_cfg.impl)


class RunLog:
    """metrics.jsonl, written by rank 0 only; truncated to the checkpoint's length on resume."""

    def __init__(self, path: Path, enabled: bool, keep_lines: int | None):
        self.path, self.enabled, self.lines = path, enabled, 0
        if not enabled:
            return
        if keep_lines is None:
            self.path.write_text("")
        else:
            kept = self.path.read_text().splitlines()[:keep_lines] if self.path.exists() else []
            self.path.write_text("".join(line + "\n" for line in kept))
            self.lines = len(kept)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.lines += 1


def _check_resume_config(cfg: RunConfig, saved: dict, path: Path) -> None:
    saved_cfg = config_from_dict(saved, f"{path} (saved config)")
    if saved_cfg != cfg:
        mine, theirs = config_to_dict(cfg), config_to_dict(saved_cfg)
        diffs = [f"{s}.{k}: checkpoint {theirs[s][k]!r} vs now {mine[s][k]!r}"
                 for s in mine for k in mine[s] if mine[s][k] != theirs[s][k]]
        raise ConfigError(f"--resume: the config differs from the one {path} was trained with: " + "; ".join(diffs))


def train(cfg: RunConfig, *, resume: bool = False) -> dict:
    """Train (or resume) the run described by cfg; returns the final evaluation."""
    info = init_distributed(cfg.train.device)
    try:
        return _train(cfg, info, resume)
    finally:
        cleanup()


def _train(cfg: RunConfig, info: DistInfo, resume: bool) -> dict:
    out_dir = Path(cfg.train.out_dir)
    ckpt_path = out_dir / "checkpoint.pt"
    device = info.device
    state = None
    if resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        state = load_checkpoint(ckpt_path, map_location=device)
        _check_resume_config(cfg, state["config"], ckpt_path)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump_config(cfg))
    barrier()

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    loader_kw = dict(rank=info.rank, world_size=info.world_size, device=device, seed=cfg.train.seed)
    train_loader = build_loader(cfg.data, cfg.aug, cfg.mix, split="train", num_epochs=cfg.train.epochs, **loader_kw)
    test_loader = build_loader(cfg.data, cfg.aug, cfg.mix, split="test", **loader_kw)
    num_classes = train_loader.num_classes
    counts = train_loader.class_counts
    classes = list(getattr(train_loader, "classes", [str(k) for k in range(num_classes)]))

    raw_model = build_model(cfg.model, num_classes).to(device)
    if cfg.train.channels_last:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    net = torch.compile(raw_model) if cfg.train.compile else raw_model
    model = net
    if info.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    o = cfg.optim
    optimizer = torch.optim.SGD(raw_model.parameters(), lr=o.lr, momentum=o.momentum,
                                weight_decay=o.weight_decay, nesterov=o.nesterov)
    log_prior = log_class_prior(counts, device) if cfg.loss.logit_adjust else None
    autocast = autocast_for(cfg.train.precision, device)
    steps_per_epoch = len(train_loader)
    if cfg.train.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)

    start_epoch, start_batch, step = 0, 0, 0
    epoch_sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, ce, smc summed over steps
    epoch_time = 0.0
    if state is not None:
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, start_batch, step = state["epoch"], state["batch"], state["step"]
        epoch_sums = state["epoch_sums"].to(device)
        epoch_time = state["epoch_time"]
    log = RunLog(out_dir / "metrics.jsonl", info.is_main, state["metrics_lines"] if state else None)

    def checkpoint(epoch: int, batch: int) -> None:
        if info.is_main:
            save_checkpoint(ckpt_path, {
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": epoch, "batch": batch, "step": step, "epoch_sums": epoch_sums.cpu(),
                "epoch_time": epoch_time, "metrics_lines": log.lines, "config": config_to_dict(cfg),
                "class_counts": np.asarray(counts), "classes": classes,
            })

    if info.is_main:
        print(f"{cfg.data.dataset}: {int(counts.sum())} training images in {num_classes} classes "
              f"({int(counts.max())}..{int(counts.min())} per class), {steps_per_epoch} steps/epoch, "
              f"device {device}, world size {info.world_size}")
        if state is not None:
            print(f"resuming {ckpt_path} at epoch {start_epoch}, batch {start_batch} (step {step})")

    results = None
    images_per_step = cfg.data.batch_size * cfg.data.num_views
    for epoch in range(start_epoch, cfg.train.epochs):
        model.train()
        train_loader.set_epoch(epoch, start_batch)
        bar = tqdm(total=steps_per_epoch, initial=start_batch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                   disable=not info.is_main, dynamic_ncols=True, leave=False)
        t_last, steps_since = time.perf_counter(), 0
        batches = iter(train_loader)
        for b in range(start_batch, steps_per_epoch):
            batch = next(batches)
            lr = lr_at(o, step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast:
                logits, z = model(batch.images)
            v = batch.num_views
            ce = logit_adjusted_soft_ce(logits, batch.soft_targets(num_classes), log_prior)
            smc = contrastive_loss(z.float(), batch.y_f.repeat(v), batch.y_b.repeat(v), batch.lam.repeat(v), cfg.loss)
            loss = ce + cfg.loss.eta * smc
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            steps_since += 1
            epoch_sums += torch.stack([loss.detach(), ce.detach(), smc.detach()]).double()
            bar.update(1)
            if steps_since == cfg.train.log_every_steps or b + 1 == steps_per_epoch:
                now = time.perf_counter()  # .item() below synchronizes, so the interval is honest
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"loss is {loss_value} at epoch {epoch}, step {step}")
                rate = steps_since * images_per_step / (now - t_last)
                epoch_time += now - t_last
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.4g}", img_s=f"{rate:,.0f}")
                t_last, steps_since = now, 0
            if cfg.train.checkpoint_every_steps and step % cfg.train.checkpoint_every_steps == 0:
                checkpoint(epoch, b + 1)
        bar.close()
        start_batch = 0
        sums = (epoch_sums / steps_per_epoch).tolist()
        record = {"epoch": epoch + 1, "step": step, "loss": sums[0], "ce": sums[1], "smc": sums[2],
                  "lr": lr_at(o, step - 1, steps_per_epoch), "train_time_s": epoch_time,
                  "img_per_s": steps_per_epoch * images_per_step / max(epoch_time, 1e-9)}
        log.write(record)
        if info.is_main:
            tqdm.write(f"epoch {epoch + 1}: loss {sums[0]:.4f} (ce {sums[1]:.4f}, smc {sums[2]:.4f}), "
                       f"{record['img_per_s']:,.0f} img/s")
        epoch_sums.zero_()
        epoch_time = 0.0
        last = epoch + 1 == cfg.train.epochs
        if (epoch + 1) % cfg.train.eval_every_epochs == 0 or last:
            # Without the DDP wrapper: ranks may see different numbers of test batches.
            results = evaluate(net, test_loader, counts, device, autocast)
            log.write({"epoch": epoch + 1, "step": step, "eval": {k: results[k] for k in ("all", "many", "medium", "few")}})
            if info.is_main:
                tqdm.write(f"eval after epoch {epoch + 1}: all {results['all']:.2f}%")
        checkpoint(epoch + 1, 0)

    if results is None:  # resumed a finished run: evaluate its final weights
        results = evaluate(net, test_loader, counts, device, autocast)
    if info.is_main:
        plot_per_class(results, counts, classes, out_dir / "per_class_accuracy.png")
        (out_dir / "final_eval.json").write_text(json.dumps(results, indent=1))
        print(format_table(results))
        print(f"run directory: {out_dir}")
    return results


def evaluate_checkpoint(path: str | Path, overrides: list[str] = ()) -> dict:
    """Rebuild the model of a checkpoint and evaluate it on its test set (`mixtail eval`)."""
    state = load_checkpoint(path)
    cfg = apply_overrides(config_from_dict(state["config"], f"{path} (saved config)"), overrides)
    info = init_distributed(cfg.train.device)
    try:
        test_loader = build_loader(cfg.data, cfg.aug, cfg.mix, split="test", rank=info.rank,
                                   world_size=info.world_size, device=info.device, seed=cfg.train.seed)
        counts = np.asarray(state["class_counts"])
        model = build_model(cfg.model, len(counts)).to(info.device)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.load_state_dict(state["model"])
        results = evaluate(model, test_loader, counts, info.device, autocast_for(cfg.train.precision, info.device))
        if info.is_main:
            print(f"{path}: epoch {state['epoch']}, {results['num_test_images']} test images")
            print(format_table(results))
        return results
    finally:
        cleanup()
