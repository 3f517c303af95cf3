"""The `mixtail` command line.

    mixtail train [CONFIG] [--resume] [--section.key=value ...]   train (default CONFIG: the built-in demo)
    mixtail eval CHECKPOINT [--section.key=value ...]             evaluate a checkpoint, print the table
    mixtail bench loss|loader [ARGS ...]                          throughput benchmarks (see --help of each)

CONFIG is a YAML path or the name of a bundled config (demo, smoke_cpu, cifar10_lt_r100,
cifar100_lt_r100, ...). Overrides use dotted keys and YAML values: --optim.lr=0.05 --mix.ratio_range=[0,1].
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

_OVERRIDE = re.compile(r"--[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=.*", re.DOTALL)

BENCHES = {
    "loss": "mixtail.benchmarks.bench_kernel",
    "loader": "mixtail.benchmarks.bench_loader",
}


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    overrides = [a for a in argv if _OVERRIDE.fullmatch(a)]
    rest = [a for a in argv if not _OVERRIDE.fullmatch(a)]
    return rest, overrides


def _train(argv: list[str]) -> int:
    from mixtail.trainer.config import load_config
    from mixtail.trainer.train import train

    rest, overrides = _split_overrides(argv)
    p = argparse.ArgumentParser(prog="mixtail train", description="Train SMC. Overrides: --section.key=value.")
    p.add_argument("config", nargs="?", default="demo", help="YAML path or bundled config name (default: demo)")
    p.add_argument("--resume", action="store_true", help="continue from <train.out_dir>/checkpoint.pt")
    args, unknown = p.parse_known_args(rest)
    if unknown:
        p.error(f"unrecognized arguments {unknown}; overrides look like --optim.lr=0.05")
    cfg = load_config(args.config, overrides)
    train(cfg, resume=args.resume)
    return 0


def _eval(argv: list[str]) -> int:
    from mixtail.trainer.train import evaluate_checkpoint

    rest, overrides = _split_overrides(argv)
    p = argparse.ArgumentParser(prog="mixtail eval", description="Evaluate a checkpoint on its test set.")
    p.add_argument("checkpoint")
    args, unknown = p.parse_known_args(rest)
    if unknown:
        p.error(f"unrecognized arguments {unknown}; overrides look like --data.root=/data")
    evaluate_checkpoint(args.checkpoint, overrides)
    return 0


def _bench(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHES:
        names = " | ".join(BENCHES)
        print(f"usage: mixtail bench {{{names}}} [ARGS ...]   (mixtail bench NAME --help for its options)",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(BENCHES[argv[0]])
    module.main(argv[1:])
    return 0


COMMANDS = {"train": _train, "eval": _eval, "bench": _bench}


def main(argv: list[str] | None = None) -> None:
    from mixtail.trainer.config import ConfigError

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    try:
        sys.exit(COMMANDS[argv[0]](argv[1:]))
    except (ConfigError, FileNotFoundError) as err:
        print(f"mixtail {argv[0]}: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
