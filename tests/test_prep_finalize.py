"""prep finalize as an array: any number of tasks gives the single-process bytes, a killed task reruns to the same
bytes, unit token files go as soon as every shard reading them is done, and the last step resumes."""
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from prep.__main__ import main as prep_main
from prep.finalize import open_work
from tests.conftest import PYTHON, REPO
from tests.fixtures_data import REFERENCE_RECIPE, tree_bytes
from tests.test_prep_safety import assert_loser, finish, holder_of, start_prep

# sha256 of the concatenated sha256s (manifest order) of the shards that the single-process finalize wrote for
# REFERENCE_RECIPE on the fineweb_parquet fixture before finalize was split into array tasks.
SINGLE_PROCESS_SHARDS_SHA256 = "a1a3911726fb7bd3172200214c9f4906be79fe35a19365896afd94b9130ea8b4"


def units_only(src: Path, out: Path, *recipe) -> Path:
    """Tokenize as a one-task array: every unit committed under .work/, nothing finalized."""
    assert prep_main(["tokenize", "--input", str(src), "--out", str(out), *map(str, recipe),
                      "--task-index", "0", "--task-count", "1"]) == 0
    return out


def copy_of(work: Path, dest: Path) -> Path:
    shutil.copytree(work, dest)
    return dest


def finalize_task(out: Path, i: int, n: int) -> int:
    return prep_main(["finalize", "--out", str(out), "--task-index", str(i), "--task-count", str(n)])


def outside_work(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name != ".work")


def assert_units_kept_exactly_while_needed(out: Path, killed: bool = False) -> None:
    """A unit's token file exists exactly when a train shard reading it is not done yet. After a kill, a unit
    no shard needs may still be there (killed between a shard's done mark and the removal), never the reverse."""
    work = open_work(out)
    for u, unit in enumerate(work.units):
        needed = not all(work.shard_done(work.layout.shard_name("train", k)) for k in work.layout.readers(u))
        exists = (out / ".work" / "units" / f"u{unit.index:06d}.bin").exists()
        assert exists if needed else (killed or not exists), (u, needed, exists)


@pytest.fixture(scope="module")
def reference_units(tmp_path_factory, fineweb_parquet) -> Path:
    return units_only(fineweb_parquet, tmp_path_factory.mktemp("units") / "ds", *REFERENCE_RECIPE)


def test_any_number_of_tasks_gives_the_single_process_bytes(tmp_path, reference_units, parquet_reference):
    plain = copy_of(reference_units, tmp_path / "plain")
    assert prep_main(["finalize", "--out", str(plain)]) == 0
    assert tree_bytes(plain) == parquet_reference
    manifest = json.loads((plain / "manifest.json").read_text())
    joined = "".join(s["sha256"] for s in manifest["shards"])
    assert hashlib.sha256(joined.encode()).hexdigest() == SINGLE_PROCESS_SHARDS_SHA256
    for n, order in ((1, [0]), (2, [1, 0]), (3, [2, 0, 1])):
        out = copy_of(reference_units, tmp_path / f"tasks{n}")
        for step, i in enumerate(order):
            assert finalize_task(out, i, n) == 0
            if step < n - 1:  # not the last: no manifest, no shard outside .work/ yet, spent units gone
                assert outside_work(out) == []
                assert_units_kept_exactly_while_needed(out)
        assert tree_bytes(out) == parquet_reference, n


