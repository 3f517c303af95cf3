"""The `mixtail` command line.

    mixtail train [CONFIG] [--resume | --overwrite] [--section.key=value ...]   train (default: the built-in demo)
    mixtail train CONFIG --stage router [--section.key=value ...]   RIDE's router on a finished multi-expert run
    mixtail eval CHECKPOINT [--report DIR] [--posthoc-tau T,...|auto] [--section.key=value ...]   evaluate a checkpoint
    mixtail upgrade-checkpoint CHECKPOINT...                      rewrite checkpoints of an older mixtail (numpy arrays)
    mixtail convert SOURCE --to ffcv|dali --out PATH [...]       convert a dataset for a loader backend
    mixtail convert --verify PATH                                 check a converted output against its source
    mixtail bench loss|loader|step|train|classic|compare|convert [ARGS ...]   benchmarks (see --help of each)
    mixtail sweep CONFIG... --set KEY=V1,V2 [--set ...] [--jobs N] [--out DIR] [--resume]
                                                                  run a grid of runs, write one table of results
    mixtail config [CONFIG] [--section.key=value ...]            print the resolved config as YAML
    mixtail data counts|list|check|info ARGS ...                  look at a dataset, a list, images, a converted output
    mixtail config --reference [--out PATH]                       every config key: type, default, meaning

CONFIG is a YAML path or the name of a bundled config (demo, smoke_cpu, cifar10_lt_r100,
cifar100_lt_r100, ...). Overrides use dotted keys and YAML values: --optim.lr=0.05 --mix.ratio_range=[0,1].

Every failure is one line on stderr, `mixtail <command>: error: <what and where>`, and an exit status:
2 for a problem with the input or the machine (a bad config, a missing or corrupt file, a full disk),
1 for a bug in mixtail, 130 when interrupted. `mixtail train` stopped by a signal of train.stop_signals
(SIGTERM, SIGUSR1, SIGINT) checkpoints its last step, prints one line and exits 128 + the signal's number.
--debug anywhere on the command line (or MIXTAIL_DEBUG=1) shows the full traceback instead. Under torchrun
the same line reaches the elastic error summary.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from collections.abc import Callable

from mixtail.errors import MixtailError, TrainingStopped, UsageError, describe_os_error
from mixtail.parsing import Parser, split_overrides

BENCHES = {
    "loss": "mixtail.benchmarks.bench_kernel",
    "loader": "mixtail.benchmarks.bench_loader",
    "step": "mixtail.benchmarks.bench_step",
    "train": "mixtail.benchmarks.bench_train",
    "compare": "mixtail.benchmarks.common",
    "convert": "mixtail.benchmarks.bench_convert",
    "classic": "mixtail.benchmarks.bench_classic",
}

EXIT_BUG, EXIT_USER, EXIT_INTERRUPTED = 1, 2, 130


def _train(argv: list[str]) -> int:
    from mixtail.trainer.config import load_config
    from mixtail.trainer.train import train

    rest, overrides = split_overrides(argv)
    p = Parser(prog="mixtail train", description="Train SMC. Overrides: --section.key=value.")
    p.add_argument("config", nargs="?", default="demo", help="YAML path or bundled config name (default: demo)")
    p.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from its last good checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start again in a train.out_dir that already holds a run")
    p.add_argument("--stage", choices=("model", "router"), default="model",
                   help="router: RIDE's stage 2 on the finished multi-expert run in train.out_dir")
    args, unknown = p.parse_known_args(rest)
    if unknown:
        p.error(f"unrecognized arguments {unknown}; overrides look like --optim.lr=0.05")
    cfg = load_config(args.config, overrides)
    if args.stage == "router":
        if args.resume or args.overwrite:
            p.error("--stage router reads the finished stage-1 run; --resume and --overwrite are for stage 1")
        from mixtail.trainer.router import train_router_stage

        train_router_stage(cfg)
        return 0
    train(cfg, resume=args.resume, overwrite=args.overwrite)
    return 0


def _eval(argv: list[str]) -> int:
    from mixtail.trainer.checkpoint_eval import evaluate_checkpoint

    rest, overrides = split_overrides(argv)
    p = Parser(prog="mixtail eval", description="Evaluate a checkpoint on its test set.")
    p.add_argument("checkpoint")
    p.add_argument("--report", metavar="DIR", help="write report.md/report.json, plots and class centres to DIR")
    p.add_argument("--class-vectors", metavar="NPZ", help="class name vectors (arrays names, vectors) for the "
                   "semantic similarity score, e.g. class_vectors_glove6B50d.npz")
    p.add_argument("--posthoc-tau", metavar="T[,T...]|auto", default="",
                   help="also report accuracy with the test logits shifted by T·log(P_Y/π), for each T; auto: "
                        "choose T on the validation split (data.val_per_class) and report the test set at it")
    args, unknown = p.parse_known_args(rest)
    if unknown:
        p.error(f"unrecognized arguments {unknown}; overrides look like --data.root=/data")
    auto = args.posthoc_tau.strip() == "auto"
    try:
        taus = [] if auto else [float(t) for t in args.posthoc_tau.split(",") if t.strip()]
    except ValueError:
        p.error(f"--posthoc-tau takes numbers separated by commas, or auto, got {args.posthoc_tau!r}")
    if args.class_vectors and not args.report:
        p.error("--class-vectors needs --report DIR")
    evaluate_checkpoint(args.checkpoint, overrides, report_dir=args.report, class_vectors=args.class_vectors,
                        posthoc_taus=taus, posthoc_auto=auto)
    return 0


def _upgrade_checkpoint(argv: list[str]) -> int:
    from mixtail.trainer.checkpoint import upgrade_checkpoint

    p = Parser(prog="mixtail upgrade-checkpoint",
               description="Rewrite checkpoints written by an older mixtail (class counts as a numpy array) in "
                           "today's format, which loads without unpickling code. Nothing but numpy's numeric "
                           "arrays is read; each file is replaced atomically.")
    p.add_argument("checkpoints", nargs="+")
    args = p.parse_args(argv)
    for path in args.checkpoints:
        upgrade_checkpoint(path, log=print)
    return 0


def _bench(argv: list[str]) -> int:
    names = " | ".join(BENCHES)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: mixtail bench {{{names}}} [ARGS ...]   (mixtail bench NAME --help for its options)",
              file=sys.stdout if argv else sys.stderr)
        return 0 if argv else EXIT_USER
    if argv[0] not in BENCHES:
        raise UsageError(f"unknown benchmark '{argv[0]}'; choose one of {names}")
    module = importlib.import_module(BENCHES[argv[0]])
    module.main(argv[1:])
    return 0


def _config(argv: list[str]) -> int:
    from mixtail.trainer.config import dump_config, load_config

    rest, overrides = split_overrides(argv)
    p = Parser(prog="mixtail config", description="Print the resolved config, or the reference of every key.")
    p.add_argument("config", nargs="?", default=None, help="YAML path or bundled config name (default: the defaults)")
    p.add_argument("--reference", action="store_true", help="print the reference of every config key (Markdown: "
                   "docs/config.md) instead")
    p.add_argument("--out", metavar="PATH", help="write to PATH instead of stdout")
    args, unknown = p.parse_known_args(rest)
    if unknown:
        p.error(f"unrecognized arguments {unknown}; overrides look like --optim.lr=0.05")
    if args.reference:
        if args.config or overrides:
            p.error("--reference documents the keys themselves: it takes no CONFIG and no overrides")
        from mixtail.trainer.config_reference import config_reference

        text = config_reference()
    else:
        text = dump_config(load_config(args.config, overrides))
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


# name -> function(argv after the name) -> exit status. New commands only add a line here.
COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": _train, "eval": _eval, "bench": _bench,
    "sweep": lambda argv: importlib.import_module("mixtail.commands.sweep").main(argv),
    "convert": lambda argv: importlib.import_module("mixtail.commands.convert").main(argv),
    "data": lambda argv: importlib.import_module("mixtail.commands.data").main(argv),
    "config": _config,
    "upgrade-checkpoint": _upgrade_checkpoint,
}


def describe(err: BaseException) -> tuple[str, int]:
    """The one line (without the `mixtail <command>: ` prefix) and the exit status for an exception."""
    if isinstance(err, TrainingStopped):  # a clean stop on a signal, after a checkpoint: not an error
        return str(err), err.exit_status
    if isinstance(err, KeyboardInterrupt):
        return "interrupted", EXIT_INTERRUPTED
    if isinstance(err, MixtailError):
        # Messages are written as one line; join any stray newlines rather than cut the message short.
        return "error: " + " ".join(line.strip() for line in str(err).splitlines() if line.strip()), EXIT_USER
    if isinstance(err, OSError):
        return f"error: {describe_os_error(err)}", EXIT_USER
    first = next(iter(str(err).strip().splitlines()), "")
    return (f"internal error: {type(err).__name__}{': ' + first if first else ''} "
            "(run with --debug for the traceback)"), EXIT_BUG


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("MIXTAIL_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _record_for_torchrun(command: Callable[[list[str]], int], name: str, debug: bool):
    """Wrap command with torch.distributed.elastic's `record`, so the error file that torchrun reads
    (TORCHELASTIC_ERROR_FILE, set per worker) holds our one line, and the elastic summary shows it rather
    than `error_file: <N/A>`. With --debug it holds the traceback (torch's own handler)."""
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, record

    class OneLineErrorHandler(ErrorHandler):
        def record_exception(self, e: BaseException) -> None:
            path = os.environ.get("TORCHELASTIC_ERROR_FILE")
            if debug or not path:
                return super().record_exception(e)
            line = f"mixtail {name}: {describe(e)[0]}"
            # The layout torch's own record_exception writes; the summary shows py_callstack as "traceback".
            data = {"message": {"message": line,
                                "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
            try:
                with open(path, "w") as f:
                    json.dump(data, f)
            except OSError:  # a full disk must not replace the error being reported by its own
                pass

    return record(command, error_handler=OneLineErrorHandler())


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if argv else EXIT_USER)
    name = argv[0]
    if name not in COMMANDS:
        print(f"mixtail: error: unknown command '{name}'; choose one of {' | '.join(COMMANDS)} "
              "(see mixtail --help)", file=sys.stderr)
        sys.exit(EXIT_USER)
    command = COMMANDS[name]
    from mixtail.lifetime import die_with_parent

    die_with_parent()  # a run started by `mixtail sweep` ends with it, even when the sweep is SIGKILLed
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        command = _record_for_torchrun(command, name, debug)
    if debug:
        sys.exit(command(argv[1:]))
    try:
        status = command(argv[1:])
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - every failure becomes one line
        line, status = describe(err)
        # One write of the whole line: under torchrun every rank writes to the same stderr, and an unbuffered
        # print (PYTHONUNBUFFERED) writes the text and its newline apart, so two ranks' lines could run together.
        sys.stderr.write(f"mixtail {name}: {line}\n")
        sys.stderr.flush()
    sys.exit(status)


if __name__ == "__main__":
    main()
