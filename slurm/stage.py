"""One stage of the pipeline, as a job runs it (`slurm/stage.sbatch STAGE PIPELINE.env`) or --local does.

Each stage runs its stage's command (`python -m prep ...`, `python -m train ...`, `python -m eval ...`) as a child,
and appends its end to LOG_DIR/summary.txt (time, stage, job id, ok / FAILED (exit N) / what Slurm did, log), the
one place that says which stage failed and where to look. Under Slurm a stage also answers Slurm's SIGTERM: training
waits for its checkpoint and leaves or takes the requeue, the eval watcher records that Slurm stopped it.
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from common import files
from common.errors import PipelineError
from train.rundir import RunDir

from . import jobs
from .config import Pipeline
from .plan import SLURM_DIR, eval_stage, sbatch_argv

PREEMPTED = 99   # the trainer's exit status after saving on SIGUSR1 / SIGTERM (train.trainer.PREEMPTED_EXIT)
HUNG = 98        # no update for heal.watchdog_minutes, every rank's stacks in the log (train.watchdog.HUNG_EXIT)
# A run that hangs again after this many requeues hangs for a reason a restart does not cure: stop, keep the log.
MAX_HUNG_REQUEUES = 3
TRAIN_SRUN = SLURM_DIR / "train_srun.sh"


class StageFailed(PipelineError):
    pass


class Stopped(Exception):
    """Slurm's SIGTERM reached a stage that ends on it."""


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Run:
    """One run of one stage: its id and log, its children, its outcome."""

    def __init__(self, p: Pipeline, name: str, tee=None):
        self.p, self.name, self.tee = p, name, tee
        self.slurm_job = os.environ.get("SLURM_JOB_ID")
        self.term_received = False
        self.outcome: str | None = None   # a stage may name its own outcome (train: requeued)
        self.recorded = False
        self.started = time.monotonic()
        if self.slurm_job:
            array = os.environ.get("SLURM_ARRAY_JOB_ID")
            self.id = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else self.slurm_job
            self.log = str(p.log_dir / f"{name}-{self.id}.out")
        else:
            index = os.environ.get("TASK_INDEX")
            self.id = f"local-{index}" if index else "local"
            self.log = os.environ.get("STAGE_LOG", "(this terminal)")

    def say(self, text: str, err: bool = False) -> None:
        """A line of the stage's own; with --local it goes to the terminal and the stage's log, as its children's
        output does (stderr included, as under sbatch)."""
        if self.tee is None:
            print(text, file=sys.stderr if err else sys.stdout, flush=True)
        else:
            self._copy((text + "\n").encode())

    def child(self, argv: list[str]) -> subprocess.Popen:
        if self.tee is None:   # under Slurm the job's log is this process's stdout already
            return subprocess.Popen(argv)
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def call(self, argv: list[str]) -> int:
        proc = self.child(argv)
        if proc.stdout is not None:
            for line in iter(proc.stdout.readline, b""):
                self._copy(line)
        return proc.wait()

    def _copy(self, data: bytes) -> None:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        self.tee.write(data)
        self.tee.flush()

    def record(self, status: int) -> None:
        outcome = self.outcome or ("ok" if status == 0 else f"FAILED (exit {status})")
        if status != 0 and self.outcome is None:
            self.say(f"error: stage {self.name} failed (exit {status}); log: {self.log}", err=True)
        files.append_line(self.p.log_dir / "summary.txt", f"{now()} {self.name} {self.id} {outcome} log: {self.log} "
                                                          f"({elapsed(time.monotonic() - self.started)})")
        self.recorded = True


