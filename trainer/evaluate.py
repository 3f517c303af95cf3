"""Evaluation: top-1 on the test set, All and by shot group (Many > 100, Medium 20-100, Few < 20 training
images), per-class accuracy, post-hoc logit shifts, pooled backbone features for the class centres of
docs/method.md, "Feature-space scores", and the per-class plot a run leaves behind.

    mixtail eval runs/demo/checkpoint.pt

    results = evaluate(model, test_loader, counts, device)                    # the table's numbers
    results = evaluate(model, test_loader, counts, device, return_outputs=True,
                       logit_shift=torch.stack([t * log_ratio for t in (0.5, 1.0)]))
    results["shifted"][1]["all"]; results["outputs"].preds                     # same forward pass
    centres, n = feature_centres(model, train_loader_unmixed, num_classes, device)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from mixtail.pipelines.sources.subsets import shot_groups
from mixtail.trainer.dist import all_reduce_sum


@dataclass(frozen=True)
class EvalOutputs:
    """What `evaluate(..., return_outputs=True)` saw on *this rank's* shard of the test set, in loader order.

    Under DDP each rank holds only its own samples (accuracies are all-reduced, these are not).
    labels, preds: (N,) int64; logits: (N, C) float32, unshifted; shifted_preds: (S, N) int64, the argmax
    after each of the S logit shifts (S = 0 without a shift).
    """

    labels: np.ndarray
    preds: np.ndarray
    logits: np.ndarray
    shifted_preds: np.ndarray


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no autograd inside; the caller's train/eval mode back afterwards, even on an error."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _start(loader: Iterable) -> Iterable:
    # A Loader (set_epoch fixes its order) or any iterable of Batch, e.g. a list in the tests.
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(0)
    return loader


def _shift_rows(logit_shift: torch.Tensor | None, num_classes: int, device: torch.device) -> torch.Tensor:
    """The shifts as (S, C) float32 on the device; S = 0 without one."""
    if logit_shift is None:
        return torch.zeros(0, num_classes, device=device)
    shift = torch.as_tensor(logit_shift, dtype=torch.float32).to(device)
    if shift.ndim == 1:
        shift = shift[None]
    if shift.ndim != 2 or shift.shape[1] != num_classes:
        raise ValueError(f"logit_shift must be (C,) or (S, C) with C = {num_classes} classes, "
                         f"got shape {tuple(logit_shift.shape)}")
    return shift


def evaluate(model: torch.nn.Module, loader, train_counts: np.ndarray, device: torch.device,
             autocast: contextlib.AbstractContextManager | None = None, *,
             logit_shift: torch.Tensor | None = None, return_outputs: bool = False) -> dict:
    """Top-1 over the test loader (sharded over ranks, summed across them); prediction is argmax f(x).

    logit_shift: a (C,) or (S, C) tensor added to the float32 logits before the argmax, e.g. the post-hoc
    adjustment T·log(P_Y/π) for several T. The headline numbers stay unshifted; `results["shifted"]` holds
    one accuracy summary per shift row, from the same forward pass.
    return_outputs: add `results["outputs"]`, an EvalOutputs of this rank's labels, predictions and logits
    (not JSON; drop it before dumping the results).
    """
    num_classes = len(train_counts)
    shifts = _shift_rows(logit_shift, num_classes, device)
    num_shifts = shifts.shape[0]
    num_experts = getattr(model, "num_experts", 1)
    # Row 0: unshifted; row 1 + s: shift s; then one row per expert of a multi-expert model (its
    # row 0 is the ensemble, the mean of the experts' logits). One all-reduce for all of them.
    correct = torch.zeros(1 + num_shifts + (num_experts if num_experts > 1 else 0), num_classes,
                          dtype=torch.float64, device=device)
    total = torch.zeros(num_classes, dtype=torch.float64, device=device)
    kept: dict[str, list[torch.Tensor]] = {"labels": [], "preds": [], "logits": [], "shifted": []}
    with _eval_mode(model):
        for batch in _start(loader):
            with autocast or contextlib.nullcontext():
                logits, _ = model(batch.images)
            # float32 before the shift: bf16 has too few bits to hold a small shift on a large logit.
            logits = logits.float()
            expert_preds = logits.new_zeros(0, logits.shape[-2], dtype=torch.long)
            if logits.ndim == 3:  # (K, B, C): each expert's prediction, then the ensemble's
                expert_preds = logits.argmax(2)
                logits = logits.mean(0)
            preds = torch.cat([logits.argmax(1)[None], (logits[None] + shifts[:, None]).argmax(2)])  # (1+S, B)
            hit = (torch.cat([preds, expert_preds]) == batch.y_f[None]).double()
            correct.index_add_(1, batch.y_f, hit)
            total.index_add_(0, batch.y_f, torch.ones_like(hit[0]))
            if return_outputs:
                kept["labels"].append(batch.y_f.cpu())
                kept["preds"].append(preds[0].cpu())
                kept["logits"].append(logits.cpu())
                kept["shifted"].append(preds[1:].cpu())
    correct, total = all_reduce_sum(correct).cpu().numpy(), all_reduce_sum(total).cpu().numpy()
    results = accuracy_summary(correct[0], total, train_counts)
    if num_shifts:
        results["shifted"] = [accuracy_summary(correct[1 + s], total, train_counts) for s in range(num_shifts)]
    if num_experts > 1:
        results["experts"] = [accuracy_summary(correct[1 + num_shifts + k], total, train_counts)
                              for k in range(num_experts)]
    if return_outputs:
        results["outputs"] = _outputs(kept, num_classes, num_shifts)
    return results


def evaluate_splits(model: torch.nn.Module, test_loader, val_loader, train_counts: np.ndarray, device: torch.device,
                    autocast: contextlib.AbstractContextManager | None = None) -> dict:
    """`evaluate` on the test loader, with `results["val"]` from the validation loader when there is one."""
    results = evaluate(model, test_loader, train_counts, device, autocast)
    if val_loader is not None:
        results["val"] = evaluate(model, val_loader, train_counts, device, autocast)
    return results


def _outputs(kept: dict[str, list[torch.Tensor]], num_classes: int, num_shifts: int) -> EvalOutputs:
    if not kept["labels"]:  # an empty shard
        empty = np.zeros(0, dtype=np.int64)
        return EvalOutputs(empty, empty, np.zeros((0, num_classes), np.float32), np.zeros((num_shifts, 0), np.int64))
    return EvalOutputs(torch.cat(kept["labels"]).long().numpy(), torch.cat(kept["preds"]).numpy(),
                       torch.cat(kept["logits"]).numpy(), torch.cat(kept["shifted"], dim=1).numpy())


def _features(model: torch.nn.Module, loader, autocast) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(pooled backbone features (B, D) float32, labels (B,)) per batch, in eval mode without autograd."""
    with _eval_mode(model):
        for batch in _start(loader):
            if batch.num_views != 1 or bool((batch.lam != 1).any()):
                # A pasted image's feature belongs to two classes: it would pull both centres together.
                raise ValueError("class centres need an unmixed, single-view loader (lam = 1, V = 1); "
                                 f"got a batch with {batch.num_views} views, min lam {float(batch.lam.min()):.3f}")
            with autocast or contextlib.nullcontext():
                feat = model.features(batch.images)
            yield feat.float(), batch.y_f


