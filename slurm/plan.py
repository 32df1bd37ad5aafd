"""The pipeline as a list of stages: what each one runs, and what it asks Slurm for.

download -> tokenize (array) -> finalize (array) -> train (multi-node) -> eval watcher; the eval stage is one
checkpoint's eval job, which the watcher submits (EVAL_MODE=jobs). Every stage runs as
`slurm/stage.sbatch STAGE PIPELINE.env` (slurm.stage), under sbatch or, with --local, one after another here.
"""
from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .config import Pipeline

SLURM_DIR = Path(__file__).resolve().parent
STAGE_SCRIPT = SLURM_DIR / "stage.sbatch"
PREP_STAGES = ("prep_download", "prep_tokenize", "prep_finalize")
# The stages that need no GPU: they go to the site's CPU partition (SITE_CPU_PARTITION, default SITE_PARTITION).
CPU_STAGES = (*PREP_STAGES, "eval_watch")
# One finalize task per this many train shards of the dataset to come: a task copies a 100M-token shard in a few
# seconds (docs/benchmarks.md), so 16 of them keep its start-up a small part of its time.
FINALIZE_SHARDS_PER_TASK = 16


@dataclass(frozen=True)
class Stage:
    name: str
    resources: tuple[str, ...]   # sbatch flags: nodes, tasks, CPUs, GPUs, time limit
    array: int | None = None     # array tasks (tokenize, finalize)


def prep_tokenize_default(flag: str) -> int:
    """A default of `prep tokenize` (--shard-tokens, --val-tokens), read from its own parser."""
    import argparse

    import prep.__main__ as prep_cli
    sub = argparse.ArgumentParser().add_subparsers()
    prep_cli._add_tokenize(sub)
    return sub.choices["tokenize"].get_default(flag.lstrip("-").replace("-", "_"))


def finalize_tasks(p: Pipeline) -> int:
    """The finalize array's size: one task per FINALIZE_SHARDS_PER_TASK train shards, at most FINALIZE_TASKS. The
    dataset does not exist yet, so its size is a guess: a Hub sample by its name (10BT: 1e10 tokens), local inputs
    at one token per 2 bytes on disk. A wrong guess costs only balance: an extra task finds no shard and exits."""
    if p.PREP_SOURCE == "local":
        tokens = sum(_disk_bytes(path) for path in p.tokenize_inputs()) // 2
    elif re.fullmatch(r"[0-9]+BT", p.PREP_SAMPLE):
        tokens = int(p.PREP_SAMPLE[:-2]) * 1_000_000_000
    else:
        return p.FINALIZE_TASKS
    shard_tokens = p.PREP_SHARD_TOKENS or prep_tokenize_default("--shard-tokens")
    shards = math.ceil(tokens / shard_tokens)
    return min(max(math.ceil(shards / FINALIZE_SHARDS_PER_TASK), 1), p.FINALIZE_TASKS)


def _disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum((Path(d) / f).stat().st_size for d, _, names in os.walk(path, followlinks=True) for f in names)


