"""The model's own ceiling: the full SMC training step on synthetic data already on the device, per mode.

One step is exactly what `mixtail train` runs (trainer/train.build_training: trainer/step.py's TrainStep over
its Objective, L = logit-adjusted soft CE + η·SMC, backward, SGD with a device lr), for any config, with
no loader: a few fixed batches of random images and labels (B pairs × V views at the config's image size)
sit on the device and the step alternates between them. Modes:

- eager:   train.cuda_graphs=false, train.compile=false;
- graphs:  train.cuda_graphs=true (one CUDA graph per batch kind, trainer/step.py);
- compile: train.compile=true (torch.compile of the model), no graphs.

graphs and compile run only where CUDA is; on the CPU they are skipped and the JSON says why. Before timing,
each mode takes one step from the same initial weights on the same batch, and the graphed step must equal
the eager one (loss parts and the weight/BatchNorm update, within bf16 noise) or nothing is timed; the
compiled step's difference is reported, not enforced. Then `--warmup` steps, and `--windows` timed windows
of `--window-steps` steps each (common.time_fn: CUDA events around each window, no L2 flush: a training
step follows the previous one). The table gives images/s (median, p20/p80 over windows) and ms/step; the
JSON (<out>/step_<gpu-or-cpu>_<yyyymmdd>.json) holds the rows, the resolved config and the environment.

    mixtail bench step --config cifar10_lt_r100                      # ResNet-32, 32 px, 128 pairs x 2 views
    mixtail bench step --config imagenet_lt_rn50 --modes eager graphs   # ResNet-50 at 224 px
    mixtail bench step --config smoke_cpu --model.arch=resnet8 --data.batch_size=8 --windows 2 --window-steps 2
    mixtail bench step --config cifar10_lt_r100 --experts 1 2 3 4 --modes eager graphs   # RIDE's experts

`--experts K...` times one row per number of experts (model.experts) and adds `cost_vs_1_expert`, each row's
ms/step over the same mode's 1-expert row.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mixtail.benchmarks.common import (argument_parser, environment, format_table, nonnegative_int, out_dir_argument,
                                       peak_memory_since, positive_int, reset_peak_memory, summarize, synchronize,
                                       time_fn, write_json)
from mixtail.errors import ConfigError, UsageError

MODES = ("eager", "graphs", "compile")
MODE_TRAIN_KEYS = {"eager": {"cuda_graphs": False, "compile": False},
                   "graphs": {"cuda_graphs": True, "compile": False},
                   "compile": {"cuda_graphs": False, "compile": True}}
# Classes of the datasets a config can name; folder datasets and others need --classes.
DATASET_CLASSES = {"demo": 10, "cifar10": 10, "cifar100": 100, "imagenet_lt": 1000, "inat2018": 8142}
# (loss parts rtol, relative update error) for the graphed-vs-eager check: tests/test_step.py's trajectory test
# allows 2e-2 between graphed and eager bf16 losses; fp32 differs only by atomics and TF32 convolutions.
VERIFY_TOL = {"bf16": (2e-2, 5e-2), "fp32": (1e-3, 1e-2)}
KEYS = ["mode", "arch", "experts", "size_px", "pairs", "views", "precision", "device"]
METRICS = ["images_per_s", "ms_per_step"]


# --------------------------------------------------------------------------------------------------
# Building the step
# --------------------------------------------------------------------------------------------------


def bench_parser(prog: str, doc: str, *, windows: int) -> argparse.ArgumentParser:
    """The options bench step and bench train share: the config, the class count and the timing windows."""
    p = argument_parser(prog, doc)
    p.add_argument("--config", default="cifar10_lt_r100", help="YAML path or bundled config name")
    p.add_argument("--classes", type=positive_int, default=None, help="number of classes of synthetic data "
                   "(default: the dataset's)")
    p.add_argument("--warmup", type=nonnegative_int, default=10,
                   help="steps before timing (after bench step's checked first step)")
    p.add_argument("--windows", type=positive_int, default=windows, help="timed windows")
    p.add_argument("--window-steps", type=positive_int, default=20, help="steps per timed window")
    out_dir_argument(p)
    return p


def split_argv(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Options for the benchmark and `--section.key=value` config overrides, which go to load_config."""
    args, unknown = parser.parse_known_args(argv)
    overrides = [a for a in unknown if a.startswith("--") and "=" in a and "." in a.split("=", 1)[0]]
    rest = [a for a in unknown if a not in overrides]
    if rest:
        raise UsageError(f"unrecognized arguments {rest}; config overrides look like --data.batch_size=64 "
                         f"(see {parser.prog} --help)")
    return args, overrides


