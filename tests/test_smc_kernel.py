"""kernels/smc_loss.py (the fused Triton SMC loss) against kernels/reference.py, forward and gradient.

    TRITON_INTERPRET=1 python -m pytest tests/test_smc_kernel.py -q     # CPU (conftest.py sets it too)
    python -m pytest tests/test_smc_kernel.py -q -m gpu                  # compiled kernels on a CUDA machine

On the CPU the kernels run in Triton's interpreter with one 32×32 tile shape, so the odd sizes below span
several tiles and a ragged tail. float64 runs the whole kernel in float64, which lets the tolerances sit
near rounding error: a wrong mask or a missing self-exclusion moves the result by orders of magnitude more
(test_tolerances_catch_wrong_masks shows it).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mixtail.kernels import IMPLS, WEIGHTINGS, smc_loss
from mixtail.kernels.reference import smc_loss as reference_smc_loss

# The package attribute `mixtail.kernels.smc_loss` is the function, so `import ... as` would bind it, not
# the module; import_module returns the module itself.
smc_module = importlib.import_module("mixtail.kernels.smc_loss")

CUDA = torch.cuda.is_available()
cpu_only = pytest.mark.skipif(CUDA, reason="interpreter test; the GPU runs the compiled kernels instead")

# One tolerance per dtype for the loss and the gradient (the gradient's entries are about 0.1).
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def _inputs(n: int, d: int = 20, classes: int = 4, seed: int = 0, dtype: torch.dtype = torch.float64,
            device: str = "cpu") -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    y_f = torch.randint(0, classes, (n,), generator=g)
    y_b = torch.randint(0, classes, (n,), generator=g)
    lam = 0.2 + 0.6 * torch.rand(n, generator=g, dtype=torch.float64)
    return z.to(device, dtype), y_f.to(device), y_b.to(device), lam.to(device, dtype)


def _loss_and_grad(impl: str, z: torch.Tensor, *args: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.detach().clone().requires_grad_()
    loss = smc_loss(z, *args, impl=impl, **kw)
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach(), grad


def _assert_matches_reference(z: torch.Tensor, *args: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    loss, grad = _loss_and_grad("triton", z, *args, **kw)
    ref_loss, ref_grad = _loss_and_grad("reference", z, *args, **kw)
    tol = TOL[ref_loss.dtype]
    torch.testing.assert_close(loss, ref_loss, **tol)
    torch.testing.assert_close(grad, ref_grad.to(grad.dtype), **tol)
    return loss, grad


def _dense_loss(z: torch.Tensor, y_f: torch.Tensor, y_b: torch.Tensor, lam: torch.Tensor, tau: float = 0.1,
                weighting: str = "weighted", *, include_self: bool = False,
                cross_excludes_shared: bool = True) -> torch.Tensor:
    """The paper's Eq. 4 densely in z's own dtype, with switches that break it the way a kernel bug would.

    With the default switches it is the reference's math without the upcast: in bfloat16 it is the
    "PyTorch in the same dtype" baseline of flash-attention's tolerance rule.
    """
    n = z.shape[0]
    others = torch.ones(n, n, dtype=torch.bool, device=z.device)
    if not include_self:
        others.fill_diagonal_(False)
    s = z @ z.T / tau  # (N, N)
    log_prob = s - torch.logsumexp(s.masked_fill(~others, float("-inf")), dim=1, keepdim=True)
    lam = lam.to(z.dtype)
    if weighting == "assign_larger":
        y = torch.where(lam >= 0.5, y_f, y_b)
        sets = [((y[:, None] == y[None, :]) & others, torch.ones_like(lam))]
    else:
        fg = (y_f[:, None] == y_f[None, :]) & others
        bg = (y_b[:, None] == y_b[None, :]) & others
        cross = ((y_f[None, :] == y_b[:, None]) | (y_b[None, :] == y_f[:, None])) & others
        if cross_excludes_shared:
            cross = cross & ~fg & ~bg
        if weighting == "weighted":
            weights = [lam / 1.5, (1 - lam) / 1.5, torch.full_like(lam, 0.5 / 1.5)]
        else:
            weights = [torch.full_like(lam, 1 / 3)] * 3
        sets = list(zip([fg, bg, cross], weights))
    total = torch.zeros_like(lam)
    for mask, w in sets:
        total = total + w * (log_prob * mask).sum(1) / mask.sum(1).clamp(min=1)
    return -total.mean()


# --------------------------------------------------------------------------------------------------
# CPU: the interpreter against the reference
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 37, 97])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(n, weighting, dtype):
    z, y_f, y_b, lam = _inputs(n, dtype=dtype, seed=n)
    loss, grad = _assert_matches_reference(z, y_f, y_b, lam, weighting=weighting)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    if n == 1:  # no candidate, so no positive: the loss and its gradient are exactly 0
        assert loss.item() == 0.0 and not grad.any()


def _pattern(name: str, n: int) -> tuple[torch.Tensor, ...]:
    z, y_f, y_b, lam = _inputs(n, seed=3)
    if name == "all_equal":
        y_f = y_b = torch.zeros(n, dtype=torch.long)
    elif name == "unmixed":
        y_b = y_f.clone()
        lam = torch.ones_like(lam)
    elif name == "no_positives":  # every label unique, and no y_f equals any y_b: all sets are empty
        y_f, y_b = torch.arange(n), torch.arange(n) + n
    elif name == "some_isolated":  # rows 0..9 share no label with anyone, the rest have positives
        y_f[:10], y_b[:10] = torch.arange(100, 110), torch.arange(200, 210)
    elif name == "lam_ties":  # assign_larger's λ = 0.5 tie and the unmixed end points
        lam = torch.tensor([0.0, 0.5, 1.0], dtype=lam.dtype).repeat(n)[:n]
    return z, y_f, y_b, lam


@pytest.mark.parametrize("pattern", ["all_equal", "unmixed", "no_positives", "some_isolated", "lam_ties"])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_label_patterns(pattern, weighting):
    z, y_f, y_b, lam = _pattern(pattern, 45)
    loss, grad = _assert_matches_reference(z, y_f, y_b, lam, weighting=weighting)
    if pattern == "no_positives" and weighting != "assign_larger":
        assert loss.item() == 0.0 and not grad.any()


def test_unmixed_is_scaled_supcon():
    """The oracle identity of docs/method.md, "The SMC loss" holds for the kernel too: with y_f = y_b,
    weighted = (1/1.5)·assign_larger."""
    z, y_f, _, lam = _inputs(41, seed=5)
    weighted, _ = _loss_and_grad("triton", z, y_f, y_f, lam, weighting="weighted")
    supcon, _ = _loss_and_grad("triton", z, y_f, y_f, lam, weighting="assign_larger")
    torch.testing.assert_close(weighted, supcon / 1.5, **TOL[torch.float64])


@pytest.mark.parametrize("start,count", [(0, 45), (5, 20), (31, 14), (44, 1), (0, 1), (13, None)])
@pytest.mark.parametrize("weighting", ["weighted", "assign_larger"])
def test_anchor_blocks(start, count, weighting):
    z, y_f, y_b, lam = _inputs(45, seed=7)
    _assert_matches_reference(z, y_f, y_b, lam, weighting=weighting, anchor_start=start, num_anchors=count)


def test_anchor_blocks_compose():
    """The mean over two anchor blocks, weighted by their sizes, is the loss over all anchors (DDP's sum)."""
    z, y_f, y_b, lam = _inputs(45, seed=8)
    full, full_grad = _loss_and_grad("triton", z, y_f, y_b, lam)
    first, g1 = _loss_and_grad("triton", z, y_f, y_b, lam, anchor_start=0, num_anchors=20)
    second, g2 = _loss_and_grad("triton", z, y_f, y_b, lam, anchor_start=20, num_anchors=25)
    torch.testing.assert_close((20 * first + 25 * second) / 45, full, **TOL[torch.float64])
    torch.testing.assert_close((20 * g1 + 25 * g2) / 45, full_grad, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tolerances_catch_wrong_masks(dtype):
    """The tolerances above are tight: a kernel that kept j = i, or let X_i overlap F_i ∪ Bg_i, would fail."""
    z, y_f, y_b, lam = _inputs(37, seed=11, dtype=dtype)
    loss, grad = _assert_matches_reference(z, y_f, y_b, lam)
    tol = TOL[dtype]
    for broken in (dict(include_self=True), dict(cross_excludes_shared=False)):
        zb = z.detach().clone().requires_grad_()
        wrong = _dense_loss(zb, y_f, y_b, lam, **broken)
        (wrong_grad,) = torch.autograd.grad(wrong, zb)
        loss_gap = (wrong - loss).abs().item()
        grad_gap = (wrong_grad - grad).abs().max().item()
        assert loss_gap > 100 * (tol["atol"] + tol["rtol"] * loss.abs().item()), broken
        assert grad_gap > 100 * (tol["atol"] + tol["rtol"] * grad.abs().max().item()), broken
    # The dense helper with its switches at their defaults is the reference (it is the bf16 baseline below).
    torch.testing.assert_close(_dense_loss(z, y_f, y_b, lam), loss, **tol)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_gradcheck(weighting):
    """Finite differences of the kernel's own forward confirm its backward, independently of the reference."""
    z, y_f, y_b, lam = _inputs(9, d=5, classes=3, seed=13)
    z.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: smc_loss(x, y_f, y_b, lam, weighting=weighting, anchor_start=2, num_anchors=6, impl="triton"),
        (z,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_is_upcast_under_the_interpreter(dtype):
    """Half features: the interpreter path upcasts every tile, so it matches the reference (also fp32 math)."""
    z, y_f, y_b, lam = _inputs(50, seed=17)
    zh = z.to(dtype)
    loss, grad = _loss_and_grad("triton", zh, y_f, y_b, lam.float())
    ref_loss, ref_grad = _loss_and_grad("reference", zh, y_f, y_b, lam.float())
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, ref_loss, **TOL[torch.float32])
    # Both gradients are rounded to the half type once at the end: allow one ulp of it.
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=torch.finfo(dtype).eps, atol=1e-6)


def test_dispatch_and_errors(monkeypatch):
    z, y_f, y_b, lam = _inputs(10)
    assert IMPLS == ("auto", "reference", "triton")
    if not CUDA:
        assert smc_loss(z, y_f, y_b, lam).item() == reference_smc_loss(z, y_f, y_b, lam).item()
    with pytest.raises(ValueError, match="impl"):
        smc_loss(z, y_f, y_b, lam, impl="cuda-magic")
    with pytest.raises(ValueError, match="weighting"):
        smc_loss(z, y_f, y_b, lam, weighting="nope", impl="triton")
    with pytest.raises(ValueError, match="outside"):
        smc_loss(z, y_f, y_b, lam, anchor_start=8, num_anchors=5, impl="triton")
    with pytest.raises(ValueError, match="shape"):
        smc_loss(z, y_f[:5], y_b, lam, impl="triton")
    monkeypatch.setattr(smc_module, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        smc_loss(z.cpu(), y_f.cpu(), y_b.cpu(), lam.cpu(), impl="triton")


def test_autograd_function_apply_matches_op():
    z, y_f, y_b, lam = _inputs(20)
    z.requires_grad_()
    y32f, y32b = y_f.int(), y_b.int()
    loss, stats = smc_module.SMCLossFunction.apply(z, y32f, y32b, lam, 0.1, "weighted", 0, 20)
    (grad,) = torch.autograd.grad(loss, z)
    assert stats.shape == (5, 20) and not stats.requires_grad
    ref_loss, ref_grad = _loss_and_grad("reference", z, y_f, y_b, lam)
    torch.testing.assert_close(loss.detach(), ref_loss, **TOL[torch.float64])
    torch.testing.assert_close(grad, ref_grad, **TOL[torch.float64])


def test_custom_ops_pass_opcheck():
    z, y_f, y_b, lam = _inputs(12)
    args = (z.requires_grad_(), y_f.int(), y_b.int(), lam, 0.1, "average", 1, 10)
    torch.library.opcheck(torch.ops.mixtail.smc_fwd.default, args)
    _, stats = torch.ops.mixtail.smc_fwd(*args)
    grad_args = (torch.tensor(1.0, dtype=torch.float64), z.detach(), y_f.int(), y_b.int(), stats.detach(), 0.1,
                 "average", 1)
    torch.library.opcheck(torch.ops.mixtail.smc_bwd.default, grad_args)


def test_torch_compile_fullgraph():
    """The custom ops keep torch.compile from graph-breaking (aot_eager: traces with the fake impls)."""
    z, y_f, y_b, lam = _inputs(33, seed=19)

    def step(x: torch.Tensor) -> torch.Tensor:
        return smc_loss(x * 1.0, y_f, y_b, lam, weighting="weighted", impl="triton")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    zc = z.clone().requires_grad_()
    loss = compiled(zc)
    loss.backward()
    ref_loss, ref_grad = _loss_and_grad("reference", z, y_f, y_b, lam)
    torch.testing.assert_close(loss.detach(), ref_loss, **TOL[torch.float64])
    torch.testing.assert_close(zc.grad, ref_grad, **TOL[torch.float64])


_SM90_COMPILE = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import importlib
    m = importlib.import_module("mixtail.kernels.smc_loss")
    assert not m.INTERPRET
    kernels = (m._smc_fwd_kernel, m._smc_bwd_rows_kernel, m._smc_bwd_cols_kernel)
    for zt, kind, precision, mode in (("bf16", "lowp", "ieee", 0), ("fp32", "fp32", "tf32x3", 1),
                                      ("fp64", "fp64", "ieee", 2)):
        acc = "fp64" if zt == "fp64" else "fp32"
        bm, bn, warps, stages = m._SHAPES[kind][0]
        for fn in kernels:
            sig = dict(zip(fn.arg_names[:6], [f"*{zt}", "*i32", "*i32", f"*{acc}", f"*{acc}", f"*{acc}"]))
            sig.update(stride_z="i32", N="i32", M="i32", D="i32", anchor_start="i32")
            consts = dict(INV_TAU=10.0, MODE=mode, F64=zt == "fp64", LOWP_DOT=zt == "bf16",
                          INPUT_PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=128)
            sig.update(dict.fromkeys(consts, "constexpr"))
            triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=warps, num_stages=stages))
    print("compiled")
