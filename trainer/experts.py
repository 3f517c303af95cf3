"""SMC with RIDE's multiple experts (paper §4.6, Table 6): the network, the stage-1 objective and
the stage-2 router. docs/experts.md states every choice and what differs from RIDE's code.

    mixtail train cifar100_lt_r100_ride3 --data.root=data/cifar100            # stage 1: K = 3 experts
    mixtail train cifar100_lt_r100_ride3 --data.root=data/cifar100 --stage router   # stage 2 on its checkpoint

    model = build_model(ModelConfig(arch="resnet32", experts=3), num_classes=100)
    logits, z = model(images)     # (K, B, C) per-expert logits, (K, B, 128) L2-normalized embeddings
    logits.mean(0)                # the ensemble's prediction (RIDE: the mean of the experts' logits)
    model.features(images)        # (B, K·d): the experts' pooled features side by side (Table 4 scores)

Layout (RIDE's): the stem and the first stage are shared; each expert has its own later stages, its own
linear classifier (or RIDE's cosine classifier of scale 30, model.expert_classifier) and its own MLP head
(docs/method.md, "Network"). RIDE's `reduce_dimension` makes the experts' later
stages 3/4 as wide as the single network's (ResNet-32: 24 and 48 channels instead of 32 and 64; ResNet-50:
layer3 and layer4 at 192 and 384 bottleneck planes instead of 256 and 512, stages 1-2 shared), so that three
experts cost about what one wider network costs. K = 1 never comes here: trainer/models.py builds today's
network unchanged.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixtail.errors import ConfigError
from mixtail.kernels import distributed_smc_loss
from mixtail.trainer.losses import soft_targets
from mixtail.trainer.losses import logit_adjusted_soft_ce
from mixtail.trainer.backbones import CIFAR_DEPTHS, BasicBlock

# RIDE's reduce_dimension: the experts' own stages at 3/4 of the single network's width (24/32, 48/64 in
# its resnet_cifar; 192/256, 384/512 in its ResNet-50).
REDUCE = 3 / 4


def _mlp_head(dim: int, head_dim: int) -> nn.Sequential:
    # docs/method.md, "Network": Linear(d, d) -> ReLU -> Linear(d, 128), as SMCNet's, one per expert.
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, head_dim))


class CosineClassifier(nn.Module):
    """RIDE's `NormedLinear` with its scale (model.expert_classifier: cosine): s · cos(feature, w_c) for each
    class c, so every logit lies in [−s, s].

    The class vectors start at unit norm, as RIDE's (uniform(−1, 1) renormalized). Only their directions
    count, but the optimizer's angular step on a vector of norm r is about lr/r²: uniform(−1, 1) alone has
    norm √(d/3) (4 at d = 48, 22.6 at d = 1,536), whose directions barely rotate in a short run."""

    def __init__(self, in_features: int, num_classes: int, scale: float = 30.0):
        super().__init__()
        self.weight = nn.Parameter(F.normalize(torch.empty(num_classes, in_features).uniform_(-1, 1), dim=1))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


class _Pool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def _cifar_parts(depth: int, num_experts: int) -> tuple[nn.Module, list[nn.Module], int]:
    """(shared stem + stage 1, K experts' stages 2-3 + pool, expert feature dim) of a CIFAR ResNet-(6n+2)."""
    n = (depth - 2) // 6
    shared = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                           *[BasicBlock(16, 16, 1) for _ in range(n)])
    w2, w3 = round(32 * REDUCE), round(64 * REDUCE)  # 24 and 48, RIDE's reduce_dimension widths
    experts = []
    for _ in range(num_experts):
        blocks, in_planes = [], 16
        for planes in (w2, w3):
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, 2 if i == 0 else 1))
                in_planes = planes
        experts.append(nn.Sequential(*blocks, _Pool()))
    for m in [shared, *experts]:
        for c in m.modules():
            if isinstance(c, nn.Conv2d):  # CifarResNet's initialization (trainer/models.py), kept for K > 1
                nn.init.kaiming_normal_(c.weight, mode="fan_out", nonlinearity="relu")
    return shared, experts, w3


