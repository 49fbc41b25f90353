"""One writer per chunk: a lock file created atomically (O_EXCL) holding the writer's pid; a
lock whose process is gone is taken over, so a killed run never blocks the next one."""

from __future__ import annotations

import os
from pathlib import Path


def claim(lp: Path) -> bool:
    """Atomically claim a lock file for this process (it holds the pid). False when a live process
    holds it; a lock left by a dead process is taken over."""
    for _ in range(2):
        try:
            fd = os.open(lp, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = int(lp.read_text().strip() or "0")
            except (OSError, ValueError):
                owner = 0
            if owner and owner != os.getpid() and _alive(owner):
                return False
            lp.unlink(missing_ok=True)       # stale: its writer died (or wrote nothing yet)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
