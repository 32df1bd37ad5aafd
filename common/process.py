"""What a child process of ours does about its parent."""
from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """In a child (a forked pool worker, or a preexec_fn): SIGKILL when the parent dies, even by SIGKILL (Linux;
    elsewhere a no-op). An orphan would hold what the parent held (a dataset's or a checkpoint's lock, inherited)
    and wait for ever on a parent that is gone, so every rerun is refused naming a dead process."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)