def _torchvision_parts(arch: str, num_experts: int) -> tuple[nn.Module, list[nn.Module], int]:
    """RIDE's ResNet-50 layout on a torchvision ResNet: stem, layer1 and layer2 shared; layer3 and layer4 per
    expert at 3/4 of their planes."""
    import torchvision

    try:
        net = torchvision.models.get_model(arch, weights=None)
    except ValueError:
        raise ConfigError(f"key 'model.arch': {arch!r} is not a torchvision model name") from None
    if not isinstance(net, torchvision.models.ResNet):
        raise ConfigError(f"key 'model.experts': K > 1 needs a CIFAR ResNet or a torchvision ResNet/ResNeXt "
                          f"(RIDE's layouts), not model.arch={arch!r}")
    shared = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2)
    block = type(net.layer1[0])
    depths = [len(net.layer3), len(net.layer4)]
    after_layer2 = net.inplanes // (2 ** 2)  # net.inplanes is layer4's output; layer2's is a quarter of it
    experts = []
    for _ in range(num_experts):
        net.inplanes = after_layer2  # _make_layer builds from this running width, as torchvision's __init__ does
        layer3 = net._make_layer(block, round(256 * REDUCE), depths[0], stride=2)
        layer4 = net._make_layer(block, round(512 * REDUCE), depths[1], stride=2)
        expert = nn.Sequential(layer3, layer4, _Pool())
        for m in expert.modules():  # torchvision's ResNet initialization for the new stages
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        experts.append(expert)
    return shared, experts, round(512 * REDUCE) * block.expansion


