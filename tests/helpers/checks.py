"""Small checks and hostile inputs several test files share, each defined once here."""

from __future__ import annotations

import os
from pathlib import Path


class Payload:
    """Unpickling this creates `marker`: proof that loading a file ran code from it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def free_bytes(path: Path) -> int:
    """Bytes free to an unprivileged writer on the filesystem holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def cli_error_line(command: str, err: str, *fragments: str) -> str:
    """`err` (a command's stderr) is exactly one line, `mixtail <command>: error: ...`, holding every fragment
    and no traceback; returns that line."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"mixtail {command}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
