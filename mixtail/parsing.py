"""The argument parsing every `mixtail` command shares: `Parser`, whose errors print as one line like every other
error, and `split_overrides`, which separates dotted config overrides (`--optim.lr=0.05`) from a command's own
arguments.

    from mixtail.parsing import Parser, split_overrides

    rest, overrides = split_overrides(argv)
    p = Parser(prog="mixtail mycommand", description="...")
"""

from __future__ import annotations

import argparse
import re

from mixtail.errors import UsageError

OVERRIDE = re.compile(r"--[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=.*", re.DOTALL)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are a UsageError, so they print (and reach torchrun) like every other error."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the command's own arguments, the `--section.key=value` overrides), each in the order given."""
    overrides = [a for a in argv if OVERRIDE.fullmatch(a)]
    rest = [a for a in argv if not OVERRIDE.fullmatch(a)]
    return rest, overrides
