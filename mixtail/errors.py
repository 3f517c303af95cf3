"""The errors a user can act on: each is one line that names the file, key or value at fault.

`mixtail` (mixtail/cli.py) prints any `MixtailError` as `mixtail <command>: error: <message>` and exits 2
without a traceback (`--debug` or MIXTAIL_DEBUG=1 shows it); an OSError is printed the same way, with its
errno name (`describe_os_error`). Anything else is a bug: one line with its type, exit 1. Every package
raises these, so they live beside the CLI rather than in one of them.

    from mixtail.errors import ConfigError
    raise ConfigError(f"{path}: key 'optim.lr': must be positive, got {lr}")
"""

from __future__ import annotations

import errno
import numbers
import os
import reprlib


class MixtailError(Exception):
    """An error in the user's input or environment, reported as one line.

    >>> import mixtail
    >>> try:
    ...     mixtail.load_config("no_such_config")
    ... except mixtail.MixtailError as err:
    ...     print(err)
    config file no_such_config does not exist (and is not a bundled config name)
    """


class ConfigError(MixtailError, ValueError):
    """A config file or override is malformed; the message names the key and where it came from.

    >>> import mixtail
    >>> try:
    ...     mixtail.DataConfig(batch_size=0).validate()
    ... except mixtail.ConfigError as err:
    ...     print(err)
    key 'data.batch_size': must be positive, got 0
    """


class DataError(MixtailError, ValueError):
    """A dataset, list, manifest or image is missing, malformed or inconsistent; the message names it."""


class UsageError(MixtailError):
    """The command line itself is wrong (an unknown option or command); the message says what to type."""


class CheckpointError(MixtailError):
    """A checkpoint cannot be written or read: the message names the file and the reason (the OS's, for I/O)."""


class UnsafeFileError(CheckpointError):
    """A file to be loaded (checkpoint, router, pretrained weights) would need more than tensors and plain data
    to unpickle, i.e. it asks to construct Python objects: refused before anything in it runs."""


class NonFiniteCheckpointError(CheckpointError):
    """A checkpoint was refused because the model holds NaN or infinite values; it names the tensors."""


class TrainingStopped(KeyboardInterrupt):
    """A run stopped on a signal (train.stop_signals) after checkpointing its last step; `--resume` continues it.
    A KeyboardInterrupt, so code that handles Ctrl-C handles it; the CLI prints its one line and exits with
    `exit_status` (128 + the signal's number: SIGINT 130, SIGTERM 143)."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


# A value quoted in an error is walked at most this deep and this wide: a YAML alias bomb expands to a list of
# ~10^8 references to a few lists, and printing it in full took minutes and gigabytes.
_QUOTE = reprlib.Repr()  # keyword arguments need Python 3.12
for _name, _limit in (("maxlevel", 2), ("maxtuple", 4), ("maxlist", 4), ("maxarray", 4), ("maxdict", 4),
                      ("maxset", 4), ("maxfrozenset", 4), ("maxdeque", 4), ("maxstring", 60), ("maxlong", 40),
                      ("maxother", 40)):
    setattr(_QUOTE, _name, _limit)
QUOTE_CHARS = 100


def quote(value) -> str:
    """A short repr of a value for an error message: never longer than QUOTE_CHARS, and never walking more
    than a few items of a container, so a huge or deeply shared value costs nothing to quote.

    >>> quote("x" * 500)[:20], len(quote("x" * 500)) <= 100
    ("'xxxxxxxxxxxxxxxxxxx", True)
    >>> quote([list(range(10**6))] * 10**6)
    '[[0, 1, 2, 3, ...], [0, 1, 2, 3, ...], [0, 1, 2, 3, ...], [0, 1, 2, 3, ...], ...]'
    """
    text = _QUOTE.repr(value)
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS - 3] + "..."


def describe_os_error(err: OSError) -> str:
    """One line for an OSError that keeps the OS's reason and its errno name visible.

    `No space left on device (ENOSPC): runs/x/.checkpoint.pt.tmp-12-ab` rather than Python's
    `[Errno 28] No space left on device: '...'`; an OSError raised with a message of our own is kept as is.
    """
    if err.errno is None or not err.strerror:
        return str(err)
    line = f"{err.strerror} ({errno.errorcode.get(err.errno, err.errno)})"
    if err.filename is not None:
        line += f": {os.fsdecode(err.filename)}"
        if getattr(err, "filename2", None) is not None:
            line += f" -> {os.fsdecode(err.filename2)}"
    return line


def check_int(name: str, value, minimum: int) -> int:
    """An argument of the public API that must be an integer >= minimum: returned as an int, or a TypeError or
    ValueError naming the argument (`world_size must be >= 1, got 0`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
