"""Fused Triton SMC loss: forward and backward without ever holding the N×N similarity matrix.

Same math and signature as `mixtail.kernels.reference.smc_loss` (the paper's Eq. 4); see that module for
the definitions of ℓ_ij, F_i, Bg_i and X_i. Extra memory is O(N·D), against about 20 B per pair for
the reference (5.4 GB at N = 16,384, measured on an H100).

Forward, one program per block of anchors, one pass over tiles of s = z_a·zᵀ/τ (BLOCK_M × BLOCK_N):
    - the row's log-sum-exp over j ≠ i with an online max (FlashAttention's running (m, l));
    - for each positive set S built in-register from the label vectors: Σ_{j∈S} s_ij and |S_i|.
  Since Σ_{j∈S} ℓ_ij = Σ_{j∈S} s_ij − |S_i|·lse_i, these give the loss. It saves 5 numbers per anchor:
  lse_i, c_S(i) = w_S(i)/|S_i| for S = F, Bg, X (0 for an empty set) and W_i = Σ_{S non-empty} w_S(i).

Backward recomputes the tiles from those statistics. With p_ij the softmax over j ≠ i,
    G_ij = ∂L/∂s_ij = (g/M)·(W_i·p_ij − Σ_S c_S(i)·[j ∈ S_i])
and, as z appears on both sides of z·zᵀ, dz = (G + Gᵀ)·z/τ in two kernels:
    - rows:    dz_a[i] = Σ_j G_ij z_j/τ, one program per anchor block looping over all N rows;
    - columns: dz[k]  += Σ_i G_ik z_i/τ, one program per block of the N rows looping over the anchors.
  Two passes recompute s twice (4 matmuls in all instead of 3) but need no atomics: every program
  owns its output rows, so the result is deterministic and there is no N/BLOCK_M-way contention on
  dz that a fused kernel with atomic column updates would have.

Precision: dots accumulate in fp32 (fp64 for fp64 inputs). bf16/fp16 features feed the tensor cores
directly on the GPU; fp32 features use 3xTF32 tensor-core dots (fp32-level error) unless
`torch.set_float32_matmul_precision` allows plain TF32, as it does for PyTorch's own matmuls. Under the
interpreter every operand is upcast (measured: a bf16 `tl.dot` is silently wrong there). Labels and λ get
no gradient.

The kernels are exposed as torch.library custom ops (`mixtail::smc_fwd`, `mixtail::smc_bwd`, with fake
implementations), made differentiable by `SMCLossFunction` through `torch.library.register_autograd`,
so `torch.compile(fullgraph=True)` traces `smc_loss` without a graph break.

    z = torch.nn.functional.normalize(torch.randn(4096, 128, device="cuda"), dim=1).requires_grad_()
    y = torch.randint(0, 100, (4096,), device="cuda")
    smc_loss(z, y, y.roll(1), torch.rand(4096, device="cuda"), impl="triton").backward()

On a CPU, set TRITON_INTERPRET=1 before this module is imported (Triton reads it when the kernels are
defined): `TRITON_INTERPRET=1 python -m pytest tests/test_smc_kernel.py`.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from mixtail.kernels.reference import Weighting, check_smc_arguments, check_smc_inputs, larger_component_labels
from mixtail.kernels.reference import smc_loss as reference_smc_loss


def _interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (it decides when a kernel is defined)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


INTERPRET = _interpreting()
IMPLS = ("auto", "reference", "triton")
_MODES = {"weighted": 0, "average": 1, "assign_larger": 2}
_MAX_DIM = 256  # one BLOCK_D-wide row tile stays in registers; the SMC head is 128-wide
_NUM_STATS = 5  # lse, c_f, c_b, c_x, W per anchor


# Tile shapes (BLOCK_M, BLOCK_N, num_warps, num_stages) per operand type. Each program keeps a
# BLOCK_M × D row tile (and, in the backward, a BLOCK_M × D accumulator) in registers; each pipeline stage
# buffers a BLOCK_N × D tile in shared memory. Chosen by compiling every kernel for sm_90 with Triton
# 3.8's ptxas (no GPU needed) and keeping shapes without register spills or with few; the autotuner
# times the survivors on the device and drops any that run out of shared memory.
_SHAPES = {
    "lowp": [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 8, 2), (64, 64, 4, 3), (64, 128, 8, 3)],
    # fp32 goes through 3xTF32 or TF32 tensor-core dots, whose split operands double register use.
    "fp32": [(128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2), (128, 64, 8, 2)],
    "fp64": [(32, 32, 4, 2)],
}
# Below this many anchor-candidate pairs a launch is too short to be worth tuning: take the first shape.
_TUNE_MIN_PAIRS = 2**21


def _shape_kind(dtype: torch.dtype) -> str:
    return {torch.float64: "fp64", torch.float32: "fp32"}.get(dtype, "lowp")


def _configs() -> list[triton.Config]:
    """Every shape for the GPU autotuner; exactly one under the interpreter (measured: two or more fail)."""
    if INTERPRET:
        # 32 keeps the tests' small odd N spanning several tiles, which exercises the loop and tail masks.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4)]
    shapes = dict.fromkeys(shape for kind in _SHAPES.values() for shape in kind)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """Keep the shapes meant for the feature dtype; only the first of them for small problems."""
    if len(configs) == 1:
        return configs
    wanted = _SHAPES[_shape_kind(named_args["Z"].dtype)]
    if named_args["N"] * named_args["M"] < _TUNE_MIN_PAIRS:
        wanted = wanted[:1]
    shape = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)  # noqa: E731
    return [c for c in configs if shape(c) in wanted]


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------

@triton.jit
def _dot_operand(x, F64: tl.constexpr, LOWP_DOT: tl.constexpr):
    """Cast a loaded tile for tl.dot: fp64 for fp64 runs, as-is for bf16/fp16 on the GPU, else fp32."""
    if F64:
        y = x.to(tl.float64)
    elif LOWP_DOT:
        y = x
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _smc_fwd_kernel(
    Z,  # (N, D) features, row-major, column stride 1
    YF,  # (N,) int32 foreground labels (assign_larger: the larger-component label)
    YB,  # (N,) int32 background labels (unused by assign_larger)
    LAM,  # (N,) float foreground ratio λ (read by `weighted` only)
    STATS,  # (5, M) out, fp32/fp64: lse, c_f, c_b, c_x, W for each anchor
    LOSS,  # (M,) out, fp32/fp64: per-anchor loss L_i
    stride_z,  # elements between consecutive rows of Z
    N,  # rows of Z: the candidates
    M,  # anchors: rows anchor_start .. anchor_start + M − 1 of Z
    D,  # feature width (≤ BLOCK_D)
    anchor_start,  # first anchor row
    INV_TAU: tl.constexpr,  # 1/τ; a constexpr keeps it exact in fp64 (runtime floats are passed as fp32)
    MODE: tl.constexpr,  # 0 weighted, 1 average, 2 assign_larger
    F64: tl.constexpr,  # compute in fp64 (fp64 inputs)
    LOWP_DOT: tl.constexpr,  # feed bf16/fp16 tiles to tl.dot without upcasting (GPU only)
    INPUT_PRECISION: tl.constexpr,  # fp32 dots: "tf32x3" or "tf32"
    BLOCK_M: tl.constexpr,  # anchors per program
    BLOCK_N: tl.constexpr,  # candidates per loop step
    BLOCK_D: tl.constexpr,  # next power of two ≥ max(D, 16)
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    rows = anchor_start + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    z_a = tl.load(Z + rows[:, None] * stride_z + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    z_a = _dot_operand(z_a, F64, LOWP_DOT)
    yf_a = tl.load(YF + rows, mask=row_ok, other=-1)[:, None]
    yb_a = tl.load(YB + rows, mask=row_ok, other=-1)[:, None]

    if F64:
        zero = tl.zeros([BLOCK_M], dtype=tl.float64)
    else:
        zero = tl.zeros([BLOCK_M], dtype=tl.float32)
    # A finite start for the running max: exp(m_old − m_new) stays 1, not NaN, while a row has seen
    # only masked entries (−inf), e.g. its own diagonal in the first tile or N = 1.
    m_run = zero - 1e30
    l_run = zero
    sum_f = zero
    sum_b = zero
    sum_x = zero
    cnt_f = tl.zeros([BLOCK_M], dtype=tl.int32)
    cnt_b = tl.zeros([BLOCK_M], dtype=tl.int32)
    cnt_x = tl.zeros([BLOCK_M], dtype=tl.int32)

    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        z_c = tl.load(Z + cols[:, None] * stride_z + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :],
                      other=0.0)
        z_c = _dot_operand(z_c, F64, LOWP_DOT)
        s = tl.dot(z_a, tl.trans(z_c), input_precision=INPUT_PRECISION) * INV_TAU  # (BLOCK_M, BLOCK_N)
        valid = col_ok[None, :] & (rows[:, None] != cols[None, :])  # j ≠ i, inside the N rows

        s_lse = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(s_lse, 1))
        l_run = l_run * tl.exp(m_run - m_new) + tl.sum(tl.exp(s_lse - m_new[:, None]), 1)
        m_run = m_new

        yf_c = tl.load(YF + cols, mask=col_ok, other=-1)[None, :]
        in_f = (yf_c == yf_a) & valid
        sum_f += tl.sum(tl.where(in_f, s, 0.0), 1)
        cnt_f += tl.sum(in_f.to(tl.int32), 1)
        if MODE != 2:
            yb_c = tl.load(YB + cols, mask=col_ok, other=-1)[None, :]
            in_b = (yb_c == yb_a) & valid
            in_x = ((yf_c == yb_a) | (yb_c == yf_a)) & valid & (in_f == 0) & (in_b == 0)
            sum_b += tl.sum(tl.where(in_b, s, 0.0), 1)
            cnt_b += tl.sum(in_b.to(tl.int32), 1)
            sum_x += tl.sum(tl.where(in_x, s, 0.0), 1)
            cnt_x += tl.sum(in_x.to(tl.int32), 1)

    # A row with no candidate at all (N = 1) has l = 0; its lse is never used (no positives), keep it finite.
    lse = tl.where(l_run > 0, m_run + tl.log(tl.where(l_run > 0, l_run, 1.0)), 0.0)
    if MODE == 0:
        lam = tl.load(LAM + rows, mask=row_ok, other=0.0)
        if F64:
            lam = lam.to(tl.float64)
        else:
            lam = lam.to(tl.float32)
        w_f = lam / 1.5
        w_b = (1.0 - lam) / 1.5
        w_x = zero + 0.5 / 1.5
    elif MODE == 1:
        w_f = zero + 1.0 / 3.0
        w_b = w_f
        w_x = w_f
    else:
        w_f = zero + 1.0
        w_b = zero
        w_x = zero
    # An empty set contributes 0 to the loss and its weight drops out of the gradient.
    c_f = tl.where(cnt_f > 0, w_f / tl.maximum(cnt_f, 1), 0.0)
    c_b = tl.where(cnt_b > 0, w_b / tl.maximum(cnt_b, 1), 0.0)
    c_x = tl.where(cnt_x > 0, w_x / tl.maximum(cnt_x, 1), 0.0)
    w_tot = tl.where(cnt_f > 0, w_f, 0.0) + tl.where(cnt_b > 0, w_b, 0.0) + tl.where(cnt_x > 0, w_x, 0.0)
    # Σ_S c_S·(Σ_{j∈S} s_ij − |S|·lse) with c_S·|S| = w_S for non-empty S.
    loss = -(c_f * sum_f + c_b * sum_b + c_x * sum_x - w_tot * lse)

    tl.store(LOSS + offs_m, loss, mask=row_ok)
    tl.store(STATS + 0 * M + offs_m, lse, mask=row_ok)
    tl.store(STATS + 1 * M + offs_m, c_f, mask=row_ok)
    tl.store(STATS + 2 * M + offs_m, c_b, mask=row_ok)
    tl.store(STATS + 3 * M + offs_m, c_x, mask=row_ok)
    tl.store(STATS + 4 * M + offs_m, w_tot, mask=row_ok)


@triton.jit
def _grad_tile(s, lse_a, c_f, c_b, c_x, w_tot, yf_a, yb_a, yf_c, yb_c, valid, MODE: tl.constexpr):
    """∂L_a/∂s_ac/(g/M) on one tile. Anchor-side vectors broadcast along one axis, candidates along the
    other, so the same code serves the row pass (anchors down) and the column pass (anchors across)."""
    in_f = yf_c == yf_a
    coef = tl.where(in_f, c_f, 0.0)
    if MODE != 2:
        in_b = yb_c == yb_a
        in_x = ((yf_c == yb_a) | (yb_c == yf_a)) & (in_f == 0) & (in_b == 0)
        coef += tl.where(in_b, c_b, 0.0) + tl.where(in_x, c_x, 0.0)
    return tl.where(valid, w_tot * tl.exp(s - lse_a) - coef, 0.0)


@triton.jit
def _smc_bwd_rows_kernel(
    Z,  # (N, D) features, row-major, column stride 1
    YF,  # (N,) int32 foreground labels (assign_larger: the larger-component label)
    YB,  # (N,) int32 background labels
    STATS,  # (5, M) from the forward: lse, c_f, c_b, c_x, W
    GRAD,  # (1,) upstream gradient g of the mean loss
    DZ_A,  # (M, D) out, fp32/fp64: Σ_j G_ij z_j/τ for each anchor i
    stride_z,  # elements between consecutive rows of Z
    N,  # rows of Z
    M,  # anchors
    D,  # feature width
    anchor_start,  # first anchor row
    INV_TAU: tl.constexpr,  # 1/τ
    MODE: tl.constexpr,  # 0 weighted, 1 average, 2 assign_larger
    F64: tl.constexpr,  # compute in fp64
    LOWP_DOT: tl.constexpr,  # bf16/fp16 tl.dot operands (GPU only)
    INPUT_PRECISION: tl.constexpr,  # fp32 dots: "tf32x3" or "tf32"
    BLOCK_M: tl.constexpr,  # anchors per program
    BLOCK_N: tl.constexpr,  # candidates per loop step
    BLOCK_D: tl.constexpr,  # next power of two ≥ max(D, 16)
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    rows = anchor_start + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    z_a = tl.load(Z + rows[:, None] * stride_z + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    z_a = _dot_operand(z_a, F64, LOWP_DOT)
    yf_a = tl.load(YF + rows, mask=row_ok, other=-1)[:, None]
    yb_a = tl.load(YB + rows, mask=row_ok, other=-1)[:, None]
    lse_a = tl.load(STATS + 0 * M + offs_m, mask=row_ok, other=0.0)[:, None]
    c_f = tl.load(STATS + 1 * M + offs_m, mask=row_ok, other=0.0)[:, None]
    c_b = tl.load(STATS + 2 * M + offs_m, mask=row_ok, other=0.0)[:, None]
    c_x = tl.load(STATS + 3 * M + offs_m, mask=row_ok, other=0.0)[:, None]
    w_tot = tl.load(STATS + 4 * M + offs_m, mask=row_ok, other=0.0)[:, None]

    if F64:
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        z_c = tl.load(Z + cols[:, None] * stride_z + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :],
                      other=0.0)
        z_c = _dot_operand(z_c, F64, LOWP_DOT)
        s = tl.dot(z_a, tl.trans(z_c), input_precision=INPUT_PRECISION) * INV_TAU
        valid = col_ok[None, :] & (rows[:, None] != cols[None, :])
        yf_c = tl.load(YF + cols, mask=col_ok, other=-1)[None, :]
        yb_c = tl.load(YB + cols, mask=col_ok, other=-1)[None, :]
        g = _grad_tile(s, lse_a, c_f, c_b, c_x, w_tot, yf_a, yb_a, yf_c, yb_c, valid, MODE)
        acc += tl.dot(g.to(z_c.dtype), z_c, input_precision=INPUT_PRECISION)

    scale = tl.load(GRAD) * INV_TAU / M
    tl.store(DZ_A + offs_m[:, None] * D + offs_d[None, :], acc * scale, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _smc_bwd_cols_kernel(
    Z,  # (N, D) features, row-major, column stride 1
    YF,  # (N,) int32 foreground labels (assign_larger: the larger-component label)
    YB,  # (N,) int32 background labels
    STATS,  # (5, M) from the forward: lse, c_f, c_b, c_x, W
    GRAD,  # (1,) upstream gradient g of the mean loss
    DZ,  # (N, D) out, fp32/fp64: Σ_i G_ik z_i/τ over anchors i, for every row k
    stride_z,  # elements between consecutive rows of Z
    N,  # rows of Z
    M,  # anchors
    D,  # feature width
    anchor_start,  # first anchor row
    INV_TAU: tl.constexpr,  # 1/τ
    MODE: tl.constexpr,  # 0 weighted, 1 average, 2 assign_larger
    F64: tl.constexpr,  # compute in fp64
    LOWP_DOT: tl.constexpr,  # bf16/fp16 tl.dot operands (GPU only)
    INPUT_PRECISION: tl.constexpr,  # fp32 dots: "tf32x3" or "tf32"
    BLOCK_M: tl.constexpr,  # rows k per program
    BLOCK_N: tl.constexpr,  # anchors per loop step
    BLOCK_D: tl.constexpr,  # next power of two ≥ max(D, 16)
):
    pid = tl.program_id(0)
    ks = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    k_ok = ks < N
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    z_k = tl.load(Z + ks[:, None] * stride_z + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    z_k = _dot_operand(z_k, F64, LOWP_DOT)
    yf_k = tl.load(YF + ks, mask=k_ok, other=-1)[:, None]
    yb_k = tl.load(YB + ks, mask=k_ok, other=-1)[:, None]

    if F64:
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_a in range(0, M, BLOCK_N):
        offs_a = start_a + tl.arange(0, BLOCK_N)
        a_ok = offs_a < M
        anchors = anchor_start + offs_a
        z_a = tl.load(Z + anchors[:, None] * stride_z + offs_d[None, :], mask=a_ok[:, None] & d_ok[None, :],
                      other=0.0)
        z_a = _dot_operand(z_a, F64, LOWP_DOT)
        # s is symmetric: this tile is s_{a,k} laid out with k down and the anchors a across.
        s = tl.dot(z_k, tl.trans(z_a), input_precision=INPUT_PRECISION) * INV_TAU  # (BLOCK_M, BLOCK_N)
        valid = a_ok[None, :] & (ks[:, None] != anchors[None, :])
        yf_a = tl.load(YF + anchors, mask=a_ok, other=-1)[None, :]
        yb_a = tl.load(YB + anchors, mask=a_ok, other=-1)[None, :]
        lse_a = tl.load(STATS + 0 * M + offs_a, mask=a_ok, other=0.0)[None, :]
        c_f = tl.load(STATS + 1 * M + offs_a, mask=a_ok, other=0.0)[None, :]
        c_b = tl.load(STATS + 2 * M + offs_a, mask=a_ok, other=0.0)[None, :]
        c_x = tl.load(STATS + 3 * M + offs_a, mask=a_ok, other=0.0)[None, :]
        w_tot = tl.load(STATS + 4 * M + offs_a, mask=a_ok, other=0.0)[None, :]
        g_t = _grad_tile(s, lse_a, c_f, c_b, c_x, w_tot, yf_a, yb_a, yf_k, yb_k, valid, MODE)  # G_ak, (k, a)
        acc += tl.dot(g_t.to(z_a.dtype), z_a, input_precision=INPUT_PRECISION)

    scale = tl.load(GRAD) * INV_TAU / M
    tl.store(DZ + ks[:, None] * D + offs_d[None, :], acc * scale, mask=k_ok[:, None] & d_ok[None, :])


def _autotuned(kernel: triton.JITFunction) -> triton.runtime.Autotuner:
    # The key also holds every tensor argument's dtype (Triton adds them), so bf16 and fp32 tune apart.
    return triton.autotune(configs=_configs(), key=["N", "M", "D"], prune_configs_by={"early_config_prune": _prune})(
        kernel)


_fwd_kernel = _autotuned(_smc_fwd_kernel)
_bwd_rows_kernel = _autotuned(_smc_bwd_rows_kernel)
_bwd_cols_kernel = _autotuned(_smc_bwd_cols_kernel)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------

def _compute_dtype(z: torch.Tensor) -> torch.dtype:
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _flags(z: torch.Tensor) -> dict:
    """Constexprs that depend on the input dtype and on where the kernel runs."""
    lowp = z.dtype in (torch.bfloat16, torch.float16)
    # fp32 follows torch.set_float32_matmul_precision: "highest" gets 3xTF32, the split-operand tensor-core
    # dot whose error (about 2**-21 per product) is at fp32 rounding level; Triton's IEEE fp32 dot runs on
    # FMA units and spills registers at any tile above 32×32 with D = 128 (ptxas, sm_90). "high" and
    # "medium" get plain TF32, as PyTorch's matmuls do.
    precision = "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    if z.dtype != torch.float32:
        precision = "ieee"  # ignored by bf16/fp16/fp64 dots; keeps the TF32 splitting pass away from them
    return {"F64": z.dtype == torch.float64, "LOWP_DOT": lowp and not INTERPRET, "INPUT_PRECISION": precision,
            "BLOCK_D": max(16, triton.next_power_of_2(z.shape[1]))}


def _check_inputs(z: torch.Tensor, fg_labels: torch.Tensor, bg_labels: torch.Tensor) -> None:
    if z.dim() != 2 or not z.is_contiguous():
        raise ValueError(f"features must be a contiguous (N, D) tensor, got shape {tuple(z.shape)}")
    if z.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"features must be float16/bfloat16/float32/float64, got {z.dtype}")
    if z.shape[1] > _MAX_DIM:
        raise ValueError(f"the Triton SMC loss supports D ≤ {_MAX_DIM}, got D = {z.shape[1]}; use impl='reference'")
    if z.numel() >= 2**31:
        raise ValueError("the Triton SMC loss indexes with int32: N·D must stay below 2**31")
    for t in (fg_labels, bg_labels):
        if t.dtype != torch.int32 or t.device != z.device:
            raise TypeError("labels must be int32 tensors on the features' device")
    if z.device.type == "cpu" and not INTERPRET:
        raise RuntimeError("impl='triton' on the CPU needs TRITON_INTERPRET=1 in the environment before "
                           "mixtail.kernels is imported (Triton reads it when the kernels are defined); "
                           "or use impl='reference'")


def smc_fwd(z: torch.Tensor, fg_labels: torch.Tensor, bg_labels: torch.Tensor, lam: torch.Tensor, tau: float,
            weighting: str, anchor_start: int, num_anchors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns the mean loss over the anchors (0-dim) and the (5, M) stats.

    z: (N, D) contiguous; labels: (N,) int32 (for assign_larger, both hold the larger-component label);
    lam: (N,) float.
    """
    _check_inputs(z, fg_labels, bg_labels)
    n, d = z.shape
    m = num_anchors
    cdt = _compute_dtype(z)
    stats = torch.empty(_NUM_STATS, m, dtype=cdt, device=z.device)  # (5, M)
    loss_rows = torch.empty(m, dtype=cdt, device=z.device)  # (M,)
    if m > 0:
        with _device_guard(z):
            _fwd_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)](
                z, fg_labels, bg_labels, lam.contiguous(), stats, loss_rows, z.stride(0), n, m, d, anchor_start,
                INV_TAU=1.0 / tau, MODE=_MODES[weighting], **_flags(z))
    return loss_rows.mean(), stats


