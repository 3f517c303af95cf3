"""`mixtail sweep`: run a grid of configs and write one table of their results (the sweep itself is
trainer/sweep.py, whose docstring describes the grid, resuming and the table)."""

from __future__ import annotations

import shlex
import signal
import sys
from pathlib import Path

from mixtail.errors import MixtailError
from mixtail.parsing import Parser, split_overrides
from mixtail.trainer.sweep import RANK_BY, Sweep, expand_grid, paper_top1


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, common = split_overrides(argv)
    p = Parser(prog="mixtail sweep", description="Run a grid of configs and write one table (sweep.md, sweep.json).")
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML path or bundled config name; several allowed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                   help="a swept key and its values (YAML, split on commas outside brackets); repeat for a grid")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (separate processes sharing the device)")
    p.add_argument("--out", help="directory of the run directories and the table (default: runs/sweep_<CONFIG>)")
    p.add_argument("--resume", action="store_true", help="continue unfinished runs (finished ones are never rerun)")
    p.add_argument("--dry-run", action="store_true", help="print the runs and their state; run nothing")
    p.add_argument("--rank-by", choices=RANK_BY, default=None,
                   help="order the table by the validation split's All (runs need data.val_per_class); by default "
                        "the rows keep the grid's order and nothing is ranked")
    args, unknown = p.parse_known_args(rest)
    if unknown:
        p.error(f"unrecognized arguments {unknown}; overrides for every run look like --optim.lr=0.05")
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    out = Path(args.out or f"runs/sweep_{Path(args.configs[0]).stem}")
    runs = expand_grid(args.configs, args.set, common, out)
    sweep = Sweep(runs, out, jobs=args.jobs, resume=args.resume, command=shlex.join(["mixtail", "sweep", *argv]),
                  rank_by=args.rank_by)
    if args.dry_run:
        for run, state in zip(runs, sweep.plan(dry_run=True)):
            paper = paper_top1(run.cfg)
            print(f"{state:<10} {run.run_dir}" + (f"   paper {paper.top1:.1f} {paper.note}".rstrip() if paper else ""))
        return 0
    print(f"sweep: {len(runs)} runs in {out}, {args.jobs} at a time")
    # SIGTERM (a scheduler, a `kill`) ends the sweep like Ctrl-C: its runs are stopped, not left behind.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        rows = sweep.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    failed = [r for r in rows if r["status"] != "done"]
    print(f"sweep: {len(rows) - len(failed)} of {len(rows)} runs finished; table: {out / 'sweep.md'}")
    if failed:
        first = failed[0]
        raise MixtailError(f"{len(failed)} of {len(rows)} runs failed, first {first['name']}: {first['error']} "
                           f"(log: {first['log']}); table: {out / 'sweep.md'}")
    return 0