def test_units_without_train_tokens_and_more_tasks_than_shards(tmp_path, shakespeare_docs):
    """One-document .txt units, a third of the tokens held out: some units are validation only."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for i, d in enumerate(shakespeare_docs[:120]):
        (raw / f"{i:04d}.txt").write_text(d)
    units = units_only(raw, tmp_path / "units", "--shard-tokens", 900, "--val-tokens", 1500)
    layout = open_work(units).layout
    train_per_unit = np.bincount(layout.split_runs["train"][:, 0], minlength=len(layout.unit_tokens))
    assert (train_per_unit == 0).sum() > 5 and layout.n_shards["train"] >= 3
    plain = copy_of(units, tmp_path / "plain")
    assert prep_main(["finalize", "--out", str(plain)]) == 0
    many = layout.n_shards["train"] + 3
    out = copy_of(units, tmp_path / "many")
    for i in reversed(range(many)):
        assert finalize_task(out, i, many) == 0
    assert tree_bytes(out) == tree_bytes(plain)
    assert prep_main(["verify", str(out)]) == 0


def start_task(out: Path, i: int, n: int) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "prep", "finalize", "--out", str(out), "--task-index", str(i),
                             "--task-count", str(n)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def test_sigkill_a_task_mid_way_then_rerun_gives_the_same_bytes(tmp_path, fineweb_parquet):
    recipe = ["--shard-tokens", 2000, "--val-tokens", 15000, "--unit-bytes", 1]  # ~80 train shards per task
    units = units_only(fineweb_parquet, tmp_path / "units", *recipe)
    plain = copy_of(units, tmp_path / "plain")
    assert prep_main(["finalize", "--out", str(plain)]) == 0
    out = copy_of(units, tmp_path / "ds")
    shards = out / ".work" / "shards"
    marks = lambda: len(list(shards.glob("train_*.json"))) if shards.exists() else 0  # noqa: E731
    seed = random.randrange(1 << 30)
    target = random.Random(seed).randrange(1, 20)
    proc = start_task(out, 0, 2)
    while marks() < target and proc.poll() is None:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = marks()
    mine = len(open_work(out).layout.task_shards(0, 2))
    assert 0 < done_at_kill < mine, f"seed {seed}: the kill landed at {done_at_kill} of {mine} shards"
    assert outside_work(out) == []
    assert_units_kept_exactly_while_needed(out, killed=True)  # done shards' units may be gone, not others'
    assert finalize_task(out, 1, 2) == 0  # the other task; task 0 is still unfinished, so no manifest
    assert outside_work(out) == []
    assert finalize_task(out, 0, 2) == 0  # the rerun skips its done shards, writes the rest, completes
    assert tree_bytes(out) == tree_bytes(plain), f"seed {seed}, killed after {done_at_kill} shards"


def test_last_step_resumes_after_a_kill_between_moving_shards_and_the_manifest(tmp_path, reference_units,
                                                                               parquet_reference):
    out = copy_of(reference_units, tmp_path / "ds")
    # Hold the dataset lock shared, as a still-running task would: the last task finishes its shards, then
    # waits for the exclusive lock, and is killed there.
    holder = subprocess.Popen([PYTHON, "-c", "import sys, time; from prep.workdir import dataset_lock\n"
                               "with dataset_lock(sys.argv[1], wait=False, shared=True):\n"
                               "    print('held', flush=True); time.sleep(600)", str(out)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    try:
        assert finalize_task(out, 0, 2) == 0
        last = start_task(out, 1, 2)
        work = open_work(out)
        while work.missing_train_shards():
            assert last.poll() is None, last.communicate()
            time.sleep(0.01)
        time.sleep(0.5)
        assert last.poll() is None  # waiting for the lock, every train shard done
        last.kill()
        last.wait()
    finally:
        holder.kill()
        holder.wait()
    assert outside_work(out) == [] and not any((out / ".work" / "units").glob("*.bin"))  # only shards hold data
    for name in ("train_000000.bin", "train_000003.bin"):  # what a last step killed while moving shards leaves
        os.replace(out / ".work" / "shards" / name, out / name)
    assert prep_main(["finalize", "--out", str(out)]) == 0
    assert tree_bytes(out) == parquet_reference


@pytest.mark.parametrize("tasks", [None, (0, 2)])
def test_a_rerun_after_a_kill_half_way_through_removing_work_finishes_the_cleanup(tmp_path, reference_units,
                                                                                  parquet_reference, tasks):
    out = copy_of(reference_units, tmp_path / "ds")
    units = copy_of(out / ".work" / "units", tmp_path / "units")
    assert prep_main(["finalize", "--out", str(out)]) == 0
    # What a last step killed inside remove_work_dir leaves: the manifest, .work/'s own files gone, units/ not yet.
    (out / ".work").mkdir()
    shutil.copytree(units, out / ".work" / "units")
    rc = prep_main(["finalize", "--out", str(out)]) if tasks is None else finalize_task(out, *tasks)
    assert rc == 0
    assert tree_bytes(out) == parquet_reference and not (out / ".work").exists()


def test_task_flags_and_locks(tmp_path, reference_units, parquet_reference, capsys):
    out = copy_of(reference_units, tmp_path / "ds")
    assert prep_main(["finalize", "--out", str(out), "--task-index", "0"]) == 2
    assert "--task-index and --task-count go together" in capsys.readouterr().err
    assert finalize_task(out, 2, 2) == 2
    assert "--task-index 2 is outside 0..1" in capsys.readouterr().err
    open_work(out)  # the layout is built and cached: the task stopped below holds no lock but its own and ours
    first = start_prep("finalize", "--out", out, "--task-index", 0, "--task-count", 2)
    holder_of(out / ".work" / "finalize-task-0-of-2.lock", [first])
    os.kill(first.pid, signal.SIGSTOP)
    try:
        assert not list((out / ".work" / "shards").glob("train_*.json"))  # stopped before its first shard
        second = start_prep("finalize", "--out", out, "--task-index", 0, "--task-count", 2)
        assert_loser(*finish(second), first, f"finalize-task 0/2 of {out}")  # a second copy of task 0
        assert finalize_task(out, 1, 2) == 0  # the other task runs beside it
        rc, err = finish(start_prep("finalize", "--out", out))
        assert rc == 1 and f"error: {out} is in use by running tokenize array task(s) or finalize array task(s)" \
            in err, err
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert finish(first)[0] == 0  # the last task to finish writes the manifest
    assert tree_bytes(out) == parquet_reference
    assert finalize_task(out, 1, 2) == 0  # a requeued task after the end: nothing to do
    assert "already finalized; nothing to do" in capsys.readouterr().err


def test_a_damaged_unit_index_or_a_marker_that_is_not_an_object_is_named(tmp_path, reference_units, capsys):
    out = copy_of(reference_units, tmp_path / "ds")
    index, marker = out / ".work" / "units" / "u000001.idx.npy", out / ".work" / "units" / "u000001.json"
    index.write_bytes(index.read_bytes()[:100])  # cut inside the .npy header, as a failed copy would
    assert prep_main(["finalize", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"error: {index}: damaged (EOF: reading array header, expected 118 bytes got 90); "
                                    f"delete {marker} and rerun tokenize to redo the unit"), err
    np.save(index, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # never unpickled
    assert prep_main(["finalize", "--out", str(out)]) == 1
    assert f"error: {index}: damaged (Array can't be memory-mapped: Python objects in dtype)" in capsys.readouterr().err
    marker.write_text("[]")
    assert prep_main(["finalize", "--out", str(out)]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (f"error: {marker}: not a JSON object; a damaged done marker: "
                                                        f"it was written atomically, so something else changed it")
    assert outside_work(out) == []


def test_validation_taking_every_document_is_refused(tmp_path, shakespeare_docs, capsys):
    """Whole documents: asking for all tokens but one makes the holdout take every document, leaving no train."""
    from common import tokenizer
    from tests.fixtures_data import write_jsonl
    docs = shakespeare_docs[:5]
    total = sum(len(tokenizer.get_encoding().encode_ordinary(d)) + 1 for d in docs)
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    assert prep_main(["tokenize", "--input", str(src), "--out", str(tmp_path / "ds"),
                      "--val-tokens", str(total - 1)]) == 1
    err = capsys.readouterr().err
    assert f"error: --val-tokens {total - 1:,} leaves no training data: the validation documents hold all " \
           f"{total:,} tokens" in err, err
    assert outside_work(tmp_path / "ds") == []


def slurm_dry_run(tmp_path: Path, **values) -> subprocess.CompletedProcess:
    from tests.conftest import SHARED
    from tests.slurm_cluster import write_env_file
    site = write_env_file(tmp_path / "site.env", {"SITE_PARTITION": "cpu", "SITE_GPUS_PER_NODE": 0,
                                                  "SITE_CPUS_PER_NODE": 4, "SITE_SIGNAL_SECONDS": 60})
    pipeline = write_env_file(tmp_path / "p.env", {
        "SITE": site, "PREP_SOURCE": "fineweb-edu", "RAW_DIR": tmp_path / "raw", "DATASET_DIR": tmp_path / "ds",
        "TRAIN_RECIPE": REPO / "configs" / "train" / "tiny-cpu.yaml", "RUN_DIR": tmp_path / "run",
        "HELLASWAG": SHARED / "data" / "hellaswag_val.jsonl", **values})
    return subprocess.run([str(REPO / "slurm" / "submit.sh"), str(pipeline), "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, env=dict(os.environ, PYTHON=PYTHON))


@pytest.mark.parametrize("values, array", [
    ({"PREP_SAMPLE": "10BT"}, "0-6"),                            # 100 shards of 100M: one task per 16
    ({"PREP_SAMPLE": "350BT"}, "0-63"),                          # 3,500 shards: capped at FINALIZE_TASKS (64)
    ({"PREP_SAMPLE": "350BT", "FINALIZE_TASKS": 8}, "0-7"),
    ({"PREP_SAMPLE": "10BT", "PREP_SHARD_TOKENS": 10**9}, "0-0"),  # 10 shards: one task
])
def test_submit_sizes_the_finalize_array_to_the_dataset(tmp_path, values, array):
    done = slurm_dry_run(tmp_path, **values)
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if "stage.sbatch prep_finalize " in line)
    assert f"--array={array}" in line.split() and "--output=" in line and "prep_finalize-%A_%a.out" in line
    assert f"finalize {int(array.split('-')[1]) + 1} task(s)" in done.stdout


def test_submit_sizes_the_finalize_array_of_local_inputs_by_their_bytes(tmp_path):
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "docs.jsonl", "wb") as f:
        f.truncate(6_300_000)  # ~3.15M tokens at 2 bytes a token: 32 shards of 100k, two tasks of 16
    done = slurm_dry_run(tmp_path, PREP_SOURCE="local", PREP_INPUT=tmp_path / "in", PREP_SHARD_TOKENS=100_000)
    assert done.returncode == 0, done.stderr
    assert "--array=0-1" in next(line for line in done.stdout.splitlines() if "stage.sbatch prep_finalize " in line)


def test_submit_refuses_a_finalize_task_count_that_is_not_a_count(tmp_path):
    done = slurm_dry_run(tmp_path, PREP_SAMPLE="10BT", FINALIZE_TASKS=0)
    assert done.returncode == 1 and done.stderr.startswith(f"error: {tmp_path / 'p.env'} line ")
    assert done.stderr.endswith(": FINALIZE_TASKS must be a positive whole number, got '0'\n"), done.stderr


def test_the_finalize_script_runs_a_task_and_only_the_completing_task_verifies(tmp_path, reference_units,
                                                                               parquet_reference):
    from tests.conftest import SHARED
    from tests.slurm_cluster import write_env_file
    out = copy_of(reference_units, tmp_path / "ds")
    pipeline = write_env_file(tmp_path / "p.env", {
        "PREP_SOURCE": "local", "PREP_INPUT": tmp_path, "DATASET_DIR": out, "RUN_DIR": tmp_path / "run",
        "TRAIN_RECIPE": REPO / "configs" / "train" / "tiny-cpu.yaml",
        "HELLASWAG": SHARED / "data" / "hellaswag_val.jsonl"})

    def task(i):
        return subprocess.run(["bash", str(REPO / "slurm" / "stage.sbatch"), "prep_finalize", str(pipeline)], cwd=REPO,
                              capture_output=True, text=True,
                              env=dict(os.environ, PYTHON=PYTHON, TASK_INDEX=str(i), TASK_COUNT="2"))
    first = task(1)
    assert first.returncode == 0, first.stderr
    assert "finalize task 1/2: 3 train shard(s) written" in first.stderr and "ok:" not in first.stdout
    last = task(0)
    assert last.returncode == 0, last.stderr
    assert f"finalized {out}" in last.stderr and "ok: 7 shard(s)" in last.stdout  # verified by the last task
    late = task(1)  # requeued after the end: nothing to do, nothing verified again
    assert late.returncode == 0 and "already finalized" in late.stderr and "ok:" not in late.stdout
    assert tree_bytes(out) == parquet_reference
    summary = (tmp_path / "run" / "logs" / "summary.txt").read_text().split("\n")
    assert [line.split()[1:4] for line in summary if line] == [["prep_finalize", "local-1", "ok"],
                                                               ["prep_finalize", "local-0", "ok"],
                                                               ["prep_finalize", "local-1", "ok"]]
