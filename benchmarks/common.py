"""Shared benchmark plumbing: honest timing, environment capture, an aligned table and the JSON record.

    from mixtail.benchmarks.common import time_fn, summarize, environment, format_table, write_json
    stats = summarize(time_fn(step, device=torch.device("cuda"), reps=20))   # {"median_ms", "p20_ms", ...}
    print(format_table(rows))
    write_json("kernel", rows, config={"D": 128})   # -> ./benchmarks-results/kernel_<gpu-or-cpu>_<yyyymmdd>.json
    mixtail bench compare A.json B.json          # B / A for every metric of the rows both files hold (`compare`)

Timing on CUDA brackets each repeat with CUDA events and flushes the L2 cache before it (writing a buffer
larger than any current L2), so a repeat never reads what the previous one left in cache; on the CPU it
uses perf_counter. Nothing here knows what is being benchmarked, except `compare`'s default key columns
for the files written before benchmarks named their own (config["keys"]).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The repo's committed measurements; benchmarks write there only when told (--out benchmarks/results).
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Where a benchmark writes without --out: a folder of the working directory, never the package's own
# folder, which for an installed wheel is inside site-packages.
DEFAULT_OUT_DIR = "benchmarks-results"
REPO_ROOT = Path(__file__).resolve().parent.parent
# Real data for measurements (photos, CIFAR-10 as JPEGs), never part of the repository: the folder that
# $MIXTAIL_SHARED_DATA names, else `shared/data` beside the checkout, where this project's machines keep it. The
# tests' real-data checks read it from here too (tests/helpers/real_data.py).
REAL_DATA = Path(os.environ.get("MIXTAIL_SHARED_DATA") or REPO_ROOT.parent / "shared" / "data")
REAL_DATA_HELP = "$MIXTAIL_SHARED_DATA, else shared/data beside the checkout"
_L2_FLUSH_BYTES = 256 * 2**20  # H100: 50 MB of L2; B200: 126 MB
_flush_buffers: dict[torch.device, torch.Tensor] = {}


# --------------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _flush_l2(device: torch.device) -> None:
    if device not in _flush_buffers:
        _flush_buffers[device] = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    _flush_buffers[device].zero_()


def time_fn(fn: Callable[[], Any], *, device: torch.device, reps: int = 10, warmup: int = 2,
            flush_l2: bool = True) -> list[float]:
    """Run `fn` warmup + reps times; return the wall time of each timed repeat in milliseconds.

    CUDA: one pair of events per repeat, read after a single synchronize at the end, so host overhead
    between repeats is not counted but everything `fn` launches is.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        if flush_l2:
            _flush_l2(device)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def summarize(times_ms: Sequence[float]) -> dict[str, float]:
    """Median and the 20th/80th percentiles (the spread without the outliers) of repeat times."""
    t = np.asarray(times_ms, dtype=np.float64)
    return {"median_ms": float(np.median(t)), "p20_ms": float(np.percentile(t, 20)),
            "p80_ms": float(np.percentile(t, 80)), "reps": int(t.size)}


def reps_for(seconds_per_rep: float, *, budget_s: float = 2.0, lo: int = 3, hi: int = 50) -> int:
    """How many repeats fit a time budget, clamped to [lo, hi]."""
    return int(min(hi, max(lo, budget_s / max(seconds_per_rep, 1e-6))))


