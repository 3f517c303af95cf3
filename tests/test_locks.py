"""mixtail/locks.py: one process at a time on a run directory or a conversion output. Two real
training processes on one run directory are in tests/test_train.py (test_two_trainers_on_one_run_directory).

    python -m pytest tests/test_locks.py -q
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from mixtail.locks import BusyError, DirectoryLock, pid_alive


def _lock(path, log=None):
    return DirectoryLock(path, what="test", where=f"thing {path.parent}", advice="choose another",
                         log=log or (lambda m: None))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not pid_alive(proc.pid)
    return proc.pid


def test_a_second_holder_is_refused_naming_the_first_and_the_file_is_removed(tmp_path):
    path = tmp_path / ".lock"
    with _lock(path):
        assert path.read_text().split()[:2] == [str(os.getpid()), socket.gethostname()]
        with pytest.raises(BusyError, match=f"thing {tmp_path} is in use by another test \\(pid {os.getpid()} on "
                                            f"host .* since .*; lock file {path}\\); wait for it to end or choose"):
            with _lock(path):
                pass
    assert not path.exists()
    with _lock(path):  # free again
        pass


def test_a_lock_left_by_a_dead_process_is_taken_over_saying_so(tmp_path):
    path = tmp_path / ".lock"
    dead = _dead_pid()
    path.write_text(f"{dead} {socket.gethostname()} 2026-01-01T00:00:00+0000\n")
    said = []
    with _lock(path, said.append):
        assert path.read_text().split()[0] == str(os.getpid())
    assert said == [f"thing {tmp_path}: taking over the lock of a test that is no longer running (pid {dead} on host "
                    f"{socket.gethostname()} since 2026-01-01T00:00:00+0000)"]


def test_a_lock_held_by_another_process_is_refused(tmp_path):
    """flock belongs to the process holding it: a child holds the lock, this process is refused; once the child
    is killed (kill -9, no clean-up) the lock is free and taken over."""
    path = tmp_path / ".lock"
    child = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; from mixtail.locks import "
                              "DirectoryLock\nwith DirectoryLock(Path(sys.argv[1]), what='x', where='y', advice='z'):"
                              "\n    print('held', flush=True); sys.stdin.read()", str(path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(BusyError, match=f"pid {child.pid} "):
            with _lock(path):
                pass
    finally:
        child.kill()
        child.wait()
    said = []
    with _lock(path, said.append):
        pass
    assert len(said) == 1 and f"pid {child.pid} " in said[0]
