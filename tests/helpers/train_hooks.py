"""A hook into the trainer's training loader, and the crash the tests simulate with it.

    wrap_train_loader(monkeypatch, lambda batch: seen.append(batch))   # called before each batch is handed out
    wrap_train_loader(monkeypatch, lambda batch: raise_(SimulatedCrash("mid-epoch")))   # a process dying
"""

from __future__ import annotations

from collections.abc import Callable

from mixtail.trainer import train as train_module


class SimulatedCrash(RuntimeError):
    """Raised inside the training loop to stand for a process that dies there."""


def wrap_train_loader(monkeypatch, on_batch: Callable) -> None:
    """Make trainer.train build its training loader wrapped: on_batch(batch) runs before each batch reaches the
    loop (it may record the batch, or raise to simulate a crash). The test loader is left alone."""
    real_build = train_module.build_loader

    class Wrapped:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __len__(self):
            return len(self.inner)

        def __iter__(self):
            for batch in self.inner:
                on_batch(batch)
                yield batch

    def build(*args, split, **kwargs):
        loader = real_build(*args, split=split, **kwargs)
        return Wrapped(loader) if split == "train" else loader

    monkeypatch.setattr(train_module, "build_loader", build)
