"""Checkpoints that cannot be lost: atomic, checksummed, rotated, and refused when the model is not finite.

    store = CheckpointStore(run_dir, keep=cfg.train.keep_checkpoints, log=print0)
    store.clean_stale()                      # at start, on the one process that writes (rank 0)
    found = store.load_latest()              # (path, state) of the newest checkpoint that verifies, or None
    store.save({"model": model.state_dict(), ...})   # -> run_dir/checkpoint.pt
    state = load_checkpoint("runs/x/checkpoint.pt")  # one explicit file (`mixtail eval PATH`), verified
    state, sha256 = read_checkpoint(path)    # the same, with the sha256 of exactly the bytes read

Why each part: a kill during a write must leave the previous checkpoint in place, so a checkpoint is
written to a temporary file in the same directory, fsynced, renamed over `checkpoint.pt` (a rename within one
directory is atomic on POSIX) and the directory fsynced so the rename itself survives a power cut. A file can
still be damaged later (a truncated copy, a flipped bit), so each carries a sha256 of its contents that loading
checks, and the `keep - 1` previous checkpoints stay beside it as `checkpoint.1.pt`, `checkpoint.2.pt`, ...
(1 is the newer) to fall back on. A NaN model is never written, because it would push a good checkpoint out.

A checkpoint holds plain data only: tensors, numbers, strings, lists and dicts (the config as a dict, the class
counts as a list), and every file is read with torch's weights-only unpickler, which constructs nothing else,
so a shared checkpoint cannot run code: one that asks for more is refused in one line (UnsafeFileError) before
anything in it runs. Checkpoints of older mixtail versions held the class counts as a numpy array; they are
refused with a line naming `mixtail upgrade-checkpoint PATH`, which rewrites them once (upgrade_checkpoint: it
allows numpy's numeric arrays and nothing more). The same reader loads `router.pt` (trainer/router.py).

The file is exactly what `torch.save` writes, so `torch.load("checkpoint.pt")` still works. torch.save writes
a zip archive, and a zip archive ends with an end record that may carry a comment of up to 64 KiB, which zip
readers (torch's included) skip. The comment holds `mixtail-sha256:<hex>`, the sha256 of the archive as
torch.save wrote it (with an empty comment). A file whose end record is missing is truncated.

Every failure is a one-line `CheckpointError` (mixtail/errors.py) naming the file and the reason: the OS's
strerror and errno name for a failed write (ENOSPC, EROFS, EACCES, ...), after the temporary file is removed.
Run it as part of the trainer; its tests are `python -m pytest tests/test_checkpoint.py -q`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from mixtail.errors import CheckpointError, NonFiniteCheckpointError, UnsafeFileError, describe_os_error, quote

LATEST = "checkpoint.pt"
_OLDER = re.compile(r"checkpoint\.([1-9][0-9]*)\.pt")
# Every temporary name starts with a dot and the final name and holds ".tmp" (older versions wrote
# `.checkpoint.pt.tmp<pid>`), so one pattern finds what a crash left behind.
_STALE_GLOB = ".checkpoint*.tmp*"

_EOCD = b"PK\x05\x06"  # signature of a zip archive's end record, 22 bytes long when its comment is empty
_EOCD_LEN = 22
_MAGIC = b"mixtail-sha256:"
_COMMENT_LEN = len(_MAGIC) + 64
_TRAILER_LEN = _EOCD_LEN + _COMMENT_LEN  # the end record with our comment: the last bytes of every checkpoint
_CHUNK = 1 << 20

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# One file: write, verify, read
# --------------------------------------------------------------------------------------------------


def nonfinite_tensors(tensors: dict) -> list[str]:
    """Names of the floating-point tensors in a state_dict that hold a NaN or an infinity.

    One host sync for the whole dict (the per-tensor flags are stacked on their device first), because the
    loop calls this before every checkpoint.
    """
    floats = [(k, t) for k, t in tensors.items()
              if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())]
    if not floats:
        return []
    device = floats[0][1].device
    flags = torch.stack([torch.isfinite(t).all().to(device) for _, t in floats])
    if bool(flags.all()):
        return []
    return [k for (k, _), ok in zip(floats, flags.tolist()) if not ok]


def _refuse_nonfinite(state: dict, path: Path) -> None:
    model = state.get("model")
    if not isinstance(model, dict):
        return
    bad = nonfinite_tensors(model)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise NonFiniteCheckpointError(
            f"not writing checkpoint {path}: the model holds NaN or infinite values in "
            f"{', '.join(bad[:3])}{more}")


class _HashingWriter:
    """The file object torch.save writes into: unbuffered writes to fd, hashed on the way.

    Writing with os.write (not a buffered file) makes every I/O error surface here, with its errno, at the
    byte where it happened; `error` keeps it in case torch wraps it in an exception of its own.
    """

    def __init__(self, fd: int):
        self.fd = fd
        self.sha = hashlib.sha256()
        self.size = 0
        self.tail = b""  # the last 22 bytes written: torch's end record
        self.error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        self.sha.update(view)
        try:
            _write_all(self.fd, view)
        except OSError as err:
            self.error = err
            raise
        self.size += n
        self.tail = (self.tail + bytes(view[-_EOCD_LEN:]))[-_EOCD_LEN:]
        return n

    def flush(self) -> None:
        pass

    def finish(self) -> None:
        """Put the checksum into the end record's comment (replacing its zero comment length)."""
        if not (self.tail.startswith(_EOCD) and self.tail.endswith(b"\x00\x00")):
            # torch.save changed its format: every checkpoint would then fail to verify, so say so now.
            raise RuntimeError("torch.save did not end its archive with an empty zip end record; "
                               "trainer/checkpoint.py must learn the new format")
        comment = _MAGIC + self.sha.hexdigest().encode()
        os.lseek(self.fd, self.size - 2, os.SEEK_SET)
        _write_all(self.fd, memoryview(len(comment).to_bytes(2, "little") + comment))


