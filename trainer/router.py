"""Stage 2 of RIDE: the expert-assignment router, trained on the frozen stage-1 experts, and the
sequential prediction it drives (docs/experts.md, "Router").

    mixtail train cifar100_lt_r100_ride3 --data.root=data/cifar100                 # stage 1
    mixtail train cifar100_lt_r100_ride3 --data.root=data/cifar100 --stage router  # stage 2: <out_dir>/router.pt

For expert i < K − 1 the router scores whether consulting expert i + 1 will help: from the L2-normalized
pooled feature of expert i (a per-expert Linear(d, router.hidden_dim) and a ReLU) and the router.top_k
largest values of the mean logits of experts 0..i, a Linear shared by all i gives one logit. Its target is
RIDE's: the prediction of experts 0..i is wrong and that of some 0..j, j > i, is right; binary cross-entropy
with positives weighted by router.pos_weight. At test time the experts are consulted in order, each sample
stopping at the first i whose score is below router.threshold (sigmoid); its prediction is the mean logit of
the experts it consulted. Stage 1's weights, BatchNorm statistics and checkpoint are never changed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixtail.errors import ConfigError
from mixtail.trainer.config import ROUTER_EVAL, ROUTER_FILE
from mixtail.trainer.models import build_model



class Router(nn.Module):
    """RIDE's expert-assignment module: forward(feats (K, B, d), logits (K, B, C)) -> (K − 1, B) logits of
    "expert i + 1 helps"."""

    def __init__(self, num_experts: int, feature_dim: int, num_classes: int, top_k: int, hidden_dim: int):
        super().__init__()
        self.top_k = min(top_k, num_classes)  # RIDE's 30 is for 100 classes; CIFAR-10 has 10 logits in all
        self.hidden = nn.ModuleList(nn.Linear(feature_dim, hidden_dim) for _ in range(num_experts - 1))
        self.out = nn.Linear(hidden_dim + self.top_k, 1)  # shared by every i (RIDE's share_expert_help_pred_fc)

    def forward(self, feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        k = logits.shape[0]
        running = logits.float().cumsum(0) / torch.arange(1, k + 1, device=logits.device).view(k, 1, 1)
        scores = []
        for i, hidden in enumerate(self.hidden):
            h = F.relu(hidden(F.normalize(feats[i].float(), dim=1)))
            top = running[i].topk(self.top_k, dim=1).values
            scores.append(self.out(torch.cat([top, h], dim=1)).squeeze(1))
        return torch.stack(scores)


def help_targets(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(K − 1, B) bool: experts 0..i predict wrongly and experts 0..j do right for some j > i (RIDE's target)."""
    correct = logits.float().cumsum(0).argmax(2) == labels[None]  # the mean's argmax is the sum's
    later = correct.flip(0).cummax(0).values.flip(0)  # later[j]: some j' >= j is correct
    return ~correct[:-1] & later[1:]


