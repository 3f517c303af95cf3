"""One process at a time on a run directory or a conversion output: an exclusive lock that names its holder.

    with DirectoryLock(out_dir / LOCK_NAME, what="mixtail train", where=f"run directory {out_dir}", log=print):
        ...   # a second process is refused (BusyError naming the pid and host holding it)

The lock is `flock` on a small file holding `pid host start-time`: the kernel releases it when the holder dies,
however it dies (kill -9 included), so a lock is never stale in truth. A file left by a dead holder is taken over
with one line saying whose it was. Where a filesystem has no flock (some network mounts answer ENOLCK), the pid
in the file decides: a live process on this host holds it, anything else is stale. `mixtail train` (rank 0 only:
it alone writes the run directory) and `mixtail convert` (PATH's parent, `.<name>.lock`) use it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from mixtail.errors import MixtailError


class BusyError(MixtailError):
    """Another live process holds the lock; the message names it (pid, host, since when)."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (someone else's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(text: str) -> tuple[int, str, str] | None:
    """(pid, host, since) from a lock file's text, or None when it holds none."""
    parts = text.split()
    if len(parts) < 3 or not parts[0].isdigit():
        return None
    return int(parts[0]), parts[1], " ".join(parts[2:])


class DirectoryLock:
    """An exclusive lock at `path` (a file created as needed), held between __enter__ and __exit__; the file is
    removed on release. `what` names the kind of holder ('mixtail train') and `where` the thing locked, for
    the refusal: "<where> is in use by another <what> (pid N on host H since T); wait for it or <advice>"."""

    def __init__(self, path: Path, *, what: str, where: str, advice: str, log: Callable[[str], None] = print):
        self.path, self.what, self.where, self.advice, self.log = Path(path), what, where, advice, log
        self.fd: int | None = None

    def _refuse(self, holder: tuple[int, str, str] | None) -> BusyError:
        who = f"pid {holder[0]} on host {holder[1]} since {holder[2]}" if holder else "a process"
        return BusyError(f"{self.where} is in use by another {self.what} ({who}; lock file {self.path}); wait for "
                         f"it to end or {self.advice}")

    def __enter__(self) -> DirectoryLock:
        host = socket.gethostname()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flocked = True
            except BlockingIOError:
                holder = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
                os.close(fd)
                raise self._refuse(holder) from None
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                flocked = False
            # The file we locked may have been removed by its releasing holder after we opened it: lock the one
            # the path names now (else two processes could each hold a lock, on different files).
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
        if holder and not flocked and holder[0] != os.getpid() and holder[1] == host and pid_alive(holder[0]):
            os.close(fd)
            raise self._refuse(holder)
        if holder:
            self.log(f"{self.where}: taking over the lock of a {self.what} that is no longer running "
                     f"(pid {holder[0]} on host {holder[1]} since {holder[2]})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {host} {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before the unlock: a waiting process then re-checks the inode
        except OSError:
            pass  # a read-only or vanished directory: the kernel still drops the lock below
        os.close(self.fd)
        self.fd = None
