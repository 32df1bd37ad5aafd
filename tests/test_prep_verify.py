"""prep verify in worker processes: the same first bad shard as one process, prompt stops, flags, dead workers."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from prep import verify
from prep.__main__ import main as prep_main
from prep.reader import Dataset
from prep.shard import HEADER_BYTES, make_header
from tests.conftest import PYTHON, REPO
from tests.fixtures_data import write_jsonl

# Small shards, so Tiny Shakespeare makes 11 train shards and 1 validation shard.
RECIPE = ["--shard-tokens", "30000", "--val-tokens", "20000"]


@pytest.fixture(scope="module")
def docs_jsonl(tmp_path_factory, shakespeare_docs) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("verify_src") / "docs.jsonl",
                       [{"id": f"shakespeare-{i}", "text": d} for i, d in enumerate(shakespeare_docs)])


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory, docs_jsonl) -> Path:
    out = tmp_path_factory.mktemp("verify") / "ds"
    assert prep_main(["tokenize", "--input", str(docs_jsonl), "--out", str(out), *RECIPE]) == 0
    assert len(Dataset(out).shards) == 12
    return out


def copy_of(ds: Path, dest: Path) -> Path:
    shutil.copytree(ds, dest)
    return dest


def flip_byte(shard: Path) -> None:
    """A damaged token: only the sha256 at the end of the shard catches it, after the whole file is read."""
    data = bytearray(shard.read_bytes())
    data[HEADER_BYTES + 501] ^= 0x01
    shard.write_bytes(bytes(data))


def bad_magic(shard: Path) -> None:
    """Caught at the first read of the shard."""
    data = bytearray(shard.read_bytes())
    data[0] ^= 0xFF
    shard.write_bytes(bytes(data))


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def run_verify(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "prep", "verify", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_a_good_dataset_passes_with_two_workers_and_by_default(many_shards, capsys):
    for flags in (["--workers", "2"], []):
        assert prep_main(["verify", str(many_shards), *flags]) == 0
        out = capsys.readouterr().out
        assert out.startswith("ok: 12 shard(s), 330,804 tokens match")


def test_two_bad_shards_workers_name_the_same_first_one_as_one_process(many_shards, tmp_path, capsys):
    ds = copy_of(many_shards, tmp_path / "ds")
    bad_magic(ds / "train_000007.bin")  # the later one fails at once, the earlier one only at its end
    flip_byte(ds / "train_000002.bin")
    lines = {}
    for workers in ("1", "2", "3"):
        assert prep_main(["verify", str(ds), "--workers", workers]) == 1
        lines[workers] = error_lines(capsys.readouterr().err)
    assert lines["1"] == lines["2"] == lines["3"]
    assert len(lines["1"]) == 1 and f"{ds / 'train_000002.bin'}: sha256" in lines["1"][0]


def test_verify_refuses_what_train_would_an_unlisted_shard_or_edited_edges(many_shards, tmp_path, capsys):
    ds = copy_of(many_shards, tmp_path / "extra")
    shutil.copy(ds / "val_000000.bin", ds / "val_000001.bin")
    assert prep_main(["verify", str(ds), "--workers", "1"]) == 1
    captured = capsys.readouterr()
    assert error_lines(captured.err) == [f"error: {ds / 'val_000001.bin'}: a shard that {ds / 'manifest.json'} does "
                                         f"not list; remove it, or prepare the dataset again"]
    assert "ok:" not in captured.out
    ds = copy_of(many_shards, tmp_path / "edges")
    manifest = json.loads((ds / "manifest.json").read_text())
    manifest["shards"][3]["edges_sha256"] = "0" * 64
    (ds / "manifest.json").write_text(json.dumps(manifest))
    assert prep_main(["verify", str(ds), "--workers", "2"]) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and f"{ds / 'train_000003.bin'}: its first and last 4 KiB do not match" in lines[0]


def test_info_on_a_manifest_missing_what_it_shows_is_one_line(many_shards, tmp_path, capsys):
    ds = copy_of(many_shards, tmp_path / "ds")
    manifest = json.loads((ds / "manifest.json").read_text())
    manifest["source"], manifest["input_stats"] = [1], None
    (ds / "manifest.json").write_text(json.dumps(manifest))
    assert prep_main(["info", str(ds)]) == 1
    assert error_lines(capsys.readouterr().err) == [
        f"error: {ds / 'manifest.json'}: malformed manifest (AttributeError: 'list' object has no attribute 'items')"]


HUGE = (1 << 31) - 1  # the most tokens a header can count: 4 GB, about 15 s to read whole on the 2-core VM


def make_huge(ds: Path, index: int) -> None:
    """Shard `index` becomes a sparse shard of HUGE tokens (valid header, zeros, no disk used) in the manifest."""
    shard = ds / f"train_{index:06d}.bin"
    with open(shard, "wb") as f:
        f.write(make_header(HUGE))
        f.truncate(HEADER_BYTES + 2 * HUGE)
    manifest = json.loads((ds / "manifest.json").read_text())
    entry = manifest["shards"][index]
    manifest["totals"][entry["split"]]["tokens"] += HUGE - entry["tokens"]
    entry.update(tokens=HUGE, bytes=HEADER_BYTES + 2 * HUGE)  # a manifest that agrees with itself
    (ds / "manifest.json").write_text(json.dumps(manifest))


def test_the_earlier_bad_shard_is_named_though_it_fails_after_a_later_one(many_shards, tmp_path):
    """Shard 1 is huge with a token id out of range 128M tokens in: its worker finds it a second or more after the
    other worker has found train_000005.bin bad, so the earlier shard is the last to fail."""
    ds = copy_of(many_shards, tmp_path / "ds")
    bad_magic(ds / "train_000005.bin")
    make_huge(ds, 1)
    with open(ds / "train_000001.bin", "r+b") as f:
        f.seek(HEADER_BYTES + 2 * 8 * verify.CHUNK_TOKENS)
        f.write(b"\xff\xff")
    done = run_verify(ds, "--workers", "2")
    assert done.returncode == 1, done.stderr
    lines = error_lines(done.stderr)
    assert lines == [f"error: {ds / 'train_000001.bin'}: token id 65535 >= n_vocab 50257"], done.stderr


def test_a_bad_shard_stops_a_later_shard_being_read(many_shards, tmp_path):
    """The huge train_000001.bin starts beside the bad train_000000.bin and must stop within a few of its 128
    chunks once that one fails, not read on to its end."""
    ds = copy_of(many_shards, tmp_path / "ds")
    bad_magic(ds / "train_000000.bin")
    make_huge(ds, 1)
    counted = []
    with pytest.raises(verify.ShardError, match="train_000000.bin: bad magic"):
        verify.check_in_pool(Dataset(ds), 2, counted.append)
    assert sum(counted) < HUGE // 2, f"{sum(counted):,} of {HUGE:,} tokens of the later shard read"


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_bad_workers_values_are_usage_errors(many_shards, value, capsys):
    assert prep_main(["verify", str(many_shards), "--workers", value]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "--workers" in err


# Counts the processes `python -m prep ...` forks, by a hook run before every fork.
FORK_PROBE = """
import os, sys
forks = []
os.register_at_fork(before=lambda: forks.append(1))
from prep.__main__ import main
status = main(sys.argv[1:])
print(f"forks: {len(forks)}")
sys.exit(status)
"""


def forks_of(*args) -> tuple[subprocess.CompletedProcess, int]:
    done = subprocess.run([PYTHON, "-c", FORK_PROBE, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    return done, int(done.stdout.rsplit("forks: ", 1)[1])


def test_one_worker_starts_no_process_and_two_start_two(many_shards):
    done, forks = forks_of("verify", many_shards, "--workers", "1")
    assert done.returncode == 0 and "ok: 12 shard(s)" in done.stdout and forks == 0, done.stderr
    done, forks = forks_of("verify", many_shards, "--workers", "2")
    assert done.returncode == 0 and "ok: 12 shard(s)" in done.stdout and forks == 2, done.stderr


def test_finalize_verify_checks_with_a_worker_per_cpu(docs_jsonl, tmp_path):
    out = tmp_path / "ds"
    assert prep_main(["tokenize", "--input", str(docs_jsonl), "--out", str(out), *RECIPE,
                      "--workers", "1", "--task-index", "0", "--task-count", "1"]) == 0
    done, forks = forks_of("finalize", "--out", out, "--verify")
    assert done.returncode == 0 and "ok: 12 shard(s)" in done.stdout, done.stderr
    cpus = min(len(os.sched_getaffinity(0)), 12)
    assert forks == (cpus if cpus > 1 else 0)


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return found


def test_a_killed_worker_is_one_line_and_exit_1(many_shards, tmp_path):
    """Shard 0 is huge: its worker still reads it while the test SIGKILLs a worker."""
    ds = copy_of(many_shards, tmp_path / "ds")
    make_huge(ds, 0)
    proc = subprocess.Popen([PYTHON, "-m", "prep", "verify", str(ds), "--workers", "2"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = []
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            workers = children_of(proc.pid)
        assert len(workers) == 2, workers
        time.sleep(0.5)
        os.kill(workers[-1], signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        for pid in [proc.pid, *workers]:  # on a failure, the worker reading the huge shard would read on
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    assert proc.returncode == 1, err
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f"error: {ds}: a verify worker process died"), err
    assert "Traceback" not in err and not out
    assert not Path(f"/proc/{workers[0]}").exists()  # the other worker was ended too


def test_ctrl_c_stops_every_worker_and_prints_one_line(many_shards, tmp_path):
    """Ctrl-C (SIGINT to the process group) while one worker reads the huge train_000000.bin and the other, done
    with the small shards, waits for work: exit 130, one line, no worker's traceback."""
    ds = copy_of(many_shards, tmp_path / "ds")
    make_huge(ds, 0)
    # The default SIGINT handler, even when the tests themselves run where SIGINT is ignored (a background job).
    proc = subprocess.Popen([PYTHON, "-m", "prep", "verify", str(ds), "--workers", "2"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while len(children_of(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # on a failure: the whole session, workers included
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 130, err
    assert error_lines(err) == ["error: interrupted; rerun the same command to resume"], err
    assert "Traceback" not in err and not out


def is_running(pid: int) -> bool:
    """Neither gone nor a zombie (in a container, PID 1 may never reap the orphan)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_a_verify_killed_alone_leaves_no_worker_behind(many_shards, tmp_path):
    """`kill -9` of verify alone (not its group): its workers end with it instead of waiting on the pool for ever.
    Shard 0 is huge, so a worker is still reading when the parent is killed."""
    ds = copy_of(many_shards, tmp_path / "ds")
    make_huge(ds, 0)
    proc = subprocess.Popen([PYTHON, "-m", "prep", "verify", str(ds), "--workers", "2"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(workers := children_of(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(workers) == 2, workers
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while any(map(is_running, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in workers if is_running(pid)]
    finally:
        with contextlib.suppress(ProcessLookupError):  # the workers of an unfixed verify
            os.killpg(proc.pid, signal.SIGKILL)