def smc_bwd(grad: torch.Tensor, z: torch.Tensor, fg_labels: torch.Tensor, bg_labels: torch.Tensor,
            stats: torch.Tensor, tau: float, weighting: str, anchor_start: int) -> torch.Tensor:
    """Launch the two backward kernels. Returns dL/dz, (N, D) in z's dtype, for upstream gradient `grad`."""
    _check_inputs(z, fg_labels, bg_labels)
    n, d = z.shape
    m = stats.shape[1]
    cdt = _compute_dtype(z)
    grad = grad.reshape(1).to(cdt).contiguous()
    dz = torch.zeros(n, d, dtype=cdt, device=z.device)  # (N, D), column part
    if m == 0:
        return dz.to(z.dtype)
    dz_rows = torch.empty(m, d, dtype=cdt, device=z.device)  # (M, D), row part of the anchors
    args = dict(INV_TAU=1.0 / tau, MODE=_MODES[weighting], **_flags(z))
    with _device_guard(z):
        _bwd_cols_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)](
            z, fg_labels, bg_labels, stats, grad, dz, z.stride(0), n, m, d, anchor_start, **args)
        _bwd_rows_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)](
            z, fg_labels, bg_labels, stats, grad, dz_rows, z.stride(0), n, m, d, anchor_start, **args)
    dz[anchor_start:anchor_start + m] += dz_rows
    return dz.to(z.dtype)


