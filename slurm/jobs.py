"""What the Slurm controller says about a job: the one reader of `scontrol show job -o`, and the job states.

Used by the eval dispatcher (is a checkpoint's eval job still going?), the eval watcher stage (has training ended
without success?) and the training stage (is Slurm itself ending this run: who requeues?).
"""
from __future__ import annotations

import re
import subprocess

# States in which a job may still run (squeue's long names; REQUEUED and friends come back as PENDING).
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
          "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED"}
# States a job ends in without success: nothing more will come from it.
UNSUCCESSFUL = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                "PREEMPTED"}
FIELD = re.compile(r"(?:^|\s)(\w+)=(\S*)")


def parse_records(text: str) -> list[dict[str, str]]:
    """Each `FIELD=value ...` line with a JobId (`scontrol show job -o`: one per array task; the jobcomp/filetxt
    log: one per job end) as {field: value}. Values of one word only: enough for JobState, Restarts, NumCPUs; a
    path with spaces, such as Command=, is cut at its first space."""
    return [dict(FIELD.findall(line)) for line in text.splitlines() if "JobId=" in line]


def parse_show_job(text: str) -> dict[str, str]:
    """The first record of `scontrol show job -o` output ({} for none)."""
    records = parse_records(text)
    return records[0] if records else {}


def show_job(job_id: str) -> dict[str, str] | None:
    """The job's fields; {} once the controller no longer knows the job; None when it cannot be asked."""
    try:
        done = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return {} if "Invalid job id" in done.stderr else None
    fields = parse_show_job(done.stdout)
    return fields if "JobState" in fields else None


def job_state(job_id: str) -> str | None:
    """The job's JobState; "" once the controller no longer knows the job; None when it cannot be asked."""
    fields = show_job(job_id)
    return None if fields is None else fields.get("JobState", "")
