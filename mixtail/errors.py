"""The errors a user can act on: each is one line that names the file, key or value at fault.

`mixtail` (mixtail/cli.py) prints any `MixtailError` as `mixtail <command>: error: <message>` and exits
non-zero without a traceback (`--debug` or MIXTAIL_DEBUG=1 shows it). Everything else is a bug and keeps
its traceback. Every package raises these, so they live beside the CLI rather than in one of them.

    from mixtail.errors import ConfigError
    raise ConfigError(f"{path}: key 'optim.lr': must be positive, got {lr}")
"""

from __future__ import annotations


class MixtailError(Exception):
    """An error in the user's input or environment, reported as one line."""


class ConfigError(MixtailError, ValueError):
    """A config file or override is malformed; the message names the key and where it came from."""


class DataError(MixtailError, ValueError):
    """A dataset, list, manifest or image is missing, malformed or inconsistent; the message names it."""
