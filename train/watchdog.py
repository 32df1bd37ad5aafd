"""The watchdog: a rank on which no update has finished for heal.watchdog_minutes writes every thread's stack to
stderr (the job's log) and exits with HUNG_EXIT, which the train stage requeues; the requeued job resumes from the
last checkpoint.

Every rank runs its own: a rank stuck in a collective (its peer died or hangs) or in a slow filesystem notices on
its own, so no rank needs another to answer. The ranks of a stuck job stop together (none of them finishes an
update), each with its own stacks: the hung one's shows where it hangs, the others' the collective they wait in.
The clock starts when the training loop starts (after the engine is built and the checkpoint loaded) and restarts
at each finished update, applied or skipped; validation, sampling and checkpoint saving count against it, so the
limit must exceed the longest of those (the default, 30 minutes, is far above them).
"""
from __future__ import annotations

import atexit
import faulthandler
import os
import sys
import threading
import time

from common.cli import say_line

HUNG_EXIT = 98  # slurm/stage.py requeues the train job on it, as on the trainer's PREEMPTED_EXIT (99)


class Watchdog:
    def __init__(self, minutes: float, rank: int):
        self.minutes = minutes
        self.rank = rank
        self.update = 0  # the last finished update
        self._last = time.monotonic()
        self._closed = threading.Event()
        self._thread = None

    def start(self, update: int) -> "Watchdog":
        """Watch from now (0 minutes: never)."""
        self.beat(update)
        if self.minutes > 0:
            self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
            self._thread.start()
        return self

    def beat(self, update: int) -> None:
        """An update finished."""
        self.update = update
        self._last = time.monotonic()

    def close(self) -> None:
        self._closed.set()

    @property
    def poll_seconds(self) -> float:
        # Looked at 10 times per limit (at most every 10 s): it fires within a tenth of the limit of its time.
        return min(self.minutes * 60 / 10, 10.0)

    def _watch(self) -> None:
        limit = self.minutes * 60
        while not self._closed.wait(self.poll_seconds):
            idle = time.monotonic() - self._last
            if idle >= limit:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        # Whatever ends this process from now on (the main thread may wake with a broken collective's error when
        # another rank exits first) ends it with HUNG_EXIT.
        atexit.register(os._exit, HUNG_EXIT)
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        what = (f"rank {self.rank}: no update finished for {idle / 60:.1f} minutes (heal.watchdog_minutes "
                f"{self.minutes:g}) after update {self.update}")
        say_line(f"{what}; every thread's stack of this rank follows")
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        say_line(f"error: {what}; exiting with status {HUNG_EXIT} to be requeued (the run resumes from its last "
                 f"checkpoint)")
        # The other ranks' watchdogs, whose clocks restarted at the same update's end, fire within one look of this
        # one: wait that long, so that each of them has written its stacks before this rank's exit breaks their
        # collectives.
        time.sleep(self.poll_seconds + 1.0)
        # Not sys.exit: the main thread is the one stuck, and no cleanup may wait on it or on a collective.
        os._exit(HUNG_EXIT)