def extract_features(model: torch.nn.Module, loader,
                     autocast: contextlib.AbstractContextManager | None = None) -> tuple[np.ndarray, np.ndarray]:
    """This rank's pooled backbone features `model.features(images)` (N, D) float32 and labels (N,) int64.

    Eval mode (BatchNorm uses its running statistics), no autograd; `model.training` is restored.
    """
    feats, labels = [], []
    for feat, y in _features(model, loader, autocast):
        feats.append(feat.cpu())
        labels.append(y.cpu())
    if not feats:
        raise ValueError("extract_features: the loader yielded no batches")
    return torch.cat(feats).numpy(), torch.cat(labels).long().numpy()


def feature_centres(model: torch.nn.Module, loader, num_classes: int, device: torch.device,
                    autocast: contextlib.AbstractContextManager | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Class centres c_k (C, D) float32 of the pooled backbone features, and images per class (C,) int64.

    Per-class sums accumulate on the device (float64) and are all-reduced over ranks, so nothing of size N
    is kept (iNaturalist: 437k × 2048). A class with no images gets a NaN row, as in report.class_centres.
    """
    sums, counts = None, torch.zeros(num_classes, dtype=torch.float64, device=device)
    for feat, y in _features(model, loader, autocast):
        if sums is None:
            sums = torch.zeros(num_classes, feat.shape[1], dtype=torch.float64, device=device)
        sums.index_add_(0, y, feat.double())
        counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
    if sums is None:
        raise ValueError("feature_centres: the loader yielded no batches")
    sums, counts = all_reduce_sum(sums).cpu().numpy(), all_reduce_sum(counts).cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        centres = np.where(counts[:, None] > 0, sums / counts[:, None], np.nan)
    return centres.astype(np.float32), counts.astype(np.int64)


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
    """An aligned All/Many/Medium/Few table; empty groups show as '-'. With a validation split
    (results["val"]) its row stands above the test row; a multi-expert model's results (results["experts"])
    add a row per expert under its ensemble's row."""
    cols = ["all", "many", "medium", "few"]
    sizes = results.get("group_sizes", {})
    head = ["", "All"] + [f"{c.capitalize()} ({sizes.get(c, '?')} cls)" for c in cols[1:]]
    splits = [("val ", results["val"]), ("test ", results)] if "val" in results else [("", results)]
    rows = []
    for split, r in splits:  # a multi-expert model: the ensemble's row, then one per expert
        rows.append((f"{split}{'ensemble ' if 'experts' in r else ''}top-1 %", r))
        rows += [(f"{split}expert {k + 1} top-1 %", e) for k, e in enumerate(r.get("experts", []))]
    cells = [[name] + ["-" if r[c] is None else f"{r[c]:.2f}" for c in cols] for name, r in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(row) for row in cells)])
