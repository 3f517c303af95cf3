"""`mixtail eval`: rebuild a checkpoint's model, evaluate it on its test set, and optionally write the report.

    mixtail eval runs/cifar10_lt_r100/checkpoint.pt                        # All / Many / Medium / Few
    mixtail eval CKPT --posthoc-tau 0,0.5,1                                # + accuracy with shifted logits
    mixtail eval CKPT --report runs/x/report --class-vectors ../shared/data/glove/class_vectors_glove6B50d.npz

Post-hoc adjustment (issue 7 §2): a model trained with logit adjustment by log P_Y on mixed batches has
learned the soft labels' marginal π (trainer/losses.mixed_prior), not P_Y, so its test logits are over-
corrected by log(π/P_Y). `--posthoc-tau T` shifts them by T·log(P_Y/π) (T = 1 undoes it exactly under that
model; T = 0 is the plain prediction), for several T from one forward pass, so a user sees, without
retraining, how accuracy moves.

The report (trainer/report.py) adds the best evaluated epoch from the run's metrics.jsonl (labelled as such),
the 20 largest confusions, per-class accuracy against training count, and the paper's Table 4 scores from
the pooled backbone features of the (unaugmented, unmixed) training images: the inter-class score, and with
--class-vectors the semantic similarity score, per group, plus the class centres themselves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mixtail.errors import CheckpointError
from mixtail.pipelines.base import build_loader, loader_for_dataset
from mixtail.pipelines.datasets import build_dataset
from mixtail.trainer.checkpoint import load_checkpoint
from mixtail.trainer.config import apply_overrides, config_from_dict
from mixtail.trainer.dist import cleanup, init_distributed
from mixtail.trainer.evaluate import evaluate, feature_centres, format_table
from mixtail.trainer.models import build_model
from mixtail.trainer.report import (best_eval, group_means, inter_class_scores, load_class_vectors,
                                    semantic_similarity_rows, top_confusions, write_report)
from mixtail.trainer.train import autocast_for, class_priors


def posthoc_shift(cfg, counts: np.ndarray, taus: list[float]) -> torch.Tensor:
    """(len(taus), C): T·log(P_Y/π) for each T, with π the soft-label marginal inside the mixing window."""
    p_y, pi = class_priors(cfg, counts)
    floor = 1e-12
    direction = np.log(np.maximum(p_y, floor)) - np.log(np.maximum(pi, floor))
    return torch.tensor(np.outer(taus, direction), dtype=torch.float32)


def evaluate_checkpoint(path: str | Path, overrides: list[str] = (), *, report_dir: str | Path | None = None,
                        class_vectors: str | Path | None = None, posthoc_taus: list[float] = ()) -> dict:
    """Evaluate a checkpoint (`mixtail eval`); returns the results (with "posthoc" rows when asked)."""
    path = Path(path)
    state = load_checkpoint(path)
    for key in ("config", "model", "class_counts", "epoch"):
        if key not in state:
            raise CheckpointError(f"{path} is not a mixtail checkpoint (it has no {key!r}; keys: "
                                  f"{', '.join(sorted(map(str, state))[:8])})")
    cfg = apply_overrides(config_from_dict(state["config"], f"{path} (saved config)"), overrides)
    info = init_distributed(cfg.train.device)
    try:
        device = info.device
        classes = list(state.get("classes", []))
        kw = dict(rank=info.rank, world_size=info.world_size, device=device, seed=cfg.train.seed,
                  channels_last=cfg.train.channels_last)
        test_loader = build_loader(cfg.data, cfg.aug, cfg.mix, split="test", **kw)
        counts = np.asarray(state["class_counts"])
        model = build_model(cfg.model, len(counts)).to(device)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.load_state_dict(state["model"])
        autocast = autocast_for(cfg.train.precision, device)
        taus = list(posthoc_taus)
        shift = posthoc_shift(cfg, counts, taus).to(device) if taus else None
        results = evaluate(model, test_loader, counts, device, autocast, logit_shift=shift,
                           return_outputs=report_dir is not None)
        posthoc = list(zip(taus, results.get("shifted", [])))
        if info.is_main:
            print(f"{path}: epoch {state['epoch']}, {results['num_test_images']} test images")
            print(format_table(results))
            if posthoc:
                print(posthoc_table(posthoc))
        if report_dir is not None:
            _report(Path(report_dir), path, state, cfg, model, results, posthoc, counts, classes, class_vectors,
                    autocast, kw, info.is_main)
        results.pop("outputs", None)
        results["posthoc"] = [{"tau": t, **{k: r[k] for k in ("all", "many", "medium", "few")}} for t, r in posthoc]
        return results
    finally:
        cleanup()


def posthoc_table(posthoc: list[tuple[float, dict]]) -> str:
    """Accuracy against T for the post-hoc shift T·log(P_Y/π), as aligned text."""
    lines = ["post-hoc shift T·log(P_Y/π):", f"{'T':>6}  {'All':>6}  {'Many':>6}  {'Medium':>6}  {'Few':>6}"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for t, r in posthoc:
        lines.append(f"{t:>6g}  {fmt(r['all']):>6}  {fmt(r['many']):>6}  {fmt(r['medium']):>6}  {fmt(r['few']):>6}")
    return "\n".join(lines)


def _gather(local: np.ndarray) -> np.ndarray:
    """This rank's per-sample array concatenated with every other rank's (the confusions need all of them)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return np.asarray(local)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, np.asarray(local))
    return np.concatenate(parts)


def _report(out: Path, path: Path, state: dict, cfg, model, results: dict, posthoc, counts, classes,
            class_vectors, autocast, kw: dict, is_main: bool) -> None:
    """Table 4 scores from the training images' pooled features, confusions, the best epoch: report_dir."""
    # An unaugmented, unmixed pass over the training images: the training subset read with the test planner.
    train_images = build_dataset(cfg.data, "train", decoded=False)
    train_loader = loader_for_dataset(train_images, cfg.data, cfg.aug, cfg.mix, split="test", **kw)
    centres, _ = feature_centres(model, train_loader, len(counts), kw["device"], autocast)
    classes = classes or list(train_images.classes)
    labels, preds = _gather(results["outputs"].labels), _gather(results["outputs"].preds)  # every rank's shard
    if not is_main:
        return
    is_k = inter_class_scores(centres)
    ss = semantic_similarity_rows(centres, load_class_vectors(class_vectors, classes)) if class_vectors else None
    metrics = path.parent / "metrics.jsonl"
    write_report(out, final=results, best=best_eval(metrics) if metrics.exists() else None, train_counts=counts,
                 class_names=classes, confusions=top_confusions(labels, preds, classes),
                 scores={"inter_class_score": is_k, "semantic_similarity_score": ss}, centres=centres,
                 meta={"checkpoint": str(path), "epoch": int(state["epoch"]), "dataset": cfg.data.dataset,
                       "epochs_configured": cfg.train.epochs, "class_vectors": str(class_vectors or "")},
                 posthoc=posthoc or None)
    groups = group_means(is_k, counts)
    print(f"report: {out / 'report.md'} (inter-class score all {groups['all']:.3f})")