def with_mode(cfg, mode: str):
    """The config with the train keys that select `mode`."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **MODE_TRAIN_KEYS[mode]))


def num_classes_for(cfg, classes: int | None) -> int:
    if classes is not None:
        return classes
    if cfg.data.dataset not in DATASET_CLASSES:
        raise ConfigError(f"key 'data.dataset': {cfg.data.dataset!r} has no known class count; give --classes")
    return DATASET_CLASSES[cfg.data.dataset]


def synthetic_counts(num_classes: int, imbalance_ratio: float) -> np.ndarray:
    """Long-tailed class counts (n_max = 1000) for the logit-adjustment prior of a synthetic run."""
    from mixtail.pipelines.sources.subsets import long_tailed_counts

    return np.maximum(long_tailed_counts(1000, num_classes, imbalance_ratio), 1)


def synthetic_batches(cfg, num_classes: int, device: torch.device, count: int = 2, seed: int = 0) -> list:
    """`count` mixed batches shaped like the trainer's: (V·B, 3, S, S) normalized-scale images, labels, λ."""
    from mixtail.pipelines.batch import Batch

    b, v, s = cfg.data.batch_size, cfg.data.num_views, cfg.data.image_size
    lo, hi = cfg.mix.ratio_range
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        images = torch.randn(v * b, 3, s, s, generator=g).to(device)
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        y_f = torch.randint(0, num_classes, (b,), generator=g).to(device)
        y_b = torch.randint(0, num_classes, (b,), generator=g).to(device)
        lam = (lo + (hi - lo) * torch.rand(b, generator=g)).to(device)
        out.append(Batch(images, y_f, y_b, lam))
    return out


def build(cfg, num_classes: int, counts: np.ndarray, device: torch.device):
    """trainer.train.build_training from the run's seed: every mode starts from the same weights."""
    from mixtail.trainer.train import build_training

    torch.manual_seed(cfg.train.seed)
    run = build_training(cfg, num_classes, counts, device)
    run.step.model.train()
    return run


def precision_name(cfg, device: torch.device) -> str:
    from mixtail.trainer.train import autocast_for

    return "bf16" if isinstance(autocast_for(cfg.train.precision, device), torch.autocast) else "fp32"


def loss_impl_name(cfg, device: torch.device) -> str:
    if cfg.loss.eta == 0:
        return "none"
    return cfg.loss.impl if cfg.loss.impl != "auto" else ("triton" if device.type == "cuda" else "reference")


# --------------------------------------------------------------------------------------------------
# One step, compared
# --------------------------------------------------------------------------------------------------


def _state(run) -> dict[str, list[torch.Tensor]]:
    """Host float64 copies of the parameters, the floating buffers (BatchNorm statistics) and the integer ones."""
    model = run.raw_model
    copy = lambda ts: [t.detach().double().cpu().clone() for t in ts]  # noqa: E731
    return {"params": copy(model.parameters()), "buffers": copy(b for b in model.buffers() if b.is_floating_point()),
            "counters": copy(b for b in model.buffers() if not b.is_floating_point())}


def first_step(run, batch, lr: float) -> dict[str, Any]:
    """Take one step; returns its loss parts, the change of every parameter and buffer, and its wall time."""
    before = _state(run)
    synchronize(batch.images.device)
    t0 = time.perf_counter()
    parts = run.step(batch, lr)
    synchronize(batch.images.device)
    seconds = time.perf_counter() - t0
    after = _state(run)
    delta = {k: [a - b for a, b in zip(after[k], before[k])] for k in before}
    return {"parts": parts.double().cpu(), "delta": delta, "seconds": seconds}


def _rel(ref: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(ref, other))
    den = sum(float(x.pow(2).sum()) for x in ref)
    return (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))


