"""Benchmark the SMC loss, forward + backward: the eager PyTorch reference against the fused Triton kernels.

    mixtail bench loss                                  # GPU: N ∈ {1024, 4096, 16384, 65536}, D = 128, fp32 + bf16
    mixtail bench loss --sizes 1024 4096 --dtypes bf16 --out /tmp/results
    python -m mixtail.benchmarks.bench_kernel --sizes 64 128     # CPU smoke test under the Triton interpreter

It first checks the Triton loss and gradient against the reference at a small N (and stops if they
differ), then times each (dtype, N, impl): median and p20/p80 over repeats with CUDA events and an L2
flush, the peak memory allocated above the inputs, the speed-up over eager and a model throughput that
counts the three matmuls the math needs (s = z·zᵀ, G·z and Gᵀ·z: 6·N²·D flops). The eager reference is
skipped where its O(N²) memory would not fit (estimated from the bytes per pair it used at smaller N),
shown as "OOM (est. X GB)". Writes ./benchmarks-results/kernel_<gpu-or-cpu>_<yyyymmdd>.json (or --out).
On the CPU it sets TRITON_INTERPRET=1 itself, before the kernels are imported.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch

from mixtail.benchmarks.common import (argument_parser, environment, format_table, free_memory_bytes, out_dir_argument,
                                       peak_memory_since, positive_float, positive_int, reps_for, reset_peak_memory,
                                       summarize, synchronize, time_fn, write_json)
from mixtail.errors import UsageError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Measured before: the reference peaked at 5.4 GB for N = 16,384 on an H100, about 20 B per pair; assume a bit more
# until this run has measured it.
_DEFAULT_BYTES_PER_PAIR = 24.0
TARGET_N, TARGET_SPEEDUP, TARGET_EXTRA_MB = 16384, 3.0, 64.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argument_parser("mixtail bench loss", __doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=positive_int, nargs="+", default=[1024, 4096, 16384, 65536] if gpu else [64, 128],
                   help="batch sizes N (rows of z)")
    p.add_argument("--dim", type=positive_int, default=128, help="feature width D")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"] if gpu else ["fp32"])
    p.add_argument("--impls", nargs="+", choices=["reference", "triton"], default=["reference", "triton"])
    p.add_argument("--weighting", default="weighted", choices=["weighted", "average", "assign_larger"])
    p.add_argument("--tau", type=positive_float, default=0.1)
    p.add_argument("--classes", type=positive_int, default=100, help="label range of y_f and y_b")
    p.add_argument("--budget-s", type=positive_float, default=2.0 if gpu else 0.5, help="timing budget per row")
    out_dir_argument(p)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_inputs(n: int, d: int, dtype: torch.dtype, device: torch.device, classes: int,
                seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    y_f = torch.randint(0, classes, (n,), generator=g)
    y_b = torch.randint(0, classes, (n,), generator=g)
    lam = 0.2 + 0.6 * torch.rand(n, generator=g)
    return (z.to(device=device, dtype=dtype).requires_grad_(), y_f.to(device), y_b.to(device), lam.to(device))


def verify(device: torch.device, args: argparse.Namespace) -> None:
    """Triton against the float64 reference at a small, odd N, every weighting; exits on a mismatch.

    The oracle sees the same rounded inputs, so the tolerances measure the kernel's own arithmetic:
    fp32-level for fp32 (3xTF32 dots), and bf16's rounding of G and of the output gradient for bf16
    (tests/test_smc_kernel.py holds the stricter flash-attention rule).
    """
    from mixtail.kernels import smc_loss

    tolerances = {torch.float32: (1e-4, 1e-6), torch.bfloat16: (2e-2, 1e-4)}  # (rtol, atol) of the gradient
    dtypes = [torch.float32] + [DTYPES[k] for k in args.dtypes if DTYPES[k] != torch.float32]
    n, d = (257, args.dim) if device.type == "cuda" else (67, min(args.dim, 32))
    for weighting in ("weighted", "average", "assign_larger"):
        z, y_f, y_b, lam = make_inputs(n, d, torch.float32, device, classes=7, seed=args.seed)
        for dtype in dtypes:
            zq = z.detach().to(dtype)
            z64 = zq.double().requires_grad_()
            ref = smc_loss(z64, y_f, y_b, lam.double(), tau=args.tau, weighting=weighting, impl="reference")
            (ref_grad,) = torch.autograd.grad(ref, z64)
            zc = zq.clone().requires_grad_()
            out = smc_loss(zc, y_f, y_b, lam, tau=args.tau, weighting=weighting, impl="triton")
            (grad,) = torch.autograd.grad(out, zc)
            rtol, atol = tolerances[dtype]
            try:
                torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol)
            except AssertionError as err:
                raise RuntimeError(f"Triton SMC loss disagrees with the reference ({weighting}, {dtype}, N={n}):\n{err}")
    print(f"verified: Triton matches the float64 reference at N={n}, D={d} for every weighting")


def bench_one(impl: str, z: torch.Tensor, y_f: torch.Tensor, y_b: torch.Tensor, lam: torch.Tensor,
              args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from mixtail.kernels import smc_loss

    def step() -> None:
        z.grad = None
        smc_loss(z, y_f, y_b, lam, tau=args.tau, weighting=args.weighting, impl=impl).backward()

    step()  # compile and autotune outside the measured runs
    base = reset_peak_memory(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    once_s = time.perf_counter() - start
    peak = peak_memory_since(device, base)
    times = time_fn(step, device=device, reps=reps_for(once_s, budget_s=args.budget_s), warmup=1)
    row = summarize(times)
    row["extra_MB"] = None if peak is None else peak / 2**20
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        # Must precede the first import of the kernels (Triton decides when they are defined).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from mixtail.kernels.smc_loss import INTERPRET

    if device.type == "cpu" and not INTERPRET:
        raise UsageError("bench_kernel on the CPU needs TRITON_INTERPRET=1 before mixtail.kernels is imported")

    verify(device, args)
    rows: list[dict[str, Any]] = []
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        bytes_per_pair = _DEFAULT_BYTES_PER_PAIR
        for n in args.sizes:
            eager_ms = None
            for impl in args.impls:
                row: dict[str, Any] = {"dtype": dname, "N": n, "D": args.dim, "impl": impl}
                free = free_memory_bytes(device)
                est = bytes_per_pair * n * n
                if impl == "reference" and free is not None and est > 0.9 * free:
                    row["note"] = f"OOM (est. {est / 2**30:.0f} GB)"
                    rows.append(row)
                    continue
                inputs = make_inputs(n, args.dim, dtype, device, args.classes, args.seed)
                try:
                    row.update(bench_one(impl, *inputs, args=args, device=device))
                except torch.OutOfMemoryError:
                    row["note"] = "OOM"
                del inputs
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if "median_ms" in row:
                    row["TFLOP/s"] = 6 * n * n * args.dim / (row["median_ms"] * 1e-3) / 1e12
                    if impl == "reference":
                        eager_ms = row["median_ms"]
                        if row.get("extra_MB"):
                            # Fixed costs inflate this at small N, which only makes the estimate safer.
                            bytes_per_pair = row["extra_MB"] * 2**20 / (n * n)
                    elif eager_ms is not None:
                        row["speedup"] = eager_ms / row["median_ms"]
                rows.append(row)
                timing = f"{row['median_ms']:.3f} ms" if "median_ms" in row else row.get("note", "")
                print(f"  {dname} N={n} {impl}: {timing}", flush=True)

    columns = ["dtype", "N", "D", "impl", "median_ms", "p20_ms", "p80_ms", "reps", "extra_MB", "speedup", "TFLOP/s",
               "note"]
    print()
    print(format_table(rows, columns))
    targets = _targets(rows) if device.type == "cuda" else {}
    for line in targets.values():
        print(line)
    config = {**vars(args), "device": str(device), "targets": targets}
    path = write_json("kernel", rows, config=config, env=environment(), out_dir=args.out)
    print(f"wrote {path}")
    return {"rows": rows, "path": str(path), "targets": targets}


def _targets(rows: list[dict[str, Any]]) -> dict[str, str]:
    """The kernel's H100 goals at N = 16,384: ≥ 3× eager and < 64 MB beside the inputs; N = 65,536 runs."""
    out = {}
    for row in rows:
        if row["impl"] != "triton" or "median_ms" not in row:
            continue
        if row["N"] == TARGET_N:
            fast = row.get("speedup") is not None and row["speedup"] >= TARGET_SPEEDUP
            small = row.get("extra_MB") is not None and row["extra_MB"] < TARGET_EXTRA_MB
            speedup, extra = row.get("speedup") or float("nan"), row.get("extra_MB") or 0.0
            out[f"{row['dtype']}_N{TARGET_N}"] = (
                f"{row['dtype']} N={TARGET_N}: speed-up {speedup:.1f}x ({'PASS' if fast else 'FAIL'} "
                f"≥{TARGET_SPEEDUP:g}x), extra memory {extra:.1f} MB ({'PASS' if small else 'FAIL'} "
                f"<{TARGET_EXTRA_MB:g} MB)")
        if row["N"] == 65536:
            out[f"{row['dtype']}_N65536"] = f"{row['dtype']} N=65536: runs in {row['median_ms']:.1f} ms (PASS)"
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
