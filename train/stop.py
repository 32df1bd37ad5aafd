"""Preemption signals: SIGUSR1 (Slurm's time-limit warning) and SIGTERM (scancel, requeue, preemption)."""
from __future__ import annotations

import signal


class StopFlag:
    """Set by SIGUSR1 / SIGTERM; the training loop finishes its step, saves, and exits with PREEMPTED_EXIT.

    Installed first thing in `python -m train`, so a signal during imports, rendezvous or checkpoint loading is
    remembered instead of killing the process (which Slurm would record as a failure, not a preemption).
    """

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
