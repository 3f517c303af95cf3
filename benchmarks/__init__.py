"""Benchmarks: `mixtail bench loss|loader` (bench_kernel.py, bench_loader.py) on the helpers of common.py.

    mixtail bench loss --sizes 1024 4096       # or: python -m mixtail.benchmarks.bench_kernel
"""