""")


@cpu_only
@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """No GPU here, but Triton ships ptxas: compile each kernel for an H100 (sm_90) to catch constructs
    that only the interpreter accepts. Uses Triton's compiler API, which moves between releases: a
    failure that names ASTSource or GPUTarget is about this test, not the kernels."""
    ptxas = Path(smc_module.triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this Triton build has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]


@cpu_only
def test_bench_kernel_smoke(tmp_path):
    from mixtail.benchmarks.bench_kernel import main

    result = main(["--sizes", "64", "96", "--out", str(tmp_path), "--budget-s", "0.05"])
    record = json.loads(Path(result["path"]).read_text())
    assert Path(result["path"]).name.startswith("kernel_cpu_")
    assert {(r["N"], r["impl"]) for r in record["rows"]} == {(64, "reference"), (64, "triton"), (96, "reference"),
                                                             (96, "triton")}
    assert all(r["median_ms"] > 0 for r in record["rows"])
    assert record["environment"]["torch"] == torch.__version__


# --------------------------------------------------------------------------------------------------
# GPU: the compiled kernels
# --------------------------------------------------------------------------------------------------

def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("n", [1000, 2051])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_gpu_bf16_flash_attention_rule(n, weighting):
    """bf16 features: error against a float64 oracle ≤ 2× the error of PyTorch computing in bf16 + atol.

    N = 2051 is above the autotuning threshold, so the tuned tile shapes are checked as well.
    """
    z, y_f, y_b, lam = _inputs(n, d=128, classes=50, seed=n, dtype=torch.float32, device="cuda")
    zb = z.to(torch.bfloat16)
    ref_loss, ref_grad = _loss_and_grad("reference", zb.double(), y_f, y_b, lam.double(), weighting=weighting)
    loss, grad = _loss_and_grad("triton", zb, y_f, y_b, lam, weighting=weighting)
    zp = zb.detach().clone().requires_grad_()
    pt_loss = _dense_loss(zp, y_f, y_b, lam, weighting=weighting)
    (pt_grad,) = torch.autograd.grad(pt_loss, zp)
    assert _max_err(loss, ref_loss) <= 2 * _max_err(pt_loss, ref_loss) + 1e-4
    assert _max_err(grad, ref_grad) <= 2 * _max_err(pt_grad, ref_grad) + 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("n", [1000, 2051])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_gpu_fp32_matches_reference(n, weighting):
    """fp32 features (3xTF32 dots) agree with the float64 reference to fp32 accuracy."""
    z, y_f, y_b, lam = _inputs(n, d=128, classes=50, seed=n, dtype=torch.float32, device="cuda")
    loss, grad = _loss_and_grad("triton", z, y_f, y_b, lam, weighting=weighting)
    ref_loss, ref_grad = _loss_and_grad("reference", z.double(), y_f, y_b, lam.double(), weighting=weighting)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-3, atol=2e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_gpu_fp64_and_anchor_block(weighting):
    z, y_f, y_b, lam = _inputs(301, d=128, classes=9, seed=23, device="cuda")
    _assert_matches_reference(z, y_f, y_b, lam, weighting=weighting)
    _assert_matches_reference(z, y_f, y_b, lam, weighting=weighting, anchor_start=77, num_anchors=150)