def step_difference(ref: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """How far one step is from the reference step: the max relative difference of the loss parts, and
    ‖Δ_other − Δ_ref‖ / ‖Δ_ref‖ of the parameters (update_rel) and of the BatchNorm statistics (buffers_rel);
    the integer buffers (BatchNorm's step counters) must move by exactly the same amount."""
    a, b = ref["parts"], other["parts"]
    da, db = ref["delta"], other["delta"]
    return {"parts_rel": float(((a - b).abs() / a.abs().clamp_min(1e-6)).max()),
            "update_rel": _rel(da["params"], db["params"]), "buffers_rel": _rel(da["buffers"], db["buffers"]),
            "counters_equal": all(torch.equal(x, y) for x, y in zip(da["counters"], db["counters"]))}


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def time_steps(run_step: Callable[[], Any], *, device: torch.device, images_per_step: int, warmup: int,
               windows: int, window_steps: int) -> dict[str, Any]:
    """`warmup` steps, then `windows` timed windows of `window_steps` steps (common.time_fn, no L2 flush).

    images/s p20 is the rate of the 80th-percentile window time, so p20 <= median <= p80 for both units.
    """
    for _ in range(warmup):
        run_step()

    def window() -> None:
        for _ in range(window_steps):
            run_step()

    times = time_fn(window, device=device, reps=windows, warmup=0, flush_l2=False)
    stats = summarize(times)
    per_window = images_per_step * window_steps
    return {"images_per_s": per_window / (stats["median_ms"] / 1e3),
            "images_per_s_p20": per_window / (stats["p80_ms"] / 1e3),
            "images_per_s_p80": per_window / (stats["p20_ms"] / 1e3),
            "ms_per_step": stats["median_ms"] / window_steps,
            "ms_per_step_p20": stats["p20_ms"] / window_steps, "ms_per_step_p80": stats["p80_ms"] / window_steps,
            "windows": stats["reps"], "steps_per_window": window_steps, "images_per_step": images_per_step}


def describe_run(cfg, device: torch.device) -> dict[str, Any]:
    """The key columns every step/train row shares."""
    return {"arch": cfg.model.arch, "experts": cfg.model.experts, "size_px": cfg.data.image_size, "pairs": cfg.data.batch_size,
            "views": cfg.data.num_views, "precision": precision_name(cfg, device), "device": device.type,
            "loss_impl": loss_impl_name(cfg, device)}


def skipped_modes(modes: list[str], device: torch.device) -> dict[str, str]:
    if device.type == "cuda":
        return {}
    reasons = {"graphs": "CUDA graphs need a CUDA device",
               "compile": "timed on CUDA only (a cold torch.compile on the CPU takes 25-40 s on 2 cores, "
                          "and says nothing about the GPU)"}
    return {m: reasons[m] for m in modes if m in reasons}


def bench_modes(cfg, modes: list[str], *, num_classes: int, counts: np.ndarray, device: torch.device, warmup: int,
                windows: int, window_steps: int, log=print) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (one per mode that runs) and the verification record, eager first as the reference."""
    batches = synthetic_batches(cfg, num_classes, device)
    images_per_step = cfg.data.batch_size * cfg.data.num_views
    lr = cfg.optim.lr
    tol_parts, tol_update = VERIFY_TOL[precision_name(cfg, device)]
    ordered = ["eager"] + [m for m in modes if m != "eager"]  # eager is the reference for the check
    reference, rows, verify = None, [], {}
    for mode in ordered:
        base = reset_peak_memory(device)
        run = build(with_mode(cfg, mode), num_classes, counts, device)
        first = first_step(run, batches[0], lr)
        if mode == "eager":
            reference = first
        else:
            diff = step_difference(reference, first)
            ok = (diff["parts_rel"] <= tol_parts and diff["update_rel"] <= tol_update
                  and diff["buffers_rel"] <= tol_update and diff["counters_equal"])
            verify[mode] = {**diff, "tol_parts_rel": tol_parts, "tol_update_rel": tol_update, "within": ok,
                            "enforced": mode == "graphs"}
            log(f"{mode} vs eager, one step from the same weights: loss parts differ by {diff['parts_rel']:.2e} "
                f"(tol {tol_parts:g}), the update by {diff['update_rel']:.2e} and the BatchNorm statistics by "
                f"{diff['buffers_rel']:.2e} (tol {tol_update:g}), step counters "
                f"{'equal' if diff['counters_equal'] else 'DIFFERENT'}")
            if mode == "graphs" and not ok:
                raise RuntimeError(f"the graphed step differs from the eager step ({diff}); not timing a wrong step")
        if mode not in modes:  # eager ran only as the reference
            del run
            continue
        i = [0]

        def run_step() -> None:
            i[0] += 1
            run.step(batches[i[0] % len(batches)], lr)

        stats = time_steps(run_step, device=device, images_per_step=images_per_step, warmup=warmup, windows=windows,
                           window_steps=window_steps)
        peak = peak_memory_since(device, base)
        rows.append({"mode": mode, **describe_run(cfg, device), **stats,
                     "first_step_s": first["seconds"], "peak_MB": None if peak is None else peak / 2**20})
        log(f"  {mode}: {stats['images_per_s']:,.0f} images/s, {stats['ms_per_step']:.2f} ms/step")
        del run
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, verify


TABLE_COLUMNS = ["mode", "arch", "experts", "size_px", "pairs", "views", "precision", "images_per_s",
                 "images_per_s_p20", "images_per_s_p80", "ms_per_step", "cost_vs_1_expert", "first_step_s", "peak_MB"]


def cost_vs_one_expert(rows: list[dict[str, Any]]) -> None:
    """Add each row's ms/step over the same mode's 1-expert row (RIDE's experts: K = 4 should cost well under
    4x, the trunk being shared and the experts' stages narrower), where a 1-expert row was timed."""
    one = {r["mode"]: r["ms_per_step"] for r in rows if r["experts"] == 1}
    for r in rows:
        r["cost_vs_1_expert"] = r["ms_per_step"] / one[r["mode"]] if r["mode"] in one else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from mixtail.trainer.config import config_to_dict, load_config
    from mixtail.trainer.dist import resolve_device

    p = bench_parser("mixtail bench step", __doc__, windows=10)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--experts", nargs="+", type=positive_int, default=None,
                   help="rows for each number of RIDE experts K (model.experts), e.g. 1 2 3 4; default: "
                        "the config's")
    args, overrides = split_argv(p, argv)
    cfg = load_config(args.config, overrides)
    ks = args.experts or [cfg.model.experts]
    device = resolve_device(cfg.train.device)
    num_classes = num_classes_for(cfg, args.classes)
    counts = synthetic_counts(num_classes, cfg.data.imbalance_ratio)
    skipped = skipped_modes(args.modes, device)
    modes = [m for m in args.modes if m not in skipped]
    for mode, why in skipped.items():
        print(f"skipping {mode}: {why}")
    if not modes:
        # An empty results file with exit 0 read as a benchmark that ran: say so and write nothing.
        raise UsageError(f"nothing to time on {device}: " + "; ".join(f"{m}: {why}" for m, why in skipped.items())
                         + " (add --modes eager)")
    print(f"{cfg.model.arch} at {cfg.data.image_size} px, {cfg.data.batch_size} pairs x {cfg.data.num_views} views, "
          f"{num_classes} classes, {precision_name(cfg, device)}, loss {loss_impl_name(cfg, device)}, {device}")
    rows, verify = [], {}
    for k in ks:  # one model per K, each from the run's seed; K = 1 is the single network
        cfg_k = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, experts=k))
        if len(ks) > 1:
            print(f"model.experts={k}:")
        rows_k, verify_k = bench_modes(cfg_k, modes, num_classes=num_classes, counts=counts, device=device,
                                       warmup=args.warmup, windows=args.windows, window_steps=args.window_steps)
        rows += rows_k
        verify.update(verify_k if len(ks) == 1 else {f"{mode}/experts={k}": v for mode, v in verify_k.items()})
    cost_vs_one_expert(rows)
    print()
    print(format_table(rows, TABLE_COLUMNS))
    config = {"bench_args": vars(args), "overrides": overrides, "run_config": config_to_dict(cfg),
              "num_classes": num_classes, "skipped": skipped, "verify": verify, "keys": KEYS, "metrics": METRICS,
              "data": "synthetic batches on the device (no loader)"}
    path = write_json("step", rows, config=config, env=environment({"device": str(device)}), out_dir=args.out)
    print(f"wrote {path}")
    return {"rows": rows, "path": str(path), "skipped": skipped, "verify": verify}


if __name__ == "__main__":
    main(sys.argv[1:])