def elapsed(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s"


def python(*argv: str) -> list[str]:
    return [sys.executable, *argv]


def task_flags() -> list[str]:
    """An array task's share (Slurm's array variables, or TASK_INDEX / TASK_COUNT without Slurm); none: all."""
    index = os.environ.get("SLURM_ARRAY_TASK_ID", os.environ.get("TASK_INDEX"))
    count = os.environ.get("SLURM_ARRAY_TASK_COUNT", os.environ.get("TASK_COUNT"))
    return ["--task-index", index, "--task-count", count] if index else []


def scoring_flags(p: Pipeline) -> list[str]:
    return ["--hellaswag-file", str(p.HELLASWAG)] + (["--limit", str(p.EVAL_LIMIT)] if p.EVAL_LIMIT else [])


# ---- the stages ------------------------------------------------------------------------------------------------

def prep_download(run: Run, args) -> int:
    p = run.p
    if p.PREP_SOURCE == "local":
        raise StageFailed("PREP_SOURCE=local has nothing to download (tokenize reads PREP_INPUT)")
    return run.call(python("-m", "prep", "download", "--dataset", p.PREP_SOURCE, "--sample", p.PREP_SAMPLE,
                           "--out", str(p.RAW_DIR)))


def prep_tokenize(run: Run, args) -> int:
    p = run.p
    return run.call(python("-m", "prep", "tokenize", "--input", *map(str, p.tokenize_inputs()), "--out",
                           str(p.DATASET_DIR), "--workers", str(p.PREP_WORKERS), *p.tokenize_flags(), *task_flags()))


def prep_finalize(run: Run, args) -> int:
    # --verify: the one task that writes the manifest then verifies the dataset, not each of the N tasks.
    return run.call(python("-m", "prep", "finalize", "--out", str(run.p.DATASET_DIR), "--verify", *task_flags()))


def train(run: Run, args) -> int:
    p = run.p
    argv = python(*p.train_argv())
    if not run.slurm_job:
        if p.NODES > 1:
            raise StageFailed(f"NODES={p.NODES} needs Slurm (or run one node at a time under your own launcher)")
        if p.GPUS_PER_NODE > 1:
            argv = python("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(p.GPUS_PER_NODE),
                          *p.train_argv())
        status = run.call(argv)
        if status == PREEMPTED:
            run.say("training stopped after saving a checkpoint; run the same command again to resume", err=True)
        elif status == HUNG:
            run.say("training hung (no update for heal.watchdog_minutes; every rank's stacks are in the log); run "
                    "the same command again to resume from the last checkpoint", err=True)
        return status
    from train.launch import resolve_env   # the rendezvous rule, as every rank applies it
    env = os.environ
    where = resolve_env({**env, "SLURM_PROCID": "0", "SLURM_NTASKS": env.get("SLURM_NTASKS", "1")})
    run.say(f"rendezvous: {where['MASTER_ADDR']}:{where['MASTER_PORT']}, {env.get('SLURM_NTASKS')} tasks on "
            f"{env.get('SLURM_JOB_NUM_NODES')} node(s), restart {env.get('SLURM_RESTART_COUNT', '0')}")
    # When Slurm ends the job it sends SIGTERM to this process as well as to the tasks: wait for srun, so the
    # stage is recorded after the trainer has written its checkpoint.
    signal.signal(signal.SIGTERM, lambda *_: setattr(run, "term_received", True))
    status = 0 if run.term_received else run.call(["bash", str(TRAIN_SRUN), *argv])
    if status != 0 and slurm_ending_job(run):
        # Slurm decides whether the job comes back: requeueing here would requeue a job Slurm has requeued
        # already, or bring back one that was cancelled.
        restarts = (jobs.show_job(run.slurm_job) or {}).get("Restarts", "0")
        requeued = int(restarts or 0) > int(env.get("SLURM_RESTART_COUNT", "0") or 0)
        run.outcome = f"{'requeued' if requeued else 'stopped'} by Slurm (exit {status})"
        run.say(f"training ended by Slurm: {run.outcome}")
    elif status == HUNG and int(env.get("SLURM_RESTART_COUNT", "0") or 0) >= MAX_HUNG_REQUEUES:
        raise StageFailed(f"training hung again (no update for heal.watchdog_minutes; every rank's stacks are in "
                          f"the log) after {MAX_HUNG_REQUEUES} requeues: not requeued again; resubmit to resume")
    elif status in (PREEMPTED, HUNG):
        run.say(f"training saved a checkpoint after a preemption signal: requeueing job {run.slurm_job}"
                if status == PREEMPTED else f"training hung (no update for heal.watchdog_minutes; stacks above): "
                f"requeueing job {run.slurm_job} to resume from its last checkpoint")
        if subprocess.run(["scontrol", "requeue", run.slurm_job]).returncode != 0:
            raise StageFailed(f"scontrol requeue {run.slurm_job} failed: resubmit to resume")
        run.outcome = f"requeued (exit {status})"
        run.record(status)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)   # the requeue's own SIGTERM ends this run of the job
        time.sleep(30)
    return status