def _write_all(fd: int, view: memoryview) -> None:
    while view:  # os.write may write less than asked (and at most ~2 GiB at once on Linux)
        view = view[os.write(fd, view):]


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")


def _unlink_quietly(path: Path) -> str:
    """Remove path; returns '' or, if that failed too, a note for the error message."""
    try:
        path.unlink(missing_ok=True)
    except OSError as err:
        return f" (and the temporary file could not be removed: {describe_os_error(err)})"
    return ""


def _write_temporary(path: Path, state: dict) -> Path:
    """Write state, checksummed and fsynced, to a temporary file beside path; returns its name."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoint {path}: {describe_os_error(err)}") from None
    tmp = _temporary(path)
    writer = None
    fd = -1
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        writer = _HashingWriter(fd)
        torch.save(state, writer)
        writer.finish()
        os.fsync(fd)  # ENOSPC and EIO may first show here (NFS, and filesystems that allocate lazily)
        closing, fd = fd, -1
        os.close(closing)
    except BaseException as err:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
        note = _unlink_quietly(tmp)
        os_err = err if isinstance(err, OSError) else (writer.error if writer is not None else None)
        if os_err is None:
            raise
        raise CheckpointError(f"cannot write checkpoint {path}: {describe_os_error(os_err)}{note}") from None
    return tmp


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        if err.errno == errno.EINVAL:  # a filesystem that cannot fsync a directory: nothing more to do
            return
        raise CheckpointError(f"cannot make the checkpoint rename in {directory} durable: "
                              f"{describe_os_error(err)}") from None


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write state to path atomically with its checksum; refuses a model with NaN/inf (NonFiniteCheckpointError)."""
    path = Path(path)
    _refuse_nonfinite(state, path)
    tmp = _write_temporary(path, state)
    try:
        os.replace(tmp, path)
    except OSError as err:
        note = _unlink_quietly(tmp)
        raise CheckpointError(f"cannot write checkpoint {path}: {describe_os_error(err)}{note}") from None
    _fsync_dir(path.parent)