def route(help_logits: torch.Tensor, logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Consult experts in order until the router says stop: (mean logits of the consulted experts (B, C),
    experts consulted per sample (B,), 1..K). A sample continues to expert i + 1 while every score so far
    clears the threshold."""
    go_on = torch.sigmoid(help_logits.float()) > threshold  # (K − 1, B)
    active = torch.cat([torch.ones_like(go_on[:1]), go_on.cummin(0).values])  # (K, B): expert i consulted
    used = active.sum(0)
    return (logits.float() * active[..., None]).sum(0) / used[:, None], used


def router_loss(router: Router, feats, logits, labels, pos_weight: float, weights: torch.Tensor) -> torch.Tensor:
    """BCE of the router's scores against help_targets, positives × pos_weight, each sample weighted by
    `weights` (1/n_y, normalized: class-balanced in expectation, where RIDE samples class-balanced)."""
    scores = router(feats, logits)
    target = help_targets(logits, labels).float()
    bce = F.binary_cross_entropy_with_logits(scores, target, pos_weight=scores.new_tensor(pos_weight),
                                             reduction="none")
    return (bce * weights[None]).mean()


@torch.no_grad()
def expert_outputs(model, images, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen model's (pooled features (K, B, d), logits (K, B, C)), eval mode, float32."""
    with autocast:
        feats = model.expert_features(images)
        logits = torch.stack([cls(f) for cls, f in zip(model.classifiers, feats)])
    return torch.stack(feats).float(), logits.float()


def class_weights(counts: np.ndarray, device) -> torch.Tensor:
    """(C,) 1/n_k scaled to mean 1 over the training images (a sample of class k weighs N/(C·n_k))."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 1)
    return torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32, device=device)


def train_router(model, batches_per_epoch, cfg_router, counts, device, autocast, log=print) -> Router:
    """Fit a Router on the frozen `model` over `batches_per_epoch()` (an iterable of Batch per call, one call
    per epoch): SGD with RIDE's momentum 0.9, Nesterov and weight decay 5e-4, cosine lr from router.lr to 0."""
    r = cfg_router
    router = Router(model.num_experts, model.feature_dim, len(counts), r.top_k, r.hidden_dim).to(device)
    opt = torch.optim.SGD(router.parameters(), lr=r.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=r.epochs)  # RIDE's EA schedule, per epoch
    w = class_weights(counts, device)
    model.eval()  # frozen BatchNorm too: stage 1's statistics are read, never updated
    for epoch in range(r.epochs):
        total, n = 0.0, 0
        for batch in batches_per_epoch(epoch):
            feats, logits = expert_outputs(model, batch.images, autocast)
            loss = router_loss(router, feats, logits, batch.y_f, r.pos_weight, w[batch.y_f])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n = total + float(loss.detach()), n + 1
        sched.step()
        log(f"router epoch {epoch + 1}/{r.epochs}: loss {total / max(n, 1):.4f}")
    return router


@torch.no_grad()
def evaluate_router(model, router: Router, loader, train_counts, device, autocast, threshold: float) -> dict:
    """Top-1 (All/Many/Medium/Few) of the routed prediction and the mean number of experts consulted, beside
    the all-experts ensemble, over a test loader (summed over ranks)."""
    from mixtail.trainer.dist import all_reduce_sum
    from mixtail.trainer.evaluate import _start, accuracy_summary

    model.eval()
    router.eval()
    c = len(train_counts)
    correct = torch.zeros(2, c, dtype=torch.float64, device=device)  # routed, all experts
    total = torch.zeros(c, dtype=torch.float64, device=device)
    used_sum = torch.zeros(c, dtype=torch.float64, device=device)
    for batch in _start(loader):
        feats, logits = expert_outputs(model, batch.images, autocast)
        routed, used = route(router(feats, logits), logits, threshold)
        y = batch.y_f
        hits = torch.stack([routed.argmax(1) == y, logits.mean(0).argmax(1) == y]).double()
        correct.index_add_(1, y, hits)
        total.index_add_(0, y, torch.ones_like(hits[0]))
        used_sum.index_add_(0, y, used.double())
    correct, total, used_sum = (all_reduce_sum(t).cpu().numpy() for t in (correct, total, used_sum))
    out = {"routed": accuracy_summary(correct[0], total, train_counts),
           "all_experts": accuracy_summary(correct[1], total, train_counts),
           "mean_experts": float(used_sum.sum() / max(total.sum(), 1)), "num_experts": router_experts(router)}
    from mixtail.pipelines.sources.subsets import shot_groups

    out["mean_experts_by_group"] = {g: float(used_sum[k].sum() / max(total[k].sum(), 1)) if len(k) else None
                                    for g, k in shot_groups(train_counts).items()}
    return out


def router_experts(router: Router) -> int:
    return len(router.hidden) + 1


def router_table(res: dict) -> str:
    """The routed and all-experts rows with the experts-per-image figure."""
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [f"{'':<24}  {'All':>6}  {'Many':>6}  {'Medium':>6}  {'Few':>6}  experts/image"]
    for name, key, used in (("router (stops early)", "routed", res["mean_experts"]),
                            (f"all {res['num_experts']} experts", "all_experts", float(res["num_experts"]))):
        r = res[key]
        lines.append(f"{name:<24}  {fmt(r['all']):>6}  {fmt(r['many']):>6}  {fmt(r['medium']):>6}  "
                     f"{fmt(r['few']):>6}  {used:.3f}")
    return "\n".join(lines)


def router_loader(cfg, device):
    """Stage 2's training loader: RIDE trains its router on single, unmixed, augmented training images, so one
    view, no pasting (mix.mix_prob 0: each sample is its background, drawn uniformly), router.batch_size, and
    a seed of its own (stage 1's batches are not replayed)."""
    from mixtail.pipelines.loader import build_loader

    data = dataclasses.replace(cfg.data, num_views=1, batch_size=cfg.router.batch_size)
    mix = dataclasses.replace(cfg.mix, mix_prob=0.0)
    return build_loader(data, cfg.aug, mix, split="train", num_epochs=cfg.router.epochs, device=device,
                        seed=cfg.train.seed + 1, channels_last=cfg.train.channels_last)


def train_router_stage(cfg) -> dict:
    """`mixtail train CONFIG --stage router`: stage 2 on the finished stage-1 run in cfg.train.out_dir.
    Writes router.pt (the router's weights and the config) and router_eval.json; returns the evaluation."""
    from mixtail.trainer.dist import cleanup, init_distributed
    from mixtail.trainer.run_dir import run_dir_lock

    if cfg.model.experts < 2:
        raise ConfigError(f"key 'model.experts': --stage router needs a multi-expert run (K >= 2), got "
                          f"{cfg.model.experts}")
    out_dir = Path(cfg.train.out_dir)
    info = init_distributed(cfg.train.device)
    if info.world_size > 1:
        cleanup()
        raise ConfigError("--stage router runs in one process (a few epochs of a small head); not under torchrun")
    try:
        # The run directory's lock: a `train --resume` beside this would replace the checkpoint the router is
        # being trained on, and the router would be written beside a checkpoint it does not belong to.
        with run_dir_lock(out_dir, info):
            return _router_stage(cfg, out_dir, info)
    finally:
        cleanup()


def _router_stage(cfg, out_dir: Path, info) -> dict:
    from mixtail.pipelines.loader import build_loader
    from mixtail.trainer.checkpoint import CheckpointStore, save_checkpoint
    from mixtail.trainer.run_dir import check_resume_config
    from mixtail.trainer.train import autocast_for

    store = CheckpointStore(out_dir, keep=cfg.train.keep_checkpoints)
    found = store.load_latest(map_location=info.device)
    if found is None:
        raise FileNotFoundError(f"--stage router: no stage-1 checkpoint in {out_dir}; train stage 1 first")
    path, state = found
    check_resume_config(cfg, state["config"], path, state["epoch"])
    if state["epoch"] != cfg.train.epochs or state["batch"] != 0:
        raise ConfigError(f"--stage router: {path} is at epoch {state['epoch']} of {cfg.train.epochs}; finish "
                          f"stage 1 first (mixtail train ... --resume)")
    device = info.device
    counts = np.asarray(state["class_counts"])
    torch.manual_seed(cfg.train.seed)
    model = build_model(stage1_model_config(cfg.model), len(counts)).to(device)
    model.load_state_dict(state["model"])
    for p in model.parameters():
        p.requires_grad_(False)
    autocast = autocast_for(cfg.train.precision, device)
    r = cfg.router
    train_loader = router_loader(cfg, device)
    test_loader = build_loader(cfg.data, cfg.aug, cfg.mix, split="test", device=device, seed=cfg.train.seed,
                               channels_last=cfg.train.channels_last)
    limit = cfg.train.max_steps_per_epoch or math.inf

    def batches(epoch):
        train_loader.set_epoch(epoch)
        for b, batch in enumerate(train_loader):
            if b >= limit:
                break
            yield batch

    print(f"stage 2 (router) on {path}: {r.epochs} epochs, batches of {r.batch_size}, stage-1 weights frozen")
    router = train_router(model, batches, r, counts, device, autocast)
    res = evaluate_router(model, router, test_loader, counts, device, autocast, r.threshold)
    # Atomic and checksummed like a checkpoint, and bound to the stage-1 checkpoint by its sha256: evaluation
    # uses the router only beside that checkpoint (a resumed, retrained or other run's is stale).
    save_checkpoint(out_dir / ROUTER_FILE, {
        "router": router.state_dict(), "config": state["config"], "router_config": dataclasses.asdict(r),
        "stage1_checkpoint": str(path), "stage1_epoch": state["epoch"], "stage1_sha256": store.loaded_sha256})
    (out_dir / ROUTER_EVAL).write_text(json.dumps(res, indent=1))
    print(router_table(res))
    print(f"router: {out_dir / ROUTER_FILE}, evaluation: {out_dir / ROUTER_EVAL}")
    return res


def stage1_model_config(model_cfg):
    """The model config to rebuild a trained network from: no pretrained weights file is read (every weight
    comes from the checkpoint, and the file may have moved since training)."""
    return dataclasses.replace(model_cfg, pretrained_path="")