def _device_guard(z: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device; make that z's device."""
    return torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# Custom ops and autograd
# --------------------------------------------------------------------------------------------------

@torch.library.custom_op("mixtail::smc_fwd", mutates_args=())
def _smc_fwd_op(z: torch.Tensor, fg_labels: torch.Tensor, bg_labels: torch.Tensor, lam: torch.Tensor, tau: float,
                weighting: str, anchor_start: int, num_anchors: int) -> tuple[torch.Tensor, torch.Tensor]:
    return smc_fwd(z, fg_labels, bg_labels, lam, tau, weighting, anchor_start, num_anchors)


@_smc_fwd_op.register_fake
def _(z: torch.Tensor, fg_labels: torch.Tensor, bg_labels: torch.Tensor, lam: torch.Tensor, tau: float,
      weighting: str, anchor_start: int, num_anchors: int) -> tuple[torch.Tensor, torch.Tensor]:
    cdt = _compute_dtype(z)
    return z.new_empty((), dtype=cdt), z.new_empty((_NUM_STATS, num_anchors), dtype=cdt)


@torch.library.custom_op("mixtail::smc_bwd", mutates_args=())
def _smc_bwd_op(grad: torch.Tensor, z: torch.Tensor, fg_labels: torch.Tensor, bg_labels: torch.Tensor,
                stats: torch.Tensor, tau: float, weighting: str, anchor_start: int) -> torch.Tensor:
    return smc_bwd(grad, z, fg_labels, bg_labels, stats, tau, weighting, anchor_start)


@_smc_bwd_op.register_fake
def _(grad: torch.Tensor, z: torch.Tensor, fg_labels: torch.Tensor, bg_labels: torch.Tensor, stats: torch.Tensor,
      tau: float, weighting: str, anchor_start: int) -> torch.Tensor:
    return torch.empty_like(z)


class SMCLossFunction(torch.autograd.Function):
    """Autograd for `mixtail::smc_fwd`: gradients flow to the features only.

    Written in the setup_context style so the same methods serve `SMCLossFunction.apply` and
    `torch.library.register_autograd`, which makes the custom op itself differentiable (the form
    torch.compile traces without a graph break).
    """

    @staticmethod
    def forward(z: torch.Tensor, fg_labels: torch.Tensor, bg_labels: torch.Tensor, lam: torch.Tensor, tau: float,
                weighting: str, anchor_start: int, num_anchors: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.mixtail.smc_fwd(z, fg_labels, bg_labels, lam, tau, weighting, anchor_start, num_anchors)

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
        z, fg_labels, bg_labels, _, tau, weighting, anchor_start, _ = inputs
        ctx.save_for_backward(z, fg_labels, bg_labels, output[1])
        ctx.tau, ctx.weighting, ctx.anchor_start = tau, weighting, anchor_start
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor,
                 _grad_stats: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        z, fg_labels, bg_labels, stats = ctx.saved_tensors
        dz = None
        if ctx.needs_input_grad[0]:
            dz = torch.ops.mixtail.smc_bwd(grad_loss, z, fg_labels, bg_labels, stats, ctx.tau, ctx.weighting,
                                           ctx.anchor_start)
        return dz, None, None, None, None, None, None, None


torch.library.register_autograd("mixtail::smc_fwd", SMCLossFunction.backward,
                                setup_context=SMCLossFunction.setup_context)


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------

def smc_loss(features: torch.Tensor, fg_labels: torch.Tensor, bg_labels: torch.Tensor, lam: torch.Tensor, *,
             tau: float = 0.1, weighting: Weighting = "weighted", anchor_start: int = 0,
             num_anchors: int | None = None, impl: str = "auto") -> torch.Tensor:
    """SMC loss (the paper's Eq. 4), mean over the anchors `anchor_start ... anchor_start + num_anchors − 1`.

    features: (N, D) L2-normalized embeddings (D ≤ 256 for Triton); fg_labels, bg_labels: (N,) int, each
    row's foreground and background class; lam: (N,) float, its foreground area ratio (1 for an unmixed
    image). With V views of B pairs, repeat the labels and λ per view (row v·B + b is view v of pair b).
    tau: the temperature; weighting: "weighted" (the paper's), "average" or "assign_larger" (Table 5).
    anchor_start, num_anchors: score only those rows as anchors, against all N (distributed training).
    impl: "reference" (plain PyTorch, kernels/reference.py), "triton" (the fused kernels of this module,
    forward and backward in O(N·D) memory; on the CPU only under TRITON_INTERPRET=1), or "auto": Triton for
    CUDA tensors, the reference elsewhere. The result is float32 for half/float32 features and float64 for
    float64; gradients flow to the features only.

    >>> import torch, mixtail
    >>> g = torch.Generator().manual_seed(0)
    >>> z = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1).requires_grad_()
    >>> y_f, y_b = torch.tensor([0, 1, 2, 0, 0, 1, 2, 0]), torch.tensor([1, 1, 0, 2, 1, 1, 0, 2])
    >>> lam = torch.tensor([0.3, 1.0, 0.6, 0.5] * 2)
    >>> loss = mixtail.smc_loss(z, y_f, y_b, lam, tau=0.1, impl="reference")
    >>> loss.backward()
    >>> round(loss.item(), 4), z.grad.shape
    (4.2989, torch.Size([8, 16]))
    >>> torch.equal(mixtail.smc_loss(z, y_f, y_b, lam, impl="auto"), loss)  # auto: the reference on the CPU
    True
    >>> if torch.cuda.is_available():  # the fused kernels agree with the reference
    ...     fused = mixtail.smc_loss(z.cuda(), y_f.cuda(), y_b.cuda(), lam.cuda(), impl="triton")
    ...     assert torch.allclose(fused.cpu(), loss, atol=1e-4)
    """
    check_smc_arguments(features, fg_labels, bg_labels, lam, tau, anchor_start, num_anchors, values=True)
    return unchecked_smc_loss(features, fg_labels, bg_labels, lam, tau=tau, weighting=weighting,
                              anchor_start=anchor_start, num_anchors=num_anchors, impl=impl)


def unchecked_smc_loss(features: torch.Tensor, fg_labels: torch.Tensor, bg_labels: torch.Tensor, lam: torch.Tensor,
                       *, tau: float, weighting: Weighting, anchor_start: int, num_anchors: int | None,
                       impl: str) -> torch.Tensor:
    """`smc_loss` without its λ check, which reads λ on the host: for the trainer, whose λ its own plan drew
    (kernels/distributed.py, after check_smc_arguments with values=False)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "triton" if features.is_cuda else "reference"
    if impl == "reference":
        return reference_smc_loss(features, fg_labels, bg_labels, lam, tau=tau, weighting=weighting,
                                  anchor_start=anchor_start, num_anchors=num_anchors)

    m = check_smc_inputs(features, fg_labels, bg_labels, lam, weighting, anchor_start, num_anchors)
    if weighting == "assign_larger":
        fg_labels = bg_labels = larger_component_labels(fg_labels, bg_labels, lam)
    # int32 labels halve the label traffic and the compare width; class ids are far below 2**31.
    fg = fg_labels.to(device=features.device, dtype=torch.int32).contiguous()
    bg = bg_labels.to(device=features.device, dtype=torch.int32).contiguous()
    lam = lam.detach().to(device=features.device, dtype=_compute_dtype(features)).contiguous()
    loss, _ = torch.ops.mixtail.smc_fwd(features.contiguous(), fg, bg, lam, float(tau), weighting, anchor_start, m)
    return loss


__all__ = ["smc_loss", "unchecked_smc_loss", "smc_fwd", "smc_bwd", "SMCLossFunction", "IMPLS", "INTERPRET"]
