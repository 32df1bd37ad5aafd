"""`slurm/submit.sh PIPELINE.env [--dry-run|--local]`: check everything, then run or submit the stages.

Everything is checked before the first stage runs or the first sbatch, so bad input never leaves a half-submitted
chain; a prepared dataset with the same recipe is reused (no prep stages). Then one executor: with --local the
stages run here in order (tokenize and finalize tasks one after another), under Slurm each is one sbatch waiting for
the one before (--dependency=afterok; the eval watcher waits for training to start), and if an sbatch fails the
jobs already submitted are cancelled.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime, timezone

from common import cli, files

from . import checks
from .config import Pipeline
from .plan import STAGE_SCRIPT, Stage, eval_stage, sbatch_argv, show_cmd, stages
from .stage import elapsed, now, run_stage


class SubmitError(checks.ConfigError):
    pass


def show_config(p: Pipeline, local: bool, dry_run: bool, planned: list[Stage]) -> None:
    finalize = next((s.array for s in planned if s.name == "prep_finalize"), None)
    source = (f"local {' '.join(map(str, p.PREP_INPUT))}" if p.PREP_SOURCE == "local"
              else f"{p.PREP_SOURCE} {p.PREP_SAMPLE} -> {p.RAW_DIR}")
    mix = p.mix_value()
    import json
    rows = {
        "pipeline": p.file, "mode": ("local" if local else "slurm") + (" (dry run)" if dry_run else ""),
        "site": p.SITE or "none", "source": source, "dataset": p.DATASET_DIR,
        "prep tasks": f"{p.PREP_TASKS} x {p.PREP_WORKERS} worker(s)" + (
            f", finalize {finalize} task(s)" if finalize else ""),
        "recipe": p.TRAIN_RECIPE,
        "train data": json.dumps(mix, ensure_ascii=False) if mix else p.DATASET_DIR,
        "overrides": " ".join(f"--set {o}" for o in p.TRAIN_OVERRIDES), "run": p.RUN_DIR,
        "processes": f"{p.NODES} node(s) x {p.GPUS_PER_NODE}",
        "hellaswag": f"{p.HELLASWAG}" + (f" (first {p.EVAL_LIMIT} docs)" if p.EVAL_LIMIT else ""),
        "eval mode": p.EVAL_MODE + (" (scored in turn: --local submits no jobs)"
                                    if local and p.EVAL_MODE == "jobs" else ""),
        "logs": p.log_dir,
    }
    print(cli.table(rows))


def plan(p: Pipeline, local: bool, dry_run: bool) -> list[Stage]:
    checks.check_inputs(p, slurm=not local, dry_run=dry_run)
    checks.check_mix(p)
    recipe = checks.check_recipe(p)
    checks.check_resume(p, recipe)
    planned = stages(p, prep_needed=not checks.dataset_ready(p))
    show_config(p, local, dry_run, planned)
    print(f"stages: {' '.join(s.name for s in planned)}", flush=True)
    return planned


def run_local(p: Pipeline, planned: list[Stage]) -> int:
    """Each stage in turn, here; an array's tasks one after another (a 1-task finalize array runs as the plain
    command). A stage's output goes to the terminal and is appended to LOG_DIR/STAGE-local.out after a header line,
    so a second run keeps the first one's log (and its traceback)."""
    p.log_dir.mkdir(parents=True, exist_ok=True)
    times = []
    for i, stage in enumerate(planned):
        started = time.monotonic()
        log = p.log_dir / f"{stage.name}-local.out"
        tasks = stage.array if stage.name == "prep_tokenize" or (stage.array or 1) > 1 else 0
        with open(log, "ab") as tee:
            tee.write(f"==== submit.sh --local {p.file} at {now()} ====\n".encode())
            status = 0
            for task in range(tasks) or [None]:
                os.environ["STAGE_LOG"] = str(log)
                if task is None:
                    os.environ.pop("TASK_INDEX", None)
                    os.environ.pop("TASK_COUNT", None)
                else:
                    os.environ.update(TASK_INDEX=str(task), TASK_COUNT=str(tasks))
                status = run_stage(p, stage.name, [], tee=tee)
                if status != 0:
                    break
        if status != 0:
            print(f"error: stage {stage.name} failed (exit {status}); log: {log}", file=sys.stderr)
            rest = [s.name for s in planned[i + 1:]]
            if rest:
                print(f"not run: {' '.join(rest)}", file=sys.stderr)
            return 1
        times.append((stage.name, elapsed(time.monotonic() - started)))
    print(cli.table([("stage", "time"), *times]))
    print(f"pipeline finished: dataset {p.DATASET_DIR}, run {p.RUN_DIR}")
    print(f"report: {p.RUN_DIR}/eval/report.md")
    return 0


