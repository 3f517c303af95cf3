"""`mixtail eval`: rebuild a checkpoint's model, evaluate it on its test set, and optionally write the report.

    mixtail eval runs/cifar10_lt_r100/checkpoint.pt                        # All / Many / Medium / Few
    mixtail eval CKPT --posthoc-tau 0,0.5,1                                # + accuracy with shifted logits
    mixtail eval CKPT --posthoc-tau auto        # T chosen on the validation split (data.val_per_class), test at it
    mixtail eval CKPT --report runs/x/report --class-vectors class_vectors_glove6B50d.npz

A multi-expert checkpoint (model.experts > 1) is reported as its ensemble's row and one row per expert;
with a stage-2 router.pt beside it (`mixtail train CONFIG --stage router`) that was trained on this very
checkpoint (the sha256 router.pt records), also the routed prediction's accuracy and the mean number of experts
consulted per image; a stale, damaged or mismatched router.pt is named in one line and left out. An override of
any model key is refused: the weights fix the network.

Post-hoc adjustment: a model trained with logit adjustment by log P_Y on mixed batches has
learned the soft labels' marginal π (trainer/losses.mixed_prior), not P_Y, so its test logits are over-
corrected by log(π/P_Y). `--posthoc-tau T` shifts them by T·log(P_Y/π) (T = 1 undoes it exactly under that
model; T = 0 is the plain prediction), for several T from one forward pass, so a user sees, without
retraining, how accuracy moves. Picking the best of those T by its test accuracy would be choosing on the test
set; `--posthoc-tau auto` chooses T on the run's validation split (data.val_per_class: images held out of
training) from a printed grid, and reports the test set at that T only.

A checkpoint trained with a validation split is evaluated on it too, beside the test set (its val row stands
above the test row); an override that would draw another split (data.val_per_class, val_seed, the LT subset) is
refused, since its "validation" images would be images the checkpoint trained on.

The report (trainer/report.py) adds the best evaluated epoch from the run's metrics.jsonl (labelled as such),
the 20 largest confusions, per-class accuracy against training count, and the paper's Table 4 scores from
the pooled backbone features of the (unaugmented, unmixed) training images: the inter-class score, and with
--class-vectors the semantic similarity score, per group, plus the class centres themselves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import dataclasses
import sys

from mixtail.errors import CheckpointError, ConfigError, UnsafeFileError, quote
from mixtail.pipelines.loader import build_loader, loader_for_dataset
from mixtail.pipelines.sources.build import build_dataset
from mixtail.trainer.checkpoint import read_checkpoint
from mixtail.trainer.config import ROUTER_FILE, apply_overrides, config_from_dict
from mixtail.trainer.dist import cleanup, init_distributed
from mixtail.trainer.evaluate import evaluate, feature_centres, format_table
from mixtail.trainer.models import build_model
from mixtail.trainer.router import Router, evaluate_router, router_table, stage1_model_config
from mixtail.trainer.report import (best_eval, group_means, inter_class_scores, load_class_vectors,
                                    semantic_similarity_rows, top_confusions, write_report)
from mixtail.trainer.run_dir import check_classes, data_source
from mixtail.trainer.train import autocast_for, class_priors


def posthoc_shift(cfg, counts: np.ndarray, taus: list[float]) -> torch.Tensor:
    """(len(taus), C): T·log(P_Y/π) for each T, with π the soft-label marginal inside the mixing window."""
    p_y, pi = class_priors(cfg, counts)
    floor = 1e-12
    direction = np.log(np.maximum(p_y, floor)) - np.log(np.maximum(pi, floor))
    return torch.tensor(np.outer(taus, direction), dtype=torch.float32)


# `--posthoc-tau auto`: the grid T is chosen from, on the validation split.
AUTO_TAUS = tuple(round(0.1 * i, 1) for i in range(16))  # 0, 0.1, ..., 1.5
# The keys that draw a validation split: an evaluation may not change them, or its "validation" images would
# be images the checkpoint trained on.
VAL_KEYS = ("val_per_class", "val_seed", "imbalance_ratio", "lt_subset")
GROUP_KEYS = ("all", "many", "medium", "few")


def choose_tau(taus: list[float], val_summaries: list[dict]) -> float:
    """The T whose shifted validation logits score the best All; on a tie the smallest |T| (the least shift).
    It sees validation summaries only: nothing of the test set can reach the choice."""
    best = max(range(len(taus)), key=lambda i: (val_summaries[i]["all"], -abs(taus[i]), -taus[i]))
    return taus[best]


def _groups(r: dict) -> dict:
    return {k: r[k] for k in GROUP_KEYS}


def check_validation_keys(cfg, saved: dict, path: Path) -> None:
    """Refuse overrides that would draw another validation split than the one the checkpoint held out."""
    held_out = saved["data"].get("val_per_class", 0) or cfg.data.val_per_class
    for key in VAL_KEYS if held_out else VAL_KEYS[:1]:
        theirs, mine = saved["data"].get(key, getattr(type(cfg.data)(), key)), getattr(cfg.data, key)
        if mine != theirs:
            raise ConfigError(f"key 'data.{key}': {path} was trained with {quote(theirs)}; evaluating with "
                              f"{quote(mine)} would draw another validation split, holding out images it trained on")


def check_model_keys(cfg, saved_cfg, path: Path) -> None:
    """Refuse any override of a model key: every field of the model config describes the network the
    checkpoint's weights belong to (the backbone, the head, the experts and their classifiers; new fields
    included without a list to update), and model.pretrained_path only where training started, which an
    evaluation never reads (the weights come from the checkpoint)."""
    for f in dataclasses.fields(saved_cfg.model):
        theirs, mine = getattr(saved_cfg.model, f.name), getattr(cfg.model, f.name)
        if mine != theirs:
            raise ConfigError(f"key 'model.{f.name}': {path} holds a model with {f.name} {quote(theirs)}; its "
                              f"weights cannot be evaluated as {quote(mine)} (drop the override)")


def evaluate_checkpoint(path: str | Path, overrides: list[str] = (), *, report_dir: str | Path | None = None,
                        class_vectors: str | Path | None = None, posthoc_taus: list[float] = (),
                        posthoc_auto: bool = False) -> dict:
    """Evaluate a checkpoint (`mixtail eval`) on its test set, and on its validation split when it has one;
    returns the results (with "val", "posthoc" rows and "posthoc_auto" when asked).

    posthoc_auto: choose T of the post-hoc shift on the validation split (AUTO_TAUS, printed), then report the
    test set at that T only.
    """
    path = Path(path)
    state, sha = read_checkpoint(path)
    for key in ("config", "model", "class_counts", "epoch"):
        if key not in state:
            raise CheckpointError(f"{path} is not a mixtail checkpoint (it has no {key!r}; keys: "
                                  f"{', '.join(sorted(map(str, state))[:8])})")
    saved_cfg = config_from_dict(state["config"], f"{path} (saved config)")
    cfg = apply_overrides(saved_cfg, overrides)
    check_model_keys(cfg, saved_cfg, path)
    check_validation_keys(cfg, state["config"], path)
    if posthoc_auto and not cfg.data.val_per_class:
        raise ConfigError(f"--posthoc-tau auto chooses T on the validation split, and {path} has none: train with "
                          f"--data.val_per_class=K (K images of each class held out), or give T values")
    info = init_distributed(cfg.train.device)
    try:
        device = info.device
        classes = list(state.get("classes", []))
        kw = dict(rank=info.rank, world_size=info.world_size, device=device, seed=cfg.train.seed,
                  channels_last=cfg.train.channels_last)
        test_loader = build_loader(cfg.data, cfg.aug, cfg.mix, split="test", **kw)
        # Other test classes would print numbers under the checkpoint's group labels.
        check_classes(state, path, list(test_loader.classes), data_source(cfg.data, "test"))
        val_loader = build_loader(cfg.data, cfg.aug, cfg.mix, split="val", **kw) if cfg.data.val_per_class else None
        counts = np.asarray(state["class_counts"])
        model = build_model(stage1_model_config(cfg.model), len(counts)).to(device)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.load_state_dict(state["model"])
        # Before any evaluation: a router.pt that is refused stops the command before it has printed anything.
        router = load_router(path, sha, cfg, model, len(counts), device, info.is_main)
        autocast = autocast_for(cfg.train.precision, device)
        auto = None
        if posthoc_auto:  # the choice first, from the validation split alone
            grid = list(AUTO_TAUS)
            on_val = evaluate(model, val_loader, counts, device, autocast,
                              logit_shift=posthoc_shift(cfg, counts, grid).to(device))
            tau = choose_tau(grid, on_val["shifted"])
            auto = {"grid": [{"tau": t, **_groups(r)} for t, r in zip(grid, on_val["shifted"])], "tau": tau,
                    "val": _groups(on_val["shifted"][grid.index(tau)])}
        taus = list(posthoc_taus) + ([auto["tau"]] if auto else [])
        shift = posthoc_shift(cfg, counts, taus).to(device) if taus else None
        results = evaluate(model, test_loader, counts, device, autocast, logit_shift=shift,
                           return_outputs=report_dir is not None)
        if val_loader is not None:
            results["val"] = evaluate(model, val_loader, counts, device, autocast)
        if router is not None:
            router = results["router"] = evaluate_router(model, router[0], test_loader, counts, device, autocast,
                                                         router[1])
        shifted = results.pop("shifted", [])
        posthoc = list(zip(posthoc_taus, shifted))
        if auto:
            auto["test"] = _groups(shifted[-1])
        if info.is_main:
            what = f"{results['num_test_images']} test images"
            if "val" in results:
                what += f", {results['val']['num_test_images']} validation images"
            print(f"{path}: epoch {state['epoch']}, {what}")
            print(format_table(results))
            if posthoc:
                print(posthoc_table(posthoc))
            if auto:
                print(auto_table(auto))
            if router is not None:
                print(f"stage-2 router ({path.parent / ROUTER_FILE}):")
                print(router_table(router))
        if report_dir is not None:
            _report(Path(report_dir), path, state, cfg, model, results, posthoc, counts, classes, class_vectors,
                    autocast, kw, info.is_main, auto)
        results.pop("outputs", None)
        results["posthoc"] = [{"tau": t, **_groups(r)} for t, r in posthoc]
        if auto:
            results["posthoc_auto"] = auto
        return results
    finally:
        cleanup()


def load_router(path: Path, sha: str, cfg, model, num_classes: int, device, is_main: bool):
    """With a stage-2 router.pt beside a multi-expert checkpoint: (router, threshold) to evaluate the
    routed prediction with; None otherwise.

    The router is used only when it was trained on this very checkpoint (the sha256 it records): one from an
    earlier stage 1, a resumed or another run is stale. A stale, damaged or mismatched router.pt is named in one
    line on stderr and left out; the checkpoint's own results stand without it. A router.pt that asks to run
    code is refused with the whole evaluation (UnsafeFileError), as a checkpoint would be."""
    router_path = path.parent / ROUTER_FILE
    if cfg.model.experts < 2 or not router_path.exists():
        return None

    def leave_out(why: str) -> None:
        if is_main:
            print(f"mixtail eval: router {router_path} left out: {why}", file=sys.stderr, flush=True)

    try:
        # A router without a checksum predates the stage-1 binding too: the line below says so, not this log.
        saved, _ = read_checkpoint(router_path, map_location=device, log=lambda _: None, what="router")
    except UnsafeFileError:
        raise
    except CheckpointError as err:
        leave_out(str(err))
        return None
    trained_on = saved.get("stage1_sha256")
    if not isinstance(trained_on, str):
        leave_out("it records no stage-1 checkpoint (written before routers were bound to one); retrain it with "
                  "`mixtail train CONFIG --stage router`")
        return None
    if trained_on != sha:
        leave_out(f"it is stale: trained on the stage-1 checkpoint with sha256 {quote(trained_on[:16])}..., not "
                  f"on {path} ({sha[:16]}...); retrain it with `mixtail train CONFIG --stage router`")
        return None
    try:
        r = saved["router_config"]
        top_k, hidden, threshold = r["top_k"], r["hidden_dim"], r["threshold"]
        if not (isinstance(top_k, int) and isinstance(hidden, int) and isinstance(threshold, float)
                and top_k > 0 and hidden > 0 and 0 < threshold < 1):
            raise ValueError("router_config")
        # Shapes first, on the meta device (nothing allocated): a router for another K, class count or width.
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in Router(model.num_experts, model.feature_dim, num_classes, top_k,
                                                           hidden).state_dict().items()}
        weights = saved["router"]
        if not isinstance(weights, dict) or {k: tuple(getattr(v, "shape", ())) for k, v in weights.items()} != shapes:
            raise ValueError("shapes")
        router = Router(model.num_experts, model.feature_dim, num_classes, top_k, hidden).to(device)
        router.load_state_dict(weights)
    except (KeyError, TypeError, ValueError, RuntimeError):
        leave_out(f"it does not fit {path} (a router for another number of experts, classes or width, or not a "
                  f"mixtail router)")
        return None
    return router, threshold


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def auto_table(auto: dict) -> str:
    """The validation grid of `--posthoc-tau auto`, the T it chose, and the test set at that T alone."""
    lines = ["post-hoc shift T·log(P_Y/π), T chosen on the validation split (best val All):",
             f"{'T':>6}  {'val All':>7}  {'Many':>6}  {'Medium':>6}  {'Few':>6}"]
    for r in auto["grid"]:
        mark = "  <- chosen" if r["tau"] == auto["tau"] else ""
        lines.append(f"{r['tau']:>6g}  {_fmt(r['all']):>7}  {_fmt(r['many']):>6}  {_fmt(r['medium']):>6}  "
                     f"{_fmt(r['few']):>6}{mark}")
    t = auto["test"]
    lines.append(f"test at T = {auto['tau']:g}: All {_fmt(t['all'])}, Many {_fmt(t['many'])}, "
                 f"Medium {_fmt(t['medium'])}, Few {_fmt(t['few'])}")
    return "\n".join(lines)


def posthoc_table(posthoc: list[tuple[float, dict]]) -> str:
    """Accuracy against T for the post-hoc shift T·log(P_Y/π), as aligned text."""
    lines = ["post-hoc shift T·log(P_Y/π):", f"{'T':>6}  {'All':>6}  {'Many':>6}  {'Medium':>6}  {'Few':>6}"]
    for t, r in posthoc:
        lines.append(f"{t:>6g}  {_fmt(r['all']):>6}  {_fmt(r['many']):>6}  {_fmt(r['medium']):>6}  {_fmt(r['few']):>6}")
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
            class_vectors, autocast, kw: dict, is_main: bool, auto: dict | None = None) -> None:
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
    best = best_eval(metrics, by="val" if "val" in results else "eval") if metrics.exists() else None
    write_report(out, final=results, best=best, train_counts=counts,
                 class_names=classes, confusions=top_confusions(labels, preds, classes),
                 scores={"inter_class_score": is_k, "semantic_similarity_score": ss}, centres=centres,
                 meta={"checkpoint": str(path), "epoch": int(state["epoch"]), "dataset": cfg.data.dataset,
                       "epochs_configured": cfg.train.epochs, "class_vectors": str(class_vectors or "")},
                 posthoc=posthoc or None, posthoc_auto=auto)
    groups = group_means(is_k, counts)
    print(f"report: {out / 'report.md'} (inter-class score all {groups['all']:.3f})")