class MultiExpertNet(nn.Module):
    """Shared trunk → K experts, each (own stages → pooled feature → classifier logits, MLP head → z).

    forward(x) -> (logits (K, B, C), z (K, B, head_dim)); stacked, so the step, the loss and the evaluation
    take one shape whatever K is, and a CUDA graph sees static shapes.
    """

    def __init__(self, shared: nn.Module, experts: list[nn.Module], feature_dim: int, num_classes: int,
                 head_dim: int = 128, classifier: str = "linear"):
        super().__init__()
        self.num_experts = len(experts)
        self.shared = shared
        self.experts = nn.ModuleList(experts)
        make = (lambda: CosineClassifier(feature_dim, num_classes)) if classifier == "cosine" else (
            lambda: nn.Linear(feature_dim, num_classes))
        self.classifiers = nn.ModuleList(make() for _ in experts)
        self.heads = nn.ModuleList(_mlp_head(feature_dim, head_dim) for _ in experts)
        self.feature_dim = feature_dim

    def expert_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The K experts' pooled features, each (B, d), from one pass through the shared trunk."""
        shared = self.shared(x)
        return [expert(shared) for expert in self.experts]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K·d): the experts' pooled features side by side. The ensemble's logits (their mean) are one
        linear map of this vector, as a single network's logits are of its pooled feature, so the Table 4
        scores read the representation the ensemble's prediction is made from (docs/experts.md)."""
        return torch.cat(self.expert_features(x), dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.expert_features(x)
        logits = torch.stack([cls(f) for cls, f in zip(self.classifiers, feats)])
        h = torch.stack([head(f) for head, f in zip(self.heads, feats)])
        # As SMCNet: the norm in fp32, the embedding back in the head's dtype (bf16 for the fused kernel).
        return logits, F.normalize(h.float(), dim=-1).to(h.dtype)


def build_experts_model(cfg, num_classes: int) -> MultiExpertNet:
    """The K > 1 network of a ModelConfig (trainer/models.build_model dispatches here)."""
    if cfg.pretrained_path:
        raise ConfigError("key 'model.pretrained_path': not read with model.experts > 1 (the experts' stages "
                          "have no pretrained counterpart)")
    match = re.fullmatch(r"resnet(\d+)", cfg.arch)
    if match and int(match.group(1)) in CIFAR_DEPTHS:
        shared, experts, dim = _cifar_parts(int(match.group(1)), cfg.experts)
    elif cfg.arch.startswith("timm/"):
        raise ConfigError(f"key 'model.experts': K > 1 needs a CIFAR ResNet or a torchvision ResNet/ResNeXt "
                          f"(RIDE's layouts), not model.arch={cfg.arch!r}")
    else:
        shared, experts, dim = _torchvision_parts(cfg.arch, cfg.experts)
    return MultiExpertNet(shared, experts, dim, num_classes, cfg.head_dim, cfg.expert_classifier)


# --------------------------------------------------------------------------------------------------
# Stage 1: SMC's objective per expert + RIDE's diversity term
# --------------------------------------------------------------------------------------------------


def diversity_temperatures(counts: np.ndarray, temperature: float, reweight_factor: float,
                           reweighted: bool) -> np.ndarray:
    """(C,) RIDE's per-class diversity temperatures: T everywhere, or, once reweighting is on (RIDE: after
    reweight_epoch), T·w_k with w_k = C·p_k·f + 1 − f normalized by its maximum (head classes keep T, tail
    classes get a lower one, so their distributions are pushed apart harder)."""
    counts = np.asarray(counts, dtype=np.float64)
    if not reweighted:
        return np.full(len(counts), temperature, dtype=np.float64)
    p = counts / counts.sum()
    w = len(counts) * p * reweight_factor + 1 - reweight_factor
    return temperature * w / w.max()


def diversity_term(logits: torch.Tensor, temperatures: torch.Tensor,
                   log_prior: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_k T̄² · KL(softmax(a̅/T) ‖ softmax(a_k/T)), batch mean, with a_k = l_k + log prior (the logits the
    cross-entropy's prediction is made from; a_k = l_k when log_prior is None), a̅ = mean_k a_k held constant
    (RIDE's no_grad target) and T̄ the mean of the (C,) temperatures. It measures how far each expert's
    distribution is from the ensemble's; the objective subtracts it (loss.diversity_weight in [0, 1)), which
    is RIDE's `additional_diversity_factor` < 0. logits: (K, N, C), any float dtype (computed in float32 at
    least); log_prior: (C,) or None.

    Why the adjusted logits: RIDE pairs the term with LDAM, which lowers only the target logit, so its CE
    prediction is never below the raw softmax on a non-target class and, for weight < 1, the CE's restoring
    force always beats the term's push. The logit-adjusted CE's prediction on a tail class j of a head sample
    is about (π_j/π_y) times the raw one, a restoring force that a push of the raw distribution overwhelms
    wherever π_j/π_y < weight: an expert is driven to predict j. On l_k + log prior the per-sample Hessian of
    CE − weight·KL in l_k is (1 − weight)(diag p̃ − p̃ p̃ᵀ) at T = 1, convex for weight < 1
    (docs/experts.md, "Why the diversity term sees the adjusted logits")."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logits, t = logits.to(dtype), temperatures.to(dtype)
    if log_prior is not None:
        logits = logits + log_prior.to(dtype)
    with torch.no_grad():
        target = F.softmax(logits.mean(0) / t, dim=-1)
    log_p = F.log_softmax(logits / t, dim=-1)  # (K, N, C)
    # KL(target ‖ p_k) summed over classes, mean over the batch, summed over experts (xlogy: 0·log 0 = 0).
    kl = (torch.xlogy(target, target)[None] - target[None] * log_p).sum(-1).mean(-1).sum()
    return t.mean() ** 2 * kl


class ExpertsObjective:
    """L = Σ_k [CE(f_k(x̃) + log prior, ỹ) + η·SMC(z_k)] − w·diversity: SMC's objective on each expert's own
    outputs (one fused SMC call per expert) and RIDE's diversity term, taken on the same f_k(x̃) + log prior
    the CE sees (`diversity_term` says why). Returns (loss, ce, smc) like
    trainer/step.Objective, with ce and smc summed over the experts (RIDE sums its per-expert losses)."""

    def __init__(self, base, diversity_weight: float, temperatures: torch.Tensor):
        self.base = base  # the trainer/step.Objective whose prior, η, τ, weighting, kernel and autocast apply
        self.diversity_weight = diversity_weight
        self.temperatures = temperatures  # (C,) on the device; refreshed in place per epoch (CUDA graphs)

    def __getattr__(self, name):  # num_classes, log_prior, autocast, ... as the base objective's
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __call__(self, model, images, y_f, y_b, lam):
        b = self.base
        v = images.shape[0] // y_f.shape[0]
        with b.autocast:
            logits, z = model(images)
        targets = soft_targets(y_f, y_b, lam, b.num_classes).repeat(v, 1)
        ce = sum(logit_adjusted_soft_ce(logits[k], targets, b.log_prior) for k in range(logits.shape[0]))
        if b.eta == 0:
            smc = ce.new_zeros(())
        else:
            yf, yb, lm = y_f.repeat(v), y_b.repeat(v), lam.repeat(v)
            smc = sum(distributed_smc_loss(z[k], yf, yb, lm, tau=b.tau, weighting=b.weighting, impl=b.impl).float()
                      for k in range(z.shape[0]))
        loss = ce + b.eta * smc
        if self.diversity_weight:
            # In the space the CE sees: on l_k + log prior (the prior tensor the CE adds, updated in place).
            loss = loss - self.diversity_weight * diversity_term(logits, self.temperatures, b.log_prior)
        return loss, ce, smc
