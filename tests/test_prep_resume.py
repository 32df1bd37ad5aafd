"""SIGKILL at random moments of a real multi-worker `prep tokenize`, rerun, and get the uninterrupted run's bytes."""
import os
import random
import signal
import subprocess
import time

from tests.conftest import PYTHON, REPO
from tests.fixtures_data import REFERENCE_RECIPE, tree_bytes


def start_tokenize(src, out):
    return subprocess.Popen([PYTHON, "-m", "prep", "tokenize", "--input", str(src), "--out", str(out),
                             "--workers", "2", *REFERENCE_RECIPE], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition() and proc.poll() is None:
        assert time.monotonic() < deadline, "tokenize made no progress"
        time.sleep(0.005)


def kill_group(proc):
    """What Slurm does to a preempted or timed-out task: SIGKILL to every process, workers included."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the run ended before the kill
        pass
    proc.wait()


def test_sigkill_at_random_points_then_rerun_is_byte_identical(tmp_path, fineweb_parquet, parquet_reference):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    out = tmp_path / "ds"
    units = out / ".work" / "units"
    kills = []
    markers = lambda: len(list(units.glob("u*.json"))) if units.exists() else 0  # noqa: E731
    # Random points chosen by progress, not by clock, so they land mid-run on a fast or a loaded machine alike:
    # once k1 units are committed plus a few ms (other units are then half-written), once k2 more are, and the
    # moment the first shard file appears (finalize writes them under .work/shards/ until its last step).
    k1 = rng.randrange(0, 8)
    k2 = k1 + rng.randrange(1, 6)
    plans = [(lambda: markers() >= k1 and units.exists(), rng.uniform(0, 0.05)),
             (lambda: markers() >= k2, rng.uniform(0, 0.05)),
             (lambda: any(p.name.startswith((".train_", "train_")) for p in (out / ".work" / "shards").glob("*")),
              0.0)]
    for condition, delay in plans:
        proc = start_tokenize(fineweb_parquet, out)
        wait_for(condition, proc)
        time.sleep(delay)
        finished = proc.poll() is not None
        kill_group(proc)
        kills.append((finished, markers()))
    print(f"seed {seed}: kills (finished?, units done) {kills}")
    assert not all(finished for finished, _ in kills), f"seed {seed}: no kill landed before the end: {kills}"
    proc = start_tokenize(fineweb_parquet, out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert tree_bytes(out) == parquet_reference, f"seed {seed}, kills (finished?, units done): {kills}"


def test_a_parent_killed_alone_leaves_no_worker_holding_the_dataset(tmp_path, fineweb_parquet, parquet_reference):
    """`kill -9 PID` or the OOM killer picking the parent: its pool workers must not live on holding .work/lock,
    which refused every rerun for ever, naming the dead parent."""
    out = tmp_path / "ds"
    units = out / ".work" / "units"
    proc = start_tokenize(fineweb_parquet, out)
    try:
        wait_for(lambda: units.exists() and len(list(units.glob("u*.json"))) >= 1, proc)
        assert proc.poll() is None, "tokenize ended before the kill"
        proc.kill()  # the parent only, not its group
        proc.wait()
        rerun = subprocess.run([PYTHON, "-m", "prep", "tokenize", "--input", str(fineweb_parquet), "--out", str(out),
                                "--workers", "2", *REFERENCE_RECIPE], cwd=REPO, capture_output=True, text=True,
                               timeout=300)
        assert rerun.returncode == 0, rerun.stderr
        assert tree_bytes(out) == parquet_reference
    finally:
        kill_group(proc)  # workers of an unfixed tokenize would outlive the test
