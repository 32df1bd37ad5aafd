"""What a child process of ours does about its parent."""
from __future__ import annotations

import ctypes
import os
import signal
from contextlib import contextmanager

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


@contextmanager
def sigint_held():
    """Hold Ctrl-C (SIGINT) back from this thread for the block. A pool that forks its workers inside starts them
    with SIGINT blocked, so a Ctrl-C between a fork and the worker's ignore_sigint() cannot kill the worker
    mid-start with a traceback; a Ctrl-C meanwhile reaches this process as the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_sigint() -> None:
    """In a pool worker: ignore Ctrl-C, which reaches the whole process group (the parent alone acts on it), then
    take SIGINT out of the mask sigint_held() gave it; one that arrived in between is dropped."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
