"""common/files.py: atomic files and directories, whole-line appends, locks, permissions from the umask."""
import errno
import json
import os
import socket
import stat
import subprocess
import sys
import threading

import pytest

from common import files
from tests.conftest import REPO
from train.rundir import RunDir
from train.rundir.checkpoints import write_mark


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if files.TMP_MARK in p.name)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.md"
    files.write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with files.atomic_file(target, "w") as f:
            f.write("half of the new")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n"
    assert leftovers(tmp_path) == []
    with pytest.raises(RuntimeError):
        with files.atomic_file(tmp_path / "new.png") as f:
            f.write(b"\x89PNG")
            raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_a_disk_error_names_the_file_being_written(tmp_path):
    target = tmp_path / "result.json"
    with pytest.raises(OSError) as caught:
        with files.atomic_file(target, "w"):
            raise OSError(errno.ENOSPC, "No space left on device")  # what write() raises: no file named
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert not target.exists() and leftovers(tmp_path) == []


def test_concurrent_writers_of_one_file_never_share_a_temporary(tmp_path):
    target = tmp_path / "results.json"
    errors = []

    def write(i):
        try:
            for _ in range(20):
                files.write_json(target, {"writer": i})
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert json.loads(target.read_text())["writer"] in range(4)
    assert leftovers(tmp_path) == []


def test_atomic_dir_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "export"
    with pytest.raises(RuntimeError):
        with files.atomic_dir(out) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    with files.atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in out.iterdir()] == ["config.json"]
    with pytest.raises(files.PipelineError, match="already exists"):
        with files.atomic_dir(out):
            pass


def test_atomic_dir_leaves_what_appeared_meanwhile_and_clears_dead_writers_temporaries(tmp_path):
    out = tmp_path / "export"
    # Two exports to one --out at once: the one finishing second replaced the first's silently.
    with pytest.raises(files.PipelineError, match="appeared while this was being written"):
        with files.atomic_dir(out) as tmp:
            (tmp / "mine").write_text("")
            out.mkdir()
            (out / "theirs").write_text("")
    assert [p.name for p in tmp_path.iterdir()] == ["export"] and [p.name for p in out.iterdir()] == ["theirs"]
    # A killed writer's temporary (a dead pid) goes at the next write of that path; a live writer's stays, and so
    # does a replaced copy while the path it was moved from is missing.
    dead = _a_dead_pid()
    host = socket.gethostname()
    left = tmp_path / f".export{files.TMP_MARK}{host}-{dead}-abcd1234"
    live = tmp_path / f".export{files.TMP_MARK}{host}-{os.getpid()}-abcd1234"
    old = tmp_path / f".other.old{files.TMP_MARK}{host}-{dead}-abcd1234"
    for d in (left, live, old):
        d.mkdir()
    with files.atomic_dir(out, replace=True) as tmp:
        (tmp / "new").write_text("")
    with pytest.raises(files.PipelineError):
        with files.atomic_dir(tmp_path / "other"):
            raise files.PipelineError("stop")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", live.name, old.name])


def _a_dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_append_cuts_a_partial_last_line_before_the_next_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 4.1}\n{"step": 2, "lo')  # a writer killed mid-line
    assert files.append_json_line(path, {"step": 2, "loss": 4.0}) == len('{"step": 2, "lo')
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 4.1}, {"step": 2, "loss": 4.0}]
    assert files.append_json_line(path, {"step": 3}) == 0  # a whole last line is left alone


@pytest.mark.parametrize("damage", [b"no newline at all", b"x" * 10_000 + b"\n" + b"y" * 9_000])
def test_append_repairs_fragments_longer_than_a_read_block(tmp_path, damage):
    path = tmp_path / "samples.jsonl"
    path.write_bytes(damage)
    files.append_line(path, "whole")
    kept = damage[:damage.rfind(b"\n") + 1]
    assert path.read_bytes() == kept + b"whole\n"


def test_append_refuses_a_line_with_a_newline(tmp_path):
    with pytest.raises(ValueError):
        files.append_line(tmp_path / "x.jsonl", "two\nlines")


