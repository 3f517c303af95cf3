"""Checkpoints that survive a kill: written to a temporary file, flushed to disk, then renamed.

A rename within one directory is atomic on POSIX, so `checkpoint.pt` is always either the previous
complete checkpoint or the new complete one, whenever the process dies.

    save_checkpoint(run_dir / "checkpoint.pt", {"model": model.state_dict(), ...})
    state = load_checkpoint(run_dir / "checkpoint.pt")
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_checkpoint(path: str | Path, state: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    # Make the rename itself durable.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        # Our checkpoints hold numpy arrays and plain dicts besides tensors.
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise ValueError(f"checkpoint {path} could not be read ({type(err).__name__}: {err})") from None
