"""SIGKILL or Ctrl-C at moments of a real multi-worker `prep tokenize`, rerun, and get the uninterrupted run's bytes."""
import os
import random
import signal
import subprocess
import time

import psutil
import pytest

from tests.conftest import PYTHON, REPO
from tests.fixtures_data import REFERENCE_RECIPE, tree_bytes, write_fineweb_parquet


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


# 4 units of 6 x Tiny Shakespeare each (about 2M tokens, seconds to tokenize): units 2 and 3 are still running when
# units 0 and 1 are done.
SLOW_UNITS = ["--workers", "2", "--unit-bytes", "1", "--shard-tokens", "1000000", "--val-tokens", "100000"]


@pytest.fixture(scope="module")
def slow_units(tmp_path_factory, shakespeare_docs):
    """The input, and the bytes of its uninterrupted dataset."""
    root = tmp_path_factory.mktemp("slow_units")
    src = write_fineweb_parquet(root / "big.parquet", shakespeare_docs * 24, 6 * len(shakespeare_docs))
    subprocess.run([PYTHON, "-m", "prep", "tokenize", "--input", str(src), "--out", str(root / "ds"), *SLOW_UNITS],
                   cwd=REPO, check=True, capture_output=True, timeout=600)
    return src, tree_bytes(root / "ds")


def test_ctrl_c_ends_the_workers_at_once_and_the_rerun_skips_the_units_done(tmp_path, slow_units):
    """Ctrl-C (SIGINT to the process group) while units 2 and 3 run, 0 and 1 done: exit 130 within seconds (not
    once the running units are done: they take longer), one line, no worker left, DS/.work/lock free; the rerun
    skips the 2 units done and gives the uninterrupted run's bytes. A worker used to be interrupted too, once
    inside a queue's lock, and the parent waited on it for ever."""
    src, reference = slow_units
    out = tmp_path / "ds"
    units = out / ".work" / "units"
    markers = lambda: len(list(units.glob("u*.json"))) if units.exists() else 0  # noqa: E731
    # The default SIGINT handler, even when the tests themselves run where SIGINT is ignored (a background job).
    proc = subprocess.Popen([PYTHON, "-m", "prep", "tokenize", "--input", str(src), "--out", str(out), *SLOW_UNITS],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(lambda: markers() >= 2, proc, timeout=300)
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert proc.poll() is None and len(workers) == 2, "tokenize ended, or has no 2 workers, before the Ctrl-C"
        for worker in workers:  # the parent alone acts on SIGINT: a worker ignores it
            worker.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None and all(w.is_running() for w in workers), "a SIGINT to the workers stopped them"
        os.killpg(proc.pid, signal.SIGINT)
        sent = time.monotonic()
        out_text, err = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:  # on a failure: the whole session, workers included
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    print(f"{took:.1f}s from Ctrl-C to exit")
    assert proc.returncode == 130 and "Traceback" not in err and not out_text, err
    assert markers() == 2 and took < 5, f"{took:.1f}s from Ctrl-C to exit, {markers()} units done: the running ones " \
                                         f"were waited for, not cut off"
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: interrupted; the units committed so far are kept: rerun the same command to resume (it skips them)"]
    assert not [w.pid for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    rerun = subprocess.run([PYTHON, "-m", "prep", "tokenize", "--input", str(src), "--out", str(out), *SLOW_UNITS],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "skipping 2 unit(s) already done" in rerun.stderr
    assert tree_bytes(out) == reference
