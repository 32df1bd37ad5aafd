"""One writer per run directory, and one that can write (train.writer): two trainings on one run directory, a
requeued job taking over its own lock, a read-only checkpoints directory, a full disk under metrics.jsonl.
Real trainings (CPU, gloo) in real processes; the read-only mount and the small disk are real mounts, made in a
private mount namespace (unshare -rm, which needs no privileges)."""
import os
import shlex
import socket
import subprocess
import sys
import time

import psutil

from tests.conftest import PYTHON, REPO
from tests.fixtures_run import run_train, train_command
from tests.fixtures_run import free_port

QUIET = ["eval.every=0", "sample.every=0", "log.tensorboard=false"]


def last_line(result) -> str:
    return result.stderr.strip().splitlines()[-1]


def wait_for(predicate, timeout=300.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def stop(proc):
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()
    proc.kill()
    proc.communicate(timeout=60)


def test_a_second_training_on_a_running_run_directory_stops_at_start_naming_the_first(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(train_command(run_dir, tiny_dataset, *QUIET, "schedule.max_steps=1000",
                                           "checkpoint.every=0"),
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    try:
        metrics = run_dir / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2)
        config = (run_dir / "config.yaml").read_bytes()
        # The second one under torchrun with 2 ranks: rank 1 stops as rank 0 does, instead of waiting for it.
        second = run_train(train_command(run_dir, tiny_dataset, *QUIET, "optim.max_lr=0.5", nproc=2,
                                         port=free_port()), check_rc=None, timeout=600)
        assert second.returncode != 0
        line = (f"error: {run_dir} is in use by another training: host {socket.gethostname()} pid {first.pid} since ")
        errors = [x for x in second.stderr.splitlines() if x.startswith("error: ")]
        assert len(errors) == 2 and all(x.startswith(line) and f"(lock {run_dir}/train.lock)" in x
                                        for x in errors), second.stderr[-3000:]
        assert first.poll() is None  # the first one trains on, its recipe untouched
        assert (run_dir / "config.yaml").read_bytes() == config
    finally:
        stop(first)


def test_a_requeued_job_takes_over_its_own_lock_and_another_job_does_not(tiny_dataset, tmp_path):
    # The earlier incarnation of job 4242 still holds the lock (Slurm is ending it) until the test lets it go.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [PYTHON, "-c", "import sys; from train.writer import take_lock\n"
                       "with take_lock(sys.argv[1]): print('held', flush=True); sys.stdin.readline()",
         str(run_dir)],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "SLURM_JOB_ID": "4242"})
    try:
        assert holder.stdout.readline() == "held\n"
        other = run_train(train_command(run_dir, tiny_dataset, *QUIET, "schedule.max_steps=1"), check_rc=1,
                          env={**os.environ, "SLURM_JOB_ID": "4243"})
        assert f"pid {holder.pid} since " in last_line(other) and ", Slurm job 4242 (lock " in last_line(other)
        assert not (run_dir / "metrics.jsonl").exists()
        requeued = subprocess.Popen(train_command(run_dir, tiny_dataset, *QUIET, "schedule.max_steps=1"), cwd=REPO,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                    env={**os.environ, "SLURM_JOB_ID": "4242"})
        seen = []
        for line in requeued.stderr:
            seen.append(line)
            if "is held by this job's earlier incarnation" in line:
                break
        assert f"pid {holder.pid} since " in seen[-1], "".join(seen)[-3000:]
        assert not (run_dir / "metrics.jsonl").exists()  # waiting, not training
        holder.communicate("go\n", timeout=60)  # the earlier incarnation ends
        _, err = requeued.communicate(timeout=600)
        assert requeued.returncode == 0, err[-3000:]
        assert "Slurm job 4242" in (run_dir / "train.lock").read_text() and (run_dir / "metrics.jsonl").exists()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.communicate()


def in_namespace(setup: str, cmd: list[str]) -> list[str]:
    """cmd run as root of a private user and mount namespace after the shell commands `setup` (mounts there are
    invisible outside and gone when it ends)."""
    return ["unshare", "-rm", "sh", "-ec", f"{setup}\nexec {shlex.join(map(str, cmd))}"]


def test_a_read_only_checkpoints_directory_stops_before_the_first_update(tiny_dataset, tmp_path):
    # A run of 1 update, resumed for a second one with its checkpoints/ a read-only mount.
    run_dir = tmp_path / "run"
    run_train(train_command(run_dir, tiny_dataset, *QUIET, "schedule.max_steps=1"))
    before = sorted(p.name for p in run_dir.iterdir())
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    ckpts = shlex.quote(str(run_dir / "checkpoints"))
    cmd = in_namespace(f"mount --bind {ckpts} {ckpts}; mount -o remount,bind,ro {ckpts}",
                       train_command(run_dir, tiny_dataset, *QUIET, "schedule.max_steps=2")
                       + ["--allow-change", "schedule.max_steps"])
    result = run_train(cmd, check_rc=1)
    assert last_line(result) == (
        f"error: cannot write in {run_dir}/checkpoints (Read-only file system): the run would lose every update "
        f"until its first checkpoint; make it writable (a read-only mount, a full disk or an exhausted quota), or "
        f"set another run_dir"), result.stderr[-2000:]
    assert sorted(p.name for p in run_dir.iterdir()) == before  # no update, nothing new
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("global")) == [
        "global_step1"]


def test_a_read_only_run_directory_stops_before_the_first_update(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    quoted = shlex.quote(str(run_dir))
    cmd = in_namespace(f"mount --bind {quoted} {quoted}; mount -o remount,bind,ro {quoted}",
                       train_command(run_dir, tiny_dataset, *QUIET, "schedule.max_steps=2"))
    result = run_train(cmd, check_rc=1)
    assert last_line(result).startswith(f"error: cannot write in {run_dir} (Read-only file system): "), \
        result.stderr[-2000:]
    assert list(run_dir.iterdir()) == []


def test_a_full_disk_under_metrics_jsonl_is_one_line_naming_it(tiny_dataset, tmp_path):
    # A 64 KiB filesystem for the run directory, filled but for 4 pages: the start-up probe, train.lock and
    # config.yaml fit, metrics.jsonl fills the last page within a few updates. Checkpoints are only at the end.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    quoted = shlex.quote(str(run_dir))
    setup = (f"mount -t tmpfs -o size=64k tmpfs {quoted}; dd if=/dev/zero of={quoted}/fill bs=4096 2>/dev/null || "
             f"true; truncate -s -16384 {quoted}/fill")
    cmd = in_namespace(setup, train_command(run_dir, tiny_dataset, *QUIET, "schedule.max_steps=60",
                                            "checkpoint.every=0"))
    result = run_train(cmd, check_rc=1)
    assert last_line(result) == f"error: {run_dir}/metrics.jsonl: No space left on device", result.stderr[-2000:]