def submit_chain(p: Pipeline, planned: list[Stage], dry_run: bool) -> int:
    """One sbatch per stage, each waiting for the one before; rolled back (scancel) if an sbatch fails."""
    job_pipeline = p.file
    if not dry_run:
        # Jobs read the pipeline file when they start, hours later perhaps: give them a copy of it as submitted,
        # so editing the file for the next run cannot change a chain already in the queue.
        p.log_dir.mkdir(parents=True, exist_ok=True)
        job_pipeline = p.log_dir / f"pipeline-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.env"
        files.write_bytes(job_pipeline, p.file.read_bytes())
    if p.EVAL_MODE == "jobs" and dry_run:
        print(f"eval jobs (EVAL_MODE=jobs; eval_watch submits one per complete checkpoint): "
              f"{show_cmd(sbatch_argv(p, eval_stage(p), job_pipeline))} TAG")
    job: dict[str, str] = {}
    submitted: list[str] = []
    previous = None
    for stage in planned:
        dependency, export, waits = None, None, "nothing"
        if stage.name == "eval_watch":   # starts once training has started; cancelled with training if prep fails
            prep = "prep_finalize" in job
            dependency = f"after:{job['train']}" + (f",afterok:{job['prep_finalize']}" if prep else "")
            waits = "train to start" + (", prep_finalize to succeed" if prep else "")
            export = f"ALL,TRAIN_JOB_ID={job['train']}"
        elif previous:
            dependency, waits = f"afterok:{job[previous]}", f"{previous} to succeed"
        argv = sbatch_argv(p, stage, job_pipeline, dependency, export)
        if dry_run:
            job[stage.name] = f"<{stage.name}>"
            print(show_cmd(argv))
        else:
            done = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
            lines = done.stdout.strip().splitlines()
            if done.returncode != 0 or not lines:
                if submitted:
                    subprocess.run(["scancel", *submitted])
                raise SubmitError(f"sbatch failed for {stage.name}; cancelled the jobs already submitted "
                                  f"({' '.join(submitted) or 'none'})")
            job_id = lines[-1].split(";")[0]
            job[stage.name] = job_id
            submitted.append(job_id)
            print(f"{stage.name}: job {job_id} (waits for {waits}); log {p.log_dir}/{stage.name}-{job_id}.out",
                  flush=True)
            files.append_line(p.log_dir / "jobs.txt", f"{stage.name} {job_id}")
        if stage.name != "eval_watch":
            previous = stage.name
    if not dry_run:
        print(f"submitted {len(submitted)} jobs; follow with: squeue -j {','.join(submitted)}")
        print(f"stage outcomes: {p.log_dir}/summary.txt; report when done: {p.RUN_DIR}/eval/report.md")
    return 0


def submit(p: Pipeline, local: bool, dry_run: bool) -> int:
    planned = plan(p, local, dry_run)
    if local and dry_run:
        for stage in planned:
            print(show_cmd(["bash", STAGE_SCRIPT, stage.name, p.file]))
        return 0
    if local:
        return run_local(p, planned)
    return submit_chain(p, planned, dry_run)
