"""Stopping a run cleanly on a signal: finish the step, checkpoint it, exit.

    with StopSignals(("SIGTERM", "SIGUSR1", "SIGINT")) as stop:
        for ...:
            step(...)
            if stop.agreed(sync=...):   # polled by the training loop after each step
                checkpoint(...); raise stop.stopped(...)

SLURM and Kubernetes send SIGTERM (SLURM's `--signal` can send SIGUSR1) some seconds before a kill; Ctrl-C is
SIGINT. The handler only records the signal; the loop polls the record between steps, so a step (or a CUDA
graph replay) is never cut in half and the checkpoint is at a step boundary, where `--resume` continues
exactly. A second signal while the first is being handled acts as the signal would without us (SIGINT:
KeyboardInterrupt; others: the previous handler, or the default action), so a stuck run can still be stopped.

Under DDP a signal may reach one rank only (or ranks at different steps): `agreed(sync=True)` all-reduces the
flag (MAX, i.e. any rank's signal stops all), so every rank stops after the same step. The loop calls it only
where it synchronizes anyway (every train.log_every_steps and at each epoch end); a single process polls every
step, which costs nothing.
"""

from __future__ import annotations

import os
import signal
import threading

from mixtail.errors import ConfigError, TrainingStopped


def parse_signals(names: tuple[str, ...] | list[str], key: str = "train.stop_signals") -> list[signal.Signals]:
    """Signal names ('SIGTERM', 'SIGUSR1', ...) as signal.Signals; anything else is a ConfigError naming `key`.
    SIGKILL and SIGSTOP cannot be caught and are refused."""
    out = []
    for name in names:
        sig = getattr(signal.Signals, name, None) if isinstance(name, str) and name.startswith("SIG") else None
        if sig is None or name.startswith("SIG_"):
            raise ConfigError(f"key '{key}': {name!r} is not a signal name (such as SIGTERM, SIGUSR1, SIGINT)")
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigError(f"key '{key}': {name} cannot be caught")
        if sig in out:
            raise ConfigError(f"key '{key}': {name} is listed twice")
        out.append(sig)
    return out


def exit_status(sig: signal.Signals) -> int:
    """The shell's status for a process ended by `sig`: 128 + its number (SIGINT 130, SIGTERM 143)."""
    return 128 + int(sig)


class StopSignals:
    """A context manager that installs handlers for `names`, records the first signal, and restores the previous
    handlers on exit. Outside the main thread (where Python cannot install handlers) it installs nothing."""

    def __init__(self, names, device=None):
        self.signals = parse_signals(names)
        self.device = device  # where the all-reduced flag lives under DDP (NCCL needs a CUDA tensor)
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        sig = signal.Signals(signum)
        if self.received is None:
            self.received = sig
            return
        # A second signal: do what it would have done without us.
        previous = self._previous.get(sig, signal.SIG_DFL)
        if sig == signal.SIGINT and previous in (signal.default_int_handler, signal.SIG_DFL):
            raise KeyboardInterrupt
        if callable(previous):
            previous(signum, frame)
            return
        if previous == signal.SIG_IGN:
            return
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)

    def agreed(self, sync: bool) -> signal.Signals | None:
        """The signal to stop for, or None to go on. With sync (and a process group of several ranks) it is an
        all-reduce, so every rank gets the same answer: stop if any rank received a signal (the largest signal
        number among them, so all ranks name the same one)."""
        if not sync:  # every step of a single process: a host attribute, nothing more
            return self.received
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.received
        flag = torch.tensor([int(self.received or 0)], dtype=torch.int64, device=self.device or "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        value = int(flag.item())
        return signal.Signals(value) if value else None

    def stopped(self, sig: signal.Signals, where: str) -> TrainingStopped:
        """The exception that ends the run after its checkpoint: one line, exit status 128 + the signal."""
        return TrainingStopped(f"stopped by {sig.name} {where}", exit_status(sig))