def reset_peak_memory(device: torch.device) -> int:
    """Start a peak-memory window; returns the bytes allocated now (the baseline: inputs and caches)."""
    if device.type != "cuda":
        return 0
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_memory_since(device: torch.device, baseline: int) -> int | None:
    """Peak bytes allocated above `baseline` since `reset_peak_memory`; None where it is not tracked (CPU)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - baseline


def free_memory_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[0]


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------

def _version(*dists: str, prefix: str | None = None) -> str | None:
    """Installed version of the first distribution found, or of one whose name starts with `prefix`."""
    for name in dists:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    if prefix is not None:
        for dist in importlib.metadata.distributions():
            name = dist.metadata["Name"] or ""
            if name.lower().startswith(prefix):
                return f"{name} {dist.version}"
    return None


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=REPO_ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git() -> dict[str, Any]:
    # --no-optional-locks: reading the status must not rewrite the index of someone's working tree.
    sha = _run(["git", "--no-optional-locks", "rev-parse", "HEAD"])
    status = _run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"])
    return {"git_sha": sha, "git_dirty": None if status is None else bool(status)}


def gpu_name() -> str | None:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def device_slug() -> str:
    """'nvidia-h100-80gb-hbm3' for the current GPU, 'cpu' without one: the file-name part of a result."""
    name = gpu_name()
    if name is None:
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def environment(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to reproduce or compare a number: hardware, driver, versions, commit, time."""
    env: dict[str, Any] = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "triton": _version("triton", "pytorch-triton"),
        "dali": _version(prefix="nvidia-dali"),
        "ffcv": _version("ffcv"),
        "numpy": np.__version__,
        "gpu": gpu_name(),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "gpu_memory_gb": None,
        "driver": None,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        **_git(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        env["gpu_capability"] = f"{props.major}.{props.minor}"
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        env["driver"] = smi.splitlines()[0] if smi else None
    env.update(extra or {})
    return env


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------

def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts as an aligned text table; numbers right-aligned, text left-aligned."""
    if not rows:
        return "(no rows)"
    columns = list(columns or dict.fromkeys(k for row in rows for k in row))
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row.get(c), (int, float)) or row.get(c) is None for row in rows) for c in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def write_json(bench: str, rows: Sequence[dict[str, Any]], *, config: dict[str, Any] | None = None,
               env: dict[str, Any] | None = None, out_dir: str | Path | None = None) -> Path:
    """Write {bench, config, environment, rows} to <out_dir>/<bench>_<gpu-or-cpu>_<yyyymmdd>.json
    (out_dir defaults to ./benchmarks-results)."""
    out = Path(out_dir) if out_dir is not None else Path.cwd() / DEFAULT_OUT_DIR
    out.mkdir(parents=True, exist_ok=True)
    env = env if env is not None else environment()
    path = out / f"{bench}_{device_slug()}_{_dt.datetime.now(_dt.timezone.utc):%Y%m%d}.json"
    record = {"bench": bench, "config": config or {}, "environment": env, "rows": list(rows)}
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


# --------------------------------------------------------------------------------------------------
# Command lines
# --------------------------------------------------------------------------------------------------

def argument_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """An argparse parser whose errors are one `mixtail bench: error: ...` line, exit status 2, as
    every other mixtail command's (mixtail/cli.py); the help text keeps the module docstring's layout."""
    from mixtail.parsing import Parser

    return Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def _bounded(kind: type, low: float, strict: bool) -> Callable[[str], Any]:
    word = "positive" if strict and low == 0 else f"at least {low}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not (value > low if strict else value >= low) or value != value:  # value != value: NaN
            raise argparse.ArgumentTypeError(f"must be {word}, got {text}")
        return value

    parse.__name__ = f"{word} {'integer' if kind is int else 'number'}"  # argparse names the type in errors
    return parse


# argparse types: `p.add_argument("--batch-size", type=positive_int)`. A zero batch size or budget is
# refused at the command line rather than failing inside the benchmark (it raised ZeroDivisionError there).
positive_int = _bounded(int, 0, strict=True)
positive_float = _bounded(float, 0, strict=True)
nonnegative_int = _bounded(int, 0, strict=False)


def out_dir_argument(p: argparse.ArgumentParser, flag: str = "--out") -> None:
    p.add_argument(flag, default=None, help=f"folder for the JSON result (default: ./{DEFAULT_OUT_DIR}; the repo's "
                   "committed results are under benchmarks/results)")


def cuda_device_or_error(requested: str) -> torch.device:
    """`auto` -> CUDA when torch sees it, else the CPU; `cuda` without CUDA is a one-line UsageError."""
    from mixtail.errors import UsageError

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {requested}, but torch sees no CUDA device here; use --device cpu")
    return torch.device(requested)


# --------------------------------------------------------------------------------------------------
# Comparing two result files
# --------------------------------------------------------------------------------------------------

# Key columns of the benchmarks that wrote their JSON before each record named them in config["keys"].
DEFAULT_KEYS = {"kernel": ["dtype", "N", "D", "impl"], "loader": ["backend", "device"]}


def read_result(path: str | Path) -> dict[str, Any]:
    """A write_json record; a DataError naming the file if it is not one."""
    from mixtail.errors import DataError

    try:
        record = json.loads(Path(path).read_text())
    except OSError as err:
        raise DataError(f"cannot read benchmark result {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise DataError(f"benchmark result {path} is not JSON: {err}") from None
    if not isinstance(record, dict) or not isinstance(record.get("rows"), list):
        raise DataError(f"benchmark result {path} has no 'rows' list (not written by benchmarks/common.write_json)")
    return record


def key_columns(record: dict[str, Any]) -> list[str]:
    """The columns that name a row: the record's own config["keys"], the bench's default, else its text columns."""
    keys = (record.get("config") or {}).get("keys") or DEFAULT_KEYS.get(record.get("bench", ""))
    if keys:
        return list(keys)
    rows = record["rows"]
    columns = dict.fromkeys(k for row in rows for k in row)
    return [c for c in columns if all(isinstance(row.get(c), (str, bool)) or row.get(c) is None for row in rows)]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def compare(a: dict[str, Any], b: dict[str, Any], *, keys: Sequence[str] | None = None,
            metrics: Sequence[str] | None = None, names: tuple[str, str] = ("A", "B")) -> dict[str, Any]:
    """Rows of A and B matched on the key columns; for each metric both hold, A, B and B / A.

    keys: default A's key columns (key_columns); metrics: default A's config["metrics"], else every numeric
    column of both rows. Returns {"keys", "rows", "only_a", "only_b"}: one output row per (matched row,
    metric), and the keys of the rows found in one file only.
    """
    from mixtail.errors import DataError

    keys = list(keys or key_columns(a))
    wanted = metrics or (a.get("config") or {}).get("metrics")

    def index(record: dict[str, Any], name: str) -> dict[tuple, dict[str, Any]]:
        out: dict[tuple, dict[str, Any]] = {}
        for row in record["rows"]:
            key = tuple(row.get(k) for k in keys)
            if key in out:
                raise DataError(f"{name}: two rows share the key {dict(zip(keys, key))}; "
                                f"name more key columns with --keys")
            out[key] = row
        return out

    rows_a, rows_b = index(a, names[0]), index(b, names[1])
    out = []
    for key, ra in rows_a.items():
        rb = rows_b.get(key)
        if rb is None:
            continue
        columns = wanted or [c for c in ra if c not in keys and _number(ra.get(c)) and _number(rb.get(c))]
        for metric in columns:
            va, vb = ra.get(metric), rb.get(metric)
            if not (_number(va) and _number(vb)):
                continue
            out.append({**dict(zip(keys, key)), "metric": metric, names[0]: float(va), names[1]: float(vb),
                        "ratio": float(vb) / float(va) if va else None})
    return {"keys": keys, "rows": out, "only_a": [k for k in rows_a if k not in rows_b],
            "only_b": [k for k in rows_b if k not in rows_a]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`mixtail bench compare A.json B.json`: the ratios B / A of the matching rows, as a table."""
    p = argument_parser("mixtail bench compare", "Ratios B / A of the metrics of matching rows of two benchmark results.")
    p.add_argument("a", help="the baseline result (JSON from write_json)")
    p.add_argument("b", help="the result compared with it")
    p.add_argument("--keys", nargs="+", default=None, help="columns that match rows (default: A's key columns)")
    p.add_argument("--metrics", nargs="+", default=None, help="columns to compare (default: A's metrics)")
    args = p.parse_args(argv)
    a, b = read_result(args.a), read_result(args.b)
    result = compare(a, b, keys=args.keys, metrics=args.metrics)
    print(f"A = {args.a} ({a.get('bench')}, {(a.get('environment') or {}).get('gpu') or 'cpu'})")
    print(f"B = {args.b} ({b.get('bench')}, {(b.get('environment') or {}).get('gpu') or 'cpu'})")
    print(format_table(result["rows"], [*result["keys"], "metric", "A", "B", "ratio"]) if result["rows"]
          else f"no rows match on the key columns {result['keys']}")
    for name, missing in (("A", result["only_a"]), ("B", result["only_b"])):
        if missing:
            print(f"only in {name}: " + "; ".join(", ".join(f"{k}={v}" for k, v in zip(result["keys"], key))
                                                  for key in missing))
    return result


__all__ = ["time_fn", "summarize", "reps_for", "synchronize", "reset_peak_memory", "peak_memory_since",
           "free_memory_bytes", "environment", "device_slug", "gpu_name", "format_table", "write_json",
           "RESULTS_DIR", "DEFAULT_OUT_DIR", "read_result", "key_columns", "compare", "argument_parser", "positive_int",
           "positive_float", "nonnegative_int", "out_dir_argument", "cuda_device_or_error"]


if __name__ == "__main__":
    main(sys.argv[1:])