def slurm_ending_job(run: Run) -> bool:
    """Whether Slurm is ending this run of the job (it then shows COMPLETING, not RUNNING); a job whose tasks alone
    got a signal (scancel --signal, a preemption's first notice) is still RUNNING. If the controller does not
    answer, this process's own SIGTERM says the same."""
    state = jobs.job_state(run.slurm_job)
    return state != "RUNNING" if state else run.term_received


def eval_submit_line(p: Pipeline) -> str:
    """The sbatch line of one checkpoint's eval job, less its tag (the watcher's --submit)."""
    return shlex.join(sbatch_argv(p, eval_stage(p), p.file))


def eval_watch(run: Run, args) -> int:
    """Beside training: see that every complete checkpoint is scored once, end after the final one, then render
    the report. Under Slurm it also follows the training job (TRAIN_JOB_ID): one that ends without success stops
    the watcher with an error instead of a wait for a checkpoint that will never come; a requeued one is waited
    for."""
    p = run.p
    watch = python("-m", "eval", "watch", str(p.RUN_DIR), "--until-final")
    watch += ["--poll", f"{p.EVAL_POLL:g}"] if p.EVAL_POLL else []
    if p.EVAL_MODE == "jobs" and run.slurm_job:
        watch += ["--submit", eval_submit_line(p)]
    else:   # watch mode, or no Slurm to submit to (by hand, --local): score here, one after another
        watch += scoring_flags(p)
    train_job = os.environ.get("TRAIN_JOB_ID")
    watcher = None
    if run.slurm_job:
        def stop(*_):
            raise Stopped
        signal.signal(signal.SIGTERM, stop)
    try:
        if not train_job:
            if not RunDir(p.RUN_DIR).config.exists():
                raise StageFailed(f"no training run at {p.RUN_DIR} (no config.yaml): train first")
            status = run.call(watch)
        else:
            while True:
                if watcher is None and RunDir(p.RUN_DIR).config.exists():
                    watcher = run.child(watch)
                if watcher is not None and watcher.poll() is not None:
                    status = watcher.returncode
                    break
                state = jobs.job_state(train_job)
                if state in jobs.UNSUCCESSFUL:
                    raise StageFailed(f"training job {train_job} ended {state}: no final checkpoint to wait for")
                time.sleep(5)
    except Stopped:
        run.outcome = "stopped by Slurm (SIGTERM)"
        return 143
    finally:
        if watcher is not None and watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    if status != 0:
        return status
    return run.call(python("-m", "eval", "report", str(p.RUN_DIR)))


def eval_job(run: Run, args) -> int:
    """Score checkpoints (tags or tag directories; none: every complete one not yet scored) in one process, then
    re-render the report (also after a failure: the rows of the others)."""
    p = run.p
    select = [x for tag in args for x in ("--only", Path(tag).name)] or ["--once"]
    status = run.call(python("-m", "eval", "watch", str(p.RUN_DIR), *select, "--poll", "5", *scoring_flags(p)))
    report = run.call(python("-m", "eval", "report", str(p.RUN_DIR)))
    return status or report


STAGES = {"prep_download": prep_download, "prep_tokenize": prep_tokenize, "prep_finalize": prep_finalize,
          "train": train, "eval_watch": eval_watch, "eval": eval_job}


def run_stage(p: Pipeline, name: str, args: list[str], tee=None) -> int:
    run = Run(p, name, tee)
    p.log_dir.mkdir(parents=True, exist_ok=True)
    run.say(f"== {name} ({run.id}) on {socket.gethostname()} at {now()}")
    try:
        status = STAGES[name](run, args)
    except PipelineError as exc:
        run.say(f"error: {exc}", err=True)
        status = 1
    if not run.recorded:
        run.record(status)
    return status
