"""Evaluation: top-1 on the test set, All and by shot group (Many > 100, Medium 20-100, Few < 20 training
images), per-class accuracy, and the per-class plot a run leaves behind.

    mixtail eval runs/demo/checkpoint.pt
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from mixtail.pipelines.datasets import shot_groups
from mixtail.trainer.dist import all_reduce_sum


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, train_counts: np.ndarray, device: torch.device,
             autocast: contextlib.AbstractContextManager | None = None) -> dict:
    """Top-1 over the test loader (sharded over ranks, summed across them); prediction is argmax f(x)."""
    num_classes = len(train_counts)
    correct = torch.zeros(num_classes, dtype=torch.float64, device=device)
    total = torch.zeros(num_classes, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    loader.set_epoch(0)
    for batch in loader:
        with autocast or contextlib.nullcontext():
            logits, _ = model(batch.images)
        hit = (logits.argmax(1) == batch.y_f).double()
        correct.index_add_(0, batch.y_f, hit)
        total.index_add_(0, batch.y_f, torch.ones_like(hit))
    model.train(was_training)
    correct, total = all_reduce_sum(correct).cpu().numpy(), all_reduce_sum(total).cpu().numpy()
    return accuracy_summary(correct, total, train_counts)


def accuracy_summary(correct: np.ndarray, total: np.ndarray, train_counts: np.ndarray) -> dict:
    """All / Many / Medium / Few top-1 (%) from per-class hit counts; a group with no classes is None."""
    per_class = np.where(total > 0, correct / np.maximum(total, 1), np.nan)
    out = {"all": 100.0 * correct.sum() / max(total.sum(), 1)}
    for name, classes in shot_groups(train_counts).items():
        t = total[classes].sum()
        out[name] = 100.0 * correct[classes].sum() / t if len(classes) and t > 0 else None
    out["per_class"] = [None if np.isnan(a) else float(100.0 * a) for a in per_class]
    out["group_sizes"] = {k: int(len(v)) for k, v in shot_groups(train_counts).items()}
    out["num_test_images"] = int(total.sum())
    return out


def format_table(results: dict) -> str:
    """An aligned All/Many/Medium/Few table; empty groups show as '-'."""
    cols = ["all", "many", "medium", "few"]
    sizes = results.get("group_sizes", {})
    head = ["", "All"] + [f"{c.capitalize()} ({sizes.get(c, '?')} cls)" for c in cols[1:]]
    vals = ["top-1 %"] + ["-" if results[c] is None else f"{results[c]:.2f}" for c in cols]
    widths = [max(len(h), len(v)) for h, v in zip(head, vals)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), line(vals)])


def plot_per_class(results: dict, train_counts: np.ndarray, classes: list[str], path: str | Path) -> None:
    """Per-class test accuracy (bars) against training count (line, log scale), classes sorted by count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(train_counts)
    order = np.argsort(-counts, kind="stable")
    acc = np.array([np.nan if a is None else a for a in results["per_class"]])[order]
    colours = {"many": "#1f77b4", "medium": "#ff7f0e", "few": "#d62728"}
    group_of = {}
    for name, idx in shot_groups(counts).items():
        for k in idx:
            group_of[int(k)] = name
    fig, ax = plt.subplots(figsize=(max(6.0, min(0.12 * len(counts), 20.0)), 4.0), dpi=120)
    x = np.arange(len(counts))
    ax.bar(x, acc, width=0.9, color=[colours[group_of[int(k)]] for k in order])
    ax.set_ylabel("test top-1 (%)")
    ax.set_ylim(0, 100)
    ax.set_xlabel("classes, sorted by training images")
    if len(counts) <= 30:
        ax.set_xticks(x, [classes[k] for k in order], rotation=60, ha="right", fontsize=7)
    else:
        ax.set_xticks([])
    twin = ax.twinx()
    twin.plot(x, counts[order], color="black", linewidth=1.2)
    twin.set_yscale("log")
    twin.set_ylabel("training images (log)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    ax.legend(handles, [f"{g} ({'-' if results[g] is None else f'{results[g]:.1f}%'})" for g in colours],
              loc="upper right", fontsize=8)
    ax.set_title(f"Per-class accuracy: all {results['all']:.1f}%")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