def test_permissions_follow_the_umask(tmp_path, umask_022):
    files.write_text(tmp_path / "report.md", "x")
    files.append_line(tmp_path / "results.jsonl", "{}")
    with files.atomic_dir(tmp_path / "hf") as d:
        files.write_bytes(d / "model.safetensors", b"\0")
    assert mode(tmp_path / "report.md") == mode(tmp_path / "results.jsonl") == 0o644
    assert mode(tmp_path / "hf") == 0o755 and mode(tmp_path / "hf" / "model.safetensors") == 0o644
    os.umask(0o077)  # a user who wants private files gets them
    files.write_text(tmp_path / "private.md", "x")
    assert mode(tmp_path / "private.md") == 0o600


HOLD = """
import sys, time
from common import files
with files.lock(sys.argv[1], "dataset X"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_lock_held_by_another_process_is_refused_naming_the_holder(tmp_path):
    path = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(files.Locked) as caught:
            with files.lock(path, "dataset X"):
                pytest.fail("took a lock another process holds")
        message = str(caught.value)
        assert message.startswith("dataset X is in use by host ") and f"pid {holder.pid} since" in message
        assert "\n" not in message and str(path) in message
        with files.try_lock(path) as got:
            assert got is None
    finally:
        holder.kill()
        holder.wait()
    with files.lock(path, "dataset X"):  # the kernel dropped the dead holder's lock
        assert f"pid {os.getpid()} since" in path.read_text()


def test_a_child_given_the_lock_file_keeps_the_lock_after_its_parent_lets_go(tmp_path):
    path = tmp_path / "tag.lock"
    with files.try_lock(path) as f:
        child = subprocess.Popen(["sleep", "30"], pass_fds=[f.fileno()])
    try:
        with files.try_lock(path) as again:
            assert again is None  # the orphan still holds it
    finally:
        child.kill()
        child.wait()
    with files.try_lock(path) as again:
        assert again is not None


def test_a_lock_taken_just_now_names_its_holder_once_it_has_written_its_record(tmp_path):
    # An exclusive holder writes its name just after taking the lock; a process refused in between must still
    # name it, not report nobody (seen as a flaky "in use by array tasks" from prep).
    import fcntl
    path = tmp_path / "lock"
    holder = open(path, "a+")
    fcntl.flock(holder, fcntl.LOCK_EX)  # another open file description: the same process is refused too
    record = threading.Timer(0.2, lambda: (holder.write("host h pid 42 since then\n"), holder.flush()))
    record.start()
    try:
        with pytest.raises(files.Locked, match="in use by host h pid 42 since then"):
            with files.lock(path, "the thing"):
                pass
    finally:
        record.join()
        holder.close()


@pytest.fixture
def flock_without_locks(monkeypatch):
    """fcntl.flock failing as on Lustre mounted without -o flock (ENOLCK; some NFS mounts give ENOSYS or
    EOPNOTSUPP). Injected: every filesystem this machine has supports flock, so the error cannot be had for real."""
    import fcntl

    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", refuse)


def assert_no_locks_line(err, lock_file):
    assert err.count("\n") == 1 and err.startswith("error: cannot lock "), err
    assert f"cannot lock {lock_file}:" in err and "No locks available" in err and "-o flock" in err, err


def test_a_filesystem_without_locks_stops_prep_in_one_line_before_anything_is_written(
        tmp_path, capsys, flock_without_locks):
    from prep.__main__ import main
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": "a", "text": "To be, or not to be"}) + "\n")
    out = tmp_path / "ds"
    rc = main(["tokenize", "--input", str(docs), "--out", str(out)])
    assert rc == 1
    assert_no_locks_line(capsys.readouterr().err, out / ".work" / "lock")
    # Never run unlocked: nothing beside the (empty) lock file itself.
    assert [p.relative_to(out).as_posix() for p in sorted(out.rglob("*"))] == [".work", ".work/lock"]
    assert (out / ".work" / "lock").read_text() == ""


def test_a_filesystem_without_locks_stops_eval_watch_in_one_line_before_scoring(
        tmp_path, capsys, shared_dir, flock_without_locks):
    from eval.__main__ import main
    run = tmp_path / "run"
    RunDir(run).start()
    tag = run / "checkpoints" / "global_step1"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")  # never read: the lock comes first
    write_mark(tag, 1, 1)  # a complete checkpoint, as far as the watcher can tell before it locks
    rc = main(["watch", str(run), "--once", "--hellaswag-file", str(shared_dir / "data" / "hellaswag_val.jsonl")])
    assert rc == 1
    assert_no_locks_line(capsys.readouterr().err, run / "eval" / ".watch" / "global_step1.lock")
    assert not (run / "eval" / "global_step1.json").exists() and not (run / "eval" / "results.jsonl").exists()
