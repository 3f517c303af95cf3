"""kernels/reference.py against a brute-force loop, an independent SupCon, and gradcheck.

    python -m pytest tests/test_reference_loss.py -q
"""

import math

import pytest
import torch
import torch.nn.functional as F

from mixtail.kernels import smc_loss
from mixtail.kernels.reference import smc_loss as reference_smc_loss


def _inputs(n, d=8, classes=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    y_f = torch.randint(0, classes, (n,), generator=g)
    y_b = torch.randint(0, classes, (n,), generator=g)
    lam = 0.2 + 0.6 * torch.rand(n, generator=g, dtype=dtype)
    return z, y_f, y_b, lam


def _brute_force(z, y_f, y_b, lam, tau, weighting):
    """The paper's Eq. 4 with Python loops over anchors and candidates, in float64."""
    n = len(z)
    total = 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        s = {j: float(z[i] @ z[j]) / tau for j in others}
        if not others:
            continue
        lse = math.log(sum(math.exp(s[j]) for j in others))
        ell = {j: s[j] - lse for j in others}
        if weighting == "assign_larger":
            y = [int(y_f[k]) if lam[k] >= 0.5 else int(y_b[k]) for k in range(n)]
            pos = [j for j in others if y[j] == y[i]]
            total += sum(ell[j] for j in pos) / len(pos) if pos else 0.0
            continue
        f_set = [j for j in others if y_f[j] == y_f[i]]
        b_set = [j for j in others if y_b[j] == y_b[i]]
        x_set = [j for j in others if j not in f_set and j not in b_set
                 and (y_f[j] == y_b[i] or y_b[j] == y_f[i])]
        mean = lambda S: sum(ell[j] for j in S) / len(S) if S else 0.0  # noqa: E731
        if weighting == "weighted":
            w = (float(lam[i]) / 1.5, (1 - float(lam[i])) / 1.5, 0.5 / 1.5)
        else:
            w = (1 / 3, 1 / 3, 1 / 3)
        total += w[0] * mean(f_set) + w[1] * mean(b_set) + w[2] * mean(x_set)
    return -total / n


@pytest.mark.parametrize("weighting", ["weighted", "average", "assign_larger"])
@pytest.mark.parametrize("n,classes,seed", [(1, 3, 0), (2, 2, 1), (7, 3, 2), (13, 5, 3), (24, 2, 4), (17, 9, 5)])
def test_matches_brute_force(weighting, n, classes, seed):
    z, y_f, y_b, lam = _inputs(n, classes=classes, seed=seed)
    got = reference_smc_loss(z, y_f, y_b, lam, tau=0.1, weighting=weighting)
    want = _brute_force(z, y_f, y_b, lam, 0.1, weighting)
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def _supcon(z, y, tau):
    """Khosla et al. SupCon written independently: mean over anchors of the mean log-probability of the
    positives (other rows with the same label), each anchor's softmax over all other rows; an anchor
    without positives contributes 0."""
    n = len(z)
    sim = (z @ z.T) / tau
    eye = torch.eye(n, dtype=torch.bool)
    sim = sim.masked_fill(eye, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (y[:, None] == y[None, :]) & ~eye
    per_anchor = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(1) / pos.sum(1).clamp(min=1)
    return -per_anchor.mean()


@pytest.mark.parametrize("seed", range(4))
def test_unmixed_oracle_identity(seed):
    # docs/method.md, "The SMC loss": with y_f = y_b = y, X is empty, F = Bg, and L_SMC = SupCon / 1.5 for any λ.
    z, y, _, lam = _inputs(20, classes=4, seed=seed)
    got = reference_smc_loss(z, y, y, lam, tau=0.1)
    assert got.item() == pytest.approx(_supcon(z, y, 0.1).item() / 1.5, rel=1e-12)


def test_assign_larger_is_supcon_on_larger_labels():
    z, y_f, y_b, lam = _inputs(16, classes=3, seed=7)
    y = torch.where(lam >= 0.5, y_f, y_b)
    got = reference_smc_loss(z, y_f, y_b, lam, tau=0.2, weighting="assign_larger")
    assert got.item() == pytest.approx(_supcon(z, y, 0.2).item(), rel=1e-12)


def test_self_is_excluded_and_empty_sets_contribute_zero():
    # Every label distinct: every positive set is empty, so the loss is exactly 0 with a zero gradient.
    z, _, _, lam = _inputs(6, seed=1)
    y_f, y_b = torch.arange(6), torch.arange(6, 12)
    z = z.clone().requires_grad_(True)
    loss = reference_smc_loss(z, y_f, y_b, lam)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(z.grad) == 0
    # Two identical rows that share only their own labels: if self were counted as a candidate the
    # denominator would change, and the loss with it.
    z2 = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64), dim=1)
    y = torch.tensor([0, 0, 1])
    got = reference_smc_loss(z2, y, y, torch.ones(3, dtype=torch.float64), tau=1.0)
    # Rows 0 and 1 each have one positive (each other): ℓ = 1 − log(e^1 + e^0); row 2 has none.
    want = -(2 * (1 / 1.5) * (1 - math.log(math.e + 1))) / 3
    assert got.item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("weighting", ["weighted", "average", "assign_larger"])
def test_gradcheck_float64(weighting):
    z, y_f, y_b, lam = _inputs(9, d=5, classes=3, seed=11)
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: reference_smc_loss(x, y_f, y_b, lam, tau=0.3, weighting=weighting),
                                    (z,), eps=1e-6, atol=1e-8)


def test_gradient_finite_for_single_row():
    z, y_f, y_b, lam = _inputs(1, seed=3)
    z.requires_grad_(True)
    loss = reference_smc_loss(z, y_f, y_b, lam)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z.grad).all()


def test_anchor_block_is_the_mean_over_those_rows():
    z, y_f, y_b, lam = _inputs(12, classes=3, seed=5)
    full = reference_smc_loss(z, y_f, y_b, lam)
    parts = [reference_smc_loss(z, y_f, y_b, lam, anchor_start=s, num_anchors=4) for s in (0, 4, 8)]
    assert torch.stack(parts).mean().item() == pytest.approx(full.item(), rel=1e-12)
    with pytest.raises(ValueError, match="outside"):
        reference_smc_loss(z, y_f, y_b, lam, anchor_start=10, num_anchors=4)


def test_half_precision_inputs_are_computed_in_float32():
    z, y_f, y_b, lam = _inputs(10, seed=2, dtype=torch.float32)
    got = reference_smc_loss(z.bfloat16(), y_f, y_b, lam)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(reference_smc_loss(z.bfloat16().float(), y_f, y_b, lam).item(), rel=1e-6)


def test_public_entry_point_and_errors():
    z, y_f, y_b, lam = _inputs(8, seed=9)
    assert smc_loss(z, y_f, y_b, lam, impl="reference").item() == reference_smc_loss(z, y_f, y_b, lam).item()
    with pytest.raises(ValueError, match="weighting"):
        smc_loss(z, y_f, y_b, lam, weighting="larger")
    with pytest.raises(ValueError, match="impl"):
        smc_loss(z, y_f, y_b, lam, impl="cuda-magic")
    with pytest.raises(ValueError, match="lam"):
        smc_loss(z, y_f, y_b, lam[:-1])
