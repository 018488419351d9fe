"""Process liveness, for the sweeps that remove what a crashed run left behind."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether a process of that pid exists (of any user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