def stages(p: Pipeline, prep_needed: bool) -> list[Stage]:
    s = p.site
    gpu = [] if s.SITE_GPUS_PER_NODE == 0 else [f"--gpus-per-node={s.SITE_GPU_GRES}:{{n}}"]
    one_task = ("--nodes=1", "--ntasks=1")
    out = []
    if prep_needed:
        if p.PREP_SOURCE != "local":
            out.append(Stage("prep_download", (*one_task, "--cpus-per-task=1", f"--time={s.SITE_TIME_PREP}")))
        per_task = (*one_task, f"--cpus-per-task={p.PREP_WORKERS}", f"--time={s.SITE_TIME_PREP}")
        out.append(Stage("prep_tokenize", per_task, p.PREP_TASKS))
        # PREP_WORKERS CPUs, as a tokenize task: finalizing a share takes one, but the task that completes the
        # dataset then verifies all of it with a process per CPU it was given.
        out.append(Stage("prep_finalize", per_task, finalize_tasks(p)))
    cpus = max((s.SITE_CPUS_PER_NODE or 1) // p.GPUS_PER_NODE, 1)
    out.append(Stage("train", (f"--nodes={p.NODES}", f"--ntasks-per-node={p.GPUS_PER_NODE}", f"--cpus-per-task={cpus}",
                               f"--time={s.SITE_TIME_TRAIN}", f"--signal=USR1@{s.SITE_SIGNAL_SECONDS}", "--requeue",
                               "--open-mode=append", *(g.format(n=p.GPUS_PER_NODE) for g in gpu))))
    if p.EVAL_MODE == "jobs":   # the watcher only submits: no GPU
        out.append(Stage("eval_watch", (*one_task, "--cpus-per-task=1", f"--time={s.SITE_TIME_EVAL}")))
    else:
        out.append(Stage("eval_watch", (*one_task, f"--cpus-per-task={s.SITE_EVAL_CPUS}", f"--time={s.SITE_TIME_EVAL}",
                                        *(g.format(n=1) for g in gpu))))
    return out


def eval_stage(p: Pipeline) -> Stage:
    """One checkpoint's eval job (EVAL_MODE=jobs), submitted by the watcher."""
    s = p.site
    gpu = [] if s.SITE_GPUS_PER_NODE == 0 else [f"--gpus-per-node={s.SITE_GPU_GRES}:1"]
    return Stage("eval", ("--nodes=1", "--ntasks=1", f"--cpus-per-task={s.SITE_EVAL_CPUS}",
                          f"--time={s.SITE_TIME_EVAL_JOB}", *gpu))


def sbatch_argv(p: Pipeline, stage: Stage, job_pipeline: Path, dependency: str | None = None,
                export: str | None = None) -> list[str]:
    """The sbatch command of a stage: site flags (its partition and account by whether it needs a GPU), name,
    log, array, resources, dependency, then the stage script."""
    s = p.site
    cpu_only = stage.name in CPU_STAGES and not (stage.name == "eval_watch" and p.EVAL_MODE == "watch")
    partition, account = (s.cpu_partition(), s.cpu_account()) if cpu_only else (s.SITE_PARTITION, s.SITE_ACCOUNT)
    argv = ["sbatch", "--parsable", f"--chdir={os.getcwd()}", "--kill-on-invalid-dep=yes"]
    argv += [f"--partition={partition}"] if partition else []
    argv += [f"--account={account}"] if account else []
    argv += [f"--qos={s.SITE_QOS}"] if s.SITE_QOS else []
    argv += [*s.SITE_SBATCH_EXTRA, f"--job-name={stage.name}"]
    if stage.array is None:
        argv += [f"--output={p.log_dir}/{stage.name}-%j.out"]
    else:
        argv += [f"--output={p.log_dir}/{stage.name}-%A_%a.out", f"--array=0-{stage.array - 1}"]
    argv += list(stage.resources)
    argv += [f"--dependency={dependency}"] if dependency else []
    argv += [f"--export={export}"] if export else []
    return argv + [str(STAGE_SCRIPT), stage.name, str(job_pipeline)]


def shell_quote(word: str) -> str:
    """A word as bash's `printf %q` writes it (backslashes, so it can be pasted back into a shell)."""
    if word == "":
        return "''"
    if any(ord(c) < 32 or ord(c) == 127 for c in word):
        import shlex
        return shlex.quote(word)
    out = []
    for i, c in enumerate(word):
        if c in " !\"$&'()*,;<>?[\\]^`{|}" or (i == 0 and c in "#~"):
            out.append("\\")
        out.append(c)
    return "".join(out)


def show_cmd(argv) -> str:
    return " ".join(shell_quote(str(a)) for a in argv)


def sbatch_found() -> bool:
    return shutil.which("sbatch") is not None
