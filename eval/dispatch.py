"""`eval watch RUN --submit CMD`: each complete checkpoint gets its own short evaluation job, exactly once.

The dispatcher scores nothing and needs no GPU. For each complete checkpoint (train.rundir.checkpoints' rule, through
the Watcher it extends) that results.jsonl does not hold yet, it runs `CMD TAG`, which submits a job that scores
TAG and records it (under Slurm, the eval_watch stage makes CMD `sbatch ... slurm/stage.sbatch eval PIPELINE`)
and prints the job id, as `sbatch --parsable` does. The id goes into RUN/eval/.watch/<tag>.submitted, written
atomically while RUN/eval/.watch/<tag>.submit.lock is held, and that record is what every later look goes by: a
second dispatcher, or this one restarted, asks Slurm about the recorded job instead of submitting another. A job that ended without
a result (failed, cancelled, timed out, its node lost) is submitted again, at most max_attempts times in all.

Results stay exactly once whatever happens to the submissions: the job scores under the watcher's own per-tag
lock and re-reads results.jsonl first (`eval watch --only TAG`), so even a duplicate job (a dispatcher killed
between sbatch and writing the record) finds the line there and scores nothing.
"""
from __future__ import annotations

import re
import shlex
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from common import files
from slurm.jobs import ACTIVE, job_state as slurm_job_state

from .harness import EvalError
from . import results
from .watch import Watcher

JOB_ID = re.compile(r"\d+(_\d+)?")


class Dispatcher(Watcher):
    def __init__(self, run: Path, submit: str, max_attempts: int = 3, log=print, job_state=slurm_job_state,
                 only: list[str] | None = None):
        super().__init__(run, [], max_attempts=max_attempts, log=log, only=only)
        self.submit = shlex.split(submit)
        if not self.submit:
            raise EvalError("--submit is empty: give the command that submits one checkpoint's eval job")
        self.job_state = job_state
        self.submit_failures: dict[str, int] = {}
        self.unanswered: set[str] = set()  # jobs Slurm could not be asked about, said once each

    def settled(self) -> bool:
        """Every checkpoint seen has its result, or was rotated away or given up, and every eval job submitted for
        them has ended: --until-final then means every evaluation is over, not just the final one (an earlier job
        may still be queued behind it), and each job has rendered its report and recorded its stage (a job appends
        its result line first). A job Slurm cannot be asked about counts as ended: the results are in."""
        if not self.seen <= set(self.finished):
            return False
        records = [self._read_record(self._record_file(tag)) for tag in sorted(self.seen)]
        return all(self.job_state(record["job"]) not in ACTIVE for record in records if record is not None)

    def _record_file(self, tag: str) -> Path:
        return self.dir.watch / f"{tag}.submitted"

    def _evaluate(self, pending: list[tuple[str, Path]]) -> None:
        for tag, path in pending:
            # Held for one state query and at most one sbatch: a second dispatcher waits seconds, then sees
            # the record this one wrote.
            with files.lock(self.dir.watch / f"{tag}.submit.lock", f"the eval job submission of {tag}",
                            wait=True):
                self._consider(tag, path)

    def _consider(self, tag: str, path: Path) -> None:
        wanted = results.key_of(path)
        if wanted in results.scored_keys(self.run):
            self.finished[tag] = "scored"
            return
        record_file = self._record_file(tag)
        record = self._read_record(record_file)
        if record is not None and record.get("checkpoint_id", wanted[1]) != wanted[1]:
            record = None  # the jobs of an earlier checkpoint of this name (a run restarted from scratch)
        if record is not None:
            job = record["job"]
            state = self.job_state(job)
            if state is None:
                if job not in self.unanswered:
                    self.unanswered.add(job)
                    self.log(f"eval watch: {tag}: cannot ask Slurm about eval job {job}; asking again at the next poll")
                return
            if state in ACTIVE:
                return
            if wanted in results.scored_keys(self.run):  # the job appended its line between our two looks
                self.finished[tag] = "scored"
                return
            if not path.exists():
                self._note(tag, "rotated", f"rotated away (checkpoint.keep_last) before eval job {job} scored it")
                return
            ended = f"ended {state}" if state else "is no longer known to Slurm"
            tries = max(record["submissions"], self._attempts(wanted))
            if tries >= self.max_attempts:
                self._give_up(tag, path, f"gave up after {tries} eval jobs without a result (the last, {job}, "
                                         f"{ended}; --max-attempts {self.max_attempts}; remove {record_file} and "
                                         f"{self._attempts_file(tag)} to try again)")
                return
            self.log(f"eval watch: {tag}: eval job {job} {ended} without a result; submitting another")
        self._submit(tag, wanted, record_file, record)

    def _read_record(self, record_file: Path) -> dict | None:
        if not record_file.exists():
            return None
        try:
            record = files.read_json(record_file)
            if isinstance(record["job"], str) and isinstance(record["submissions"], int):
                return record
        except (ValueError, KeyError, TypeError):
            pass
        raise EvalError(f"{record_file} is not a submission record (JSON with job and submissions); it names the "
                        f"eval job of its checkpoint: check that job (squeue, sacct), then remove the file")

    def _submit(self, tag: str, wanted: tuple, record_file: Path, record: dict | None) -> None:
        cmd = [*self.submit, tag]
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
        job = lines[-1].split(";")[0] if lines else ""
        if done.returncode != 0 or not JOB_ID.fullmatch(job):
            why = (done.stderr.strip().splitlines() or [f"printed {done.stdout.strip()!r}, not a job id"])[-1]
            failures = self.submit_failures[tag] = self.submit_failures.get(tag, 0) + 1
            message = (f"submitting the eval job of {tag} failed (exit status {done.returncode}): {why}: "
                       f"{shlex.join(cmd)}")
            if failures >= self.max_attempts:
                raise EvalError(f"{message} ({failures} times in a row)")
            self.log(f"eval watch: {message}; trying again at the next poll")
            return
        self.submit_failures.pop(tag, None)
        jobs = [*(record or {}).get("jobs", []), job]
        files.write_json(record_file, {
            "tag": tag, "checkpoint_id": wanted[1], "job": job, "submissions": len(jobs), "jobs": jobs,
            "submitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": shlex.join(cmd)})
        self.log(f"eval watch: {tag}: submitted eval job {job} (submission {len(jobs)} of {self.max_attempts})")