def _verify(f, path: Path, what: str) -> tuple[bool, str]:
    """(checked, sha256) of the open file f: checked is False for a plain torch.save archive (no checksum), whose
    sha256 is then that of the whole file; raises CheckpointError for an empty, truncated or corrupt file."""
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes)")
    if f.read(4) != b"PK\x03\x04":
        raise CheckpointError(f"{what} {path} is not a {what} (it does not start like a torch.save archive)")
    f.seek(max(size - _TRAILER_LEN, 0))
    tail = f.read()
    end = tail[-_TRAILER_LEN:]
    if (len(end) == _TRAILER_LEN and end.startswith(_EOCD) and end[_EOCD_LEN:].startswith(_MAGIC)
            and int.from_bytes(end[20:22], "little") == _COMMENT_LEN):
        expected = end[_EOCD_LEN + len(_MAGIC):].decode("ascii", errors="replace")
        # The checksum covers the archive as torch.save wrote it: up to the comment length, which was 0.
        covered, suffix = size - _COMMENT_LEN - 2, b"\x00\x00"
    elif tail[-_EOCD_LEN:].startswith(_EOCD) and tail.endswith(b"\x00\x00"):
        expected, covered, suffix = None, size, b""  # torch.save's own output: nothing to verify against
    else:
        raise CheckpointError(f"{what} {path} is truncated or damaged at its end ({size} bytes; "
                              "the archive's end record is missing)")
    sha = hashlib.sha256()
    f.seek(0)
    remaining = covered
    while remaining > 0:
        chunk = f.read(min(_CHUNK, remaining))
        if not chunk:
            raise CheckpointError(f"{what} {path} shrank while it was being read")
        sha.update(chunk)
        remaining -= len(chunk)
    sha.update(suffix)
    if expected is not None and sha.hexdigest() != expected:
        raise CheckpointError(f"{what} {path} is corrupt (its sha256 does not match its contents)")
    return expected is not None, sha.hexdigest()


def verify_checkpoint(path: str | Path) -> bool:
    """Check a checkpoint's checksum: True if it matches, False for a file written before checksums
    (a plain torch.save archive); raises CheckpointError for a missing, truncated or corrupt file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _verify(f, path, "checkpoint")[0]
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except OSError as err:
        raise CheckpointError(f"checkpoint {path} cannot be read: {describe_os_error(err)}") from None


# What an older mixtail wrote beyond plain data: the class counts as a numpy integer array. Reading exactly
# these constructs an array of numbers and runs nothing else (an array of Python objects would name further
# globals, and is refused); upgrade_checkpoint alone allows them, once, to rewrite such a file.
_OLD_NUMPY = {"numpy.ndarray", "numpy.dtype", "numpy.core.multiarray._reconstruct",
              "numpy._core.multiarray._reconstruct", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"}


def _old_numpy_globals(names: list[str]) -> bool:
    return bool(names) and all(n in _OLD_NUMPY or n.startswith("numpy.dtypes.") for n in names)


def _globals_needed(f) -> list[str]:
    """The Python globals a torch.save archive names in its pickle (read from its opcodes; nothing is run)."""
    try:
        f.seek(0)
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(f))
    except Exception:  # noqa: BLE001 - a damaged pickle: the caller reports the load failure itself
        return []


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *, log: Log = _stderr,
                    what: str = "checkpoint") -> tuple[dict, str]:
    """Verify and read one file written by save_checkpoint (a checkpoint, a router): (state, sha256), where
    sha256 is that of exactly the bytes read (the file is opened once). Every failure is a one-line
    CheckpointError naming the file; one that asks to construct Python objects is an UnsafeFileError.

    Loading uses torch's weights-only unpickler: tensors, numbers, strings, lists, tuples and dicts, nothing
    that can run code. A shared checkpoint is untrusted input.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a directory (give the file, e.g. {path / LATEST})")
    try:
        with open(path, "rb") as f:
            checked, sha = _verify(f, path, what)
            f.seek(0)
            try:
                state = torch.load(f, map_location=map_location, weights_only=True)
            except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing to the user
                needed = _globals_needed(f)
                raise _load_error(path, what, err, needed) from None
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} does not exist") from None
    except OSError as err:
        raise CheckpointError(f"{what} {path} cannot be read: {describe_os_error(err)}") from None
    if not checked:  # said only of a file that loads: a refused one gets its one line and no more
        log(f"{what} {path} has no checksum (written before checksums were added): loading it unverified")
    if not isinstance(state, dict):
        raise CheckpointError(f"{what} {path} is not a mixtail {what} (it holds a {type(state).__name__}, "
                              f"not a dict)")
    return state, sha


