"""A child process that dies with the process that started it: `mixtail sweep` starts each
`mixtail train` with MIXTAIL_DIE_WITH_PARENT=<its pid>, and the child asks Linux to send it SIGTERM when
that parent goes, even by SIGKILL, when no handler of the parent's can run. A trainer stopped that way
ends like any SIGTERM'd run, and `mixtail sweep --resume` continues it.

    from mixtail.lifetime import die_with_parent
    die_with_parent()   # at the start of a command; a no-op without the variable, or off Linux

Linux only (prctl PR_SET_PDEATHSIG); elsewhere the variable is ignored and a killed sweep can still orphan
a run, as before.
"""

from __future__ import annotations

import os
import signal
import sys

ENV_VAR = "MIXTAIL_DIE_WITH_PARENT"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> bool:
    """If ENV_VAR names this process's parent, have the kernel SIGTERM it when the parent dies; True if set.

    The variable is removed from the environment first, so the processes this one starts (data workers,
    a nested command) do not take it as theirs. A parent already gone by the time this runs (its pid is no
    longer our parent's) means the sweep died while this process started: it exits at once, with 143.
    """
    value = os.environ.pop(ENV_VAR, None)
    if value is None or not sys.platform.startswith("linux"):
        return False
    import ctypes  # here, not at import: every mixtail command imports this module

    try:
        parent = int(value)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return False
    except (ValueError, OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before the request: no signal will come
        os._exit(128 + signal.SIGTERM)
    return True
