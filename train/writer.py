"""One writer per run directory, and one that can write: checked by every rank before any update.

Rank 0 takes RUN/train.lock (common.files.lock: an flock the kernel drops when the process ends, and a record of
its holder: host, pid, since when, Slurm job) and keeps it for the whole run. A second training on the same run
directory stops at start in one line naming the holder. A requeued Slurm job whose earlier incarnation still holds
the lock (the same SLURM_JOB_ID: Slurm is ending it, or a network filesystem has not yet seen its lock go) waits
for it up to TAKEOVER_SECONDS and then takes it.

Before that, rank 0 creates and removes a file in RUN, and then every rank in RUN/checkpoints (each writes its own
checkpoint files there, possibly through another node's mount; RUN itself while checkpoints/ does not exist yet):
a read-only or full filesystem, or an exhausted quota, stops the run before its first update instead of at its
first save.
The ranks agree on the outcome (launch.first_error), so they all stop alike.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

from common import files
from common.errors import PipelineError

from .launch import first_error
from .rundir import RunDir


# How long a requeued job waits for its own earlier incarnation's lock: srun gives its tasks 120 s (--wait) to
# end after the first one does, and a network filesystem's lock recovery (an NFS lease) takes about 90 s.
TAKEOVER_SECONDS = 300


class WriterError(PipelineError):
    """The run directory is another training's, or cannot be written; the message says which and what to do."""


def probe(directory: Path) -> None:
    """files.probe_write in `directory`; a WriterError if it fails."""
    try:
        files.probe_write(directory)
    except OSError as exc:
        raise WriterError(f"cannot write in {directory} ({exc.strerror or exc}): the run would lose every update "
                          f"until its first checkpoint; make it writable (a read-only mount, a full disk or an "
                          f"exhausted quota), or set another run_dir") from None


def take_lock(run_dir, job: str | None = None, takeover_seconds: float = TAKEOVER_SECONDS,
              log=print) -> contextlib.ExitStack:
    """Hold RUN/train.lock until the returned stack is closed (or the process ends)."""
    run_dir = Path(run_dir)
    lock = RunDir(run_dir).train_lock
    job = os.environ.get("SLURM_JOB_ID") if job is None else job
    held = contextlib.ExitStack()
    deadline = None
    while True:
        try:
            held.enter_context(files.lock(lock, f"run directory {run_dir}"))
            return held
        except files.Locked as exc:
            ours = bool(job) and exc.holder.endswith(f", Slurm job {job}")
            if ours and deadline is None:
                deadline = time.monotonic() + takeover_seconds
                log(f"{lock} is held by this job's earlier incarnation ({exc.holder}); waiting up to "
                    f"{takeover_seconds:.0f} s for it to end")
            if ours and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            still = f" after {takeover_seconds:.0f} s" if ours else ""
            raise WriterError(f"{run_dir} is in use by another training: {exc.holder}{still} (lock {lock}); "
                              f"two trainings in one run directory would write over each other's checkpoints "
                              f"and logs: wait for it to end, or set another run_dir") from None


def claim(run_dir, rank: int, world_size: int) -> contextlib.ExitStack | None:
    """Check and lock the run directory; call on every rank together, before any update or run file is written.
    Rank 0 gets the held lock (None on the others); every rank raises the same WriterError when it fails."""
    run_dir = Path(run_dir)
    checkpoints = RunDir(run_dir).checkpoints

    def agree(problem: str | None) -> None:
        first = first_error(problem, world_size)
        if first:
            raise WriterError(first)

    held, problem = None, None
    if rank == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe(run_dir)
            held = take_lock(run_dir, log=lambda line: print(line, file=sys.stderr, flush=True))
        except (WriterError, files.LocksUnsupported) as exc:
            problem = str(exc)
        except OSError as exc:
            problem = f"cannot prepare run directory {exc.filename or run_dir}: {exc.strerror or exc}"
    try:
        agree(problem)
        problem = None
        try:
            # A fresh run's checkpoints/ does not exist yet: it will be made in RUN, on RUN's filesystem.
            probe(checkpoints if checkpoints.is_dir() else run_dir)
        except WriterError as exc:
            problem = f"rank {rank}: {exc}" if world_size > 1 else str(exc)
        agree(problem)
    except BaseException:
        if held is not None:
            held.close()
        raise
    return held