def _load_error(path: Path, what: str, err: Exception, needed: list[str]) -> CheckpointError:
    """The one line for a file torch's weights-only unpickler refused or could not read. The file's own bytes
    (torch's message quotes them) are never echoed; only the count and a short prefix of what it asks for."""
    if _old_numpy_globals(needed):
        return UnsafeFileError(
            f"{what} {path} was written by an older mixtail (it holds numpy arrays, which loading without "
            f"running code does not read): convert it once with `mixtail upgrade-checkpoint {path}`")
    if needed:
        return UnsafeFileError(
            f"{what} {path} is refused: it asks to construct Python objects ({len(needed)} kind"
            f"{'s' if len(needed) > 1 else ''}, e.g. {quote(needed[0])}), and a {what} may hold only tensors and "
            f"plain data; nothing in it was run")
    return CheckpointError(f"{what} {path} could not be read: its contents are damaged or not a torch.save "
                           f"archive of plain data ({type(err).__name__})")


def read_weights(path: str | Path, what: str) -> object:
    """A weights file from elsewhere (model.pretrained_path: torch.save output, no mixtail checksum), read with
    torch's weights-only unpickler; a file that asks to construct Python objects is an UnsafeFileError naming
    `what` and the file, any other failure a one-line CheckpointError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            try:
                return torch.load(f, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - see _load_error
                raise _load_error(path, what, err, _globals_needed(f)) from None
    except OSError as err:
        raise CheckpointError(f"{what} {path} cannot be read: {describe_os_error(err)}") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *, log: Log = _stderr) -> dict:
    """Verify and read one checkpoint file; every failure is a one-line CheckpointError naming it."""
    return read_checkpoint(path, map_location, log=log)[0]


def _plain(value):
    """value with every numpy array and numpy scalar turned into lists and Python numbers (recursively)."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return type(value)((k, _plain(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def upgrade_checkpoint(path: str | Path, *, log: Log = _stderr) -> Path:
    """Rewrite a checkpoint written by an older mixtail in today's format (numpy arrays as lists), in place,
    atomically and checksummed; returns the path. Reading it allows numpy's numeric arrays and nothing more:
    an array of Python objects, or any other object, is refused as read_checkpoint refuses it."""
    import numpy as np

    path = Path(path)
    try:
        with open(path, "rb") as f:
            _verify(f, path, "checkpoint")
            needed = _globals_needed(f)
            if needed and not _old_numpy_globals(needed):
                raise _load_error(path, "checkpoint", RuntimeError(), needed)
            f.seek(0)
            multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
            # numpy 2 moved numpy.core to numpy._core; a file names the module its writer had.
            allowed = [np.ndarray, np.dtype, *(getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")),
                       *((getattr(multiarray, fn), f"{mod}.multiarray.{fn}") for fn in ("_reconstruct", "scalar")
                         for mod in ("numpy.core", "numpy._core"))]
            try:
                with torch.serialization.safe_globals(allowed):
                    state = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001
                raise _load_error(path, "checkpoint", err, []) from None
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except OSError as err:
        raise CheckpointError(f"checkpoint {path} cannot be read: {describe_os_error(err)}") from None
    if isinstance(state, dict) and any(isinstance(v, np.ndarray) and v.dtype.hasobject for v in state.values()):
        raise CheckpointError(f"checkpoint {path} holds an array of Python objects: not converted")
    save_checkpoint(path, _plain(state))
    log(f"{path}: rewritten in the current checkpoint format (numpy arrays as lists)")
    return path


# --------------------------------------------------------------------------------------------------
# A run directory's checkpoints: the latest plus keep - 1 older ones
# --------------------------------------------------------------------------------------------------


class CheckpointStore:
    """The checkpoints of one run directory: `checkpoint.pt` (newest), `checkpoint.1.pt`, ... (older).

    Only one process writes (rank 0): it calls clean_stale() once at start and save() for every checkpoint.
    Any process may call load_latest(). Messages (a removed temporary file, a corrupt checkpoint skipped)
    go to `log`, one line each.
    """

    def __init__(self, run_dir: str | Path, keep: int = 2, *, log: Log = _stderr):
        if keep < 1:
            raise ValueError(f"CheckpointStore keeps at least 1 checkpoint, got keep={keep}")
        self.run_dir = Path(run_dir)
        self.keep = keep
        self.log = log
        self.latest = self.run_dir / LATEST
        self._corrupt: set[Path] = set()  # found by load_latest; moved aside by the next save
        self.loaded_sha256: str | None = None  # of the checkpoint load_latest returned last

    def slot(self, i: int) -> Path:
        return self.latest if i == 0 else self.run_dir / f"checkpoint.{i}.pt"

    def _indices(self) -> list[int]:
        if not self.run_dir.is_dir():
            return []
        found = [0] if self.latest.is_file() else []
        found += [int(m.group(1)) for p in self.run_dir.iterdir() if (m := _OLDER.fullmatch(p.name))]
        return sorted(found)

    def paths(self) -> list[Path]:
        """The checkpoint files present, newest first."""
        return [self.slot(i) for i in self._indices()]

    def clean_stale(self) -> list[Path]:
        """Remove the temporary files an interrupted write left behind (they can fill a disk); returns them."""
        if not self.run_dir.is_dir():
            return []
        removed = []
        for p in sorted(self.run_dir.glob(_STALE_GLOB)):
            if not p.is_file():
                continue
            try:
                size = p.stat().st_size
                p.unlink()
            except FileNotFoundError:
                continue
            except OSError as err:
                raise CheckpointError(f"cannot remove the stale temporary file {p}: "
                                      f"{describe_os_error(err)}") from None
            self.log(f"removed {p} ({size} bytes), a temporary file left by an interrupted checkpoint write")
            removed.append(p)
        return removed

    def save(self, state: dict) -> Path:
        """Write state as the new checkpoint.pt, keeping the previous keep - 1; returns checkpoint.pt.

        Raises NonFiniteCheckpointError (nothing written) when state["model"] holds NaN/inf, and
        CheckpointError (temporary file removed, older checkpoints untouched) when a write fails.
        """
        _refuse_nonfinite(state, self.latest)
        tmp = _write_temporary(self.latest, state)
        try:
            self._make_room()
            os.replace(tmp, self.latest)
        except OSError as err:
            note = _unlink_quietly(tmp)
            raise CheckpointError(f"cannot write checkpoint {self.latest} (rotating the older ones): "
                                  f"{describe_os_error(err)}{note}") from None
        _fsync_dir(self.run_dir)
        return self.latest

    def _make_room(self) -> None:
        """Shift checkpoint.pt -> .1 -> .2 ... up to the first free slot and drop those past keep - 1.

        At every instant checkpoint.pt is a complete checkpoint (the new one or the previous one): it moves
        to slot 1 by a hard link, and only the final rename replaces it. A filesystem without hard links
        falls back to a rename, leaving a moment with only checkpoint.1.pt, which load_latest also finds.
        """
        for p in sorted(self._corrupt):
            if p.exists():
                aside = p.with_name(p.name + ".corrupt")
                os.replace(p, aside)
                self.log(f"moved the corrupt checkpoint {p} aside to {aside}")
        self._corrupt.clear()
        present = set(self._indices())
        free = 0
        while free in present:
            free += 1
        for i in range(free - 1, 0, -1):  # oldest first, so no rename overwrites a checkpoint still needed
            if i + 1 >= self.keep:
                self.slot(i).unlink()
            else:
                os.replace(self.slot(i), self.slot(i + 1))
        if free > 0 and self.keep > 1:
            self._link(self.latest, self.slot(1))
        for i in self._indices():
            if i >= self.keep:  # left by a run with a larger keep, or beyond a gap
                self.slot(i).unlink()

    def _link(self, src: Path, dst: Path) -> None:
        tmp = _temporary(dst)
        try:
            os.link(src, tmp)
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
                raise
            os.replace(src, dst)
            return
        try:
            os.replace(tmp, dst)
        except OSError:
            _unlink_quietly(tmp)
            raise

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[Path, dict] | None:
        """The newest checkpoint that verifies and loads, as (path, state); None when there is none at all.

        Each newer one that fails is reported in one line (which file, why) and skipped; when every one
        fails, a CheckpointError lists them.
        """
        problems = []
        for path in self.paths():
            try:
                state, self.loaded_sha256 = read_checkpoint(path, map_location, log=self.log)
            except UnsafeFileError:
                raise  # not damage to fall back from: someone put a file here that asks to run code
            except CheckpointError as err:
                self._corrupt.add(path)
                problems.append(str(err))
                continue
            for problem in problems:
                self.log(f"{problem}: using the previous checkpoint, {path}")
            return path, state
        if problems:
            raise CheckpointError(f"no usable checkpoint in {self.run_dir}: {'; '.join(problems)}")
        return None
