"""prep on a shared cluster: concurrent runs on one directory, symlinked inputs, inputs edited in place, the
shard-size limit, and a module graph without cycles."""
import ast
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from prep.__main__ import main as prep_main
from prep.inputs import InputError, Unit, file_fingerprint
from prep.reader import Dataset
from prep.tokenize import UnitJob, tokenize_unit
from tests.conftest import PYTHON, REPO
from tests.fixtures_data import REFERENCE_RECIPE, tree_bytes, write_jsonl
from tests.test_prep_inputs import tokenize


def start_prep(*args) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "prep", *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def holder_of(lock: Path, procs, timeout=120.0) -> subprocess.Popen:
    """The process (of `procs`) whose pid the lock file names, once one holds it."""
    deadline = time.monotonic() + timeout
    while True:
        text = lock.read_text() if lock.exists() else ""
        for p in procs:
            if f"pid {p.pid} " in text:
                return p
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate() for p in procs if p.poll() is not None]
        time.sleep(0.01)


def finish(proc, timeout=300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def assert_loser(rc, err, winner, what):
    assert rc == 1 and "Traceback" not in err, err
    assert f"error: {what} is in use by host {socket.gethostname()} pid {winner.pid} since" in err, err
    assert "pass --wait" in err


def test_two_identical_tokenize_runs_one_wins_the_other_touches_nothing(tmp_path, fineweb_parquet,
                                                                         parquet_reference):
    out = tmp_path / "ds"
    args = ["tokenize", "--input", fineweb_parquet, "--out", out, *REFERENCE_RECIPE, "--workers", 1]
    procs = [start_prep(*args), start_prep(*args)]
    winner = holder_of(out / ".work" / "lock", procs)
    loser = procs[1 - procs.index(winner)]
    os.kill(winner.pid, signal.SIGSTOP)  # holding the lock mid-run, however fast this machine is
    try:
        assert_loser(*finish(loser), winner, out)
        before = snapshot(out)
        assert_loser(*finish(start_prep(*args)), winner, out)  # a third one, too, touches nothing
        assert snapshot(out) == before
    finally:
        os.kill(winner.pid, signal.SIGCONT)
    assert finish(winner)[0] == 0
    assert prep_main(["verify", str(out)]) == 0
    assert tree_bytes(out) == parquet_reference  # the lock went with .work/


def test_two_finalizers_one_wins(tmp_path, fineweb_parquet, parquet_reference):
    out = tmp_path / "ds"
    assert tokenize([fineweb_parquet], out, *REFERENCE_RECIPE, "--task-index", 0, "--task-count", 1) == 0
    procs = [start_prep("finalize", "--out", out), start_prep("finalize", "--out", out)]
    winner = holder_of(out / ".work" / "lock", procs)
    loser = procs[1 - procs.index(winner)]
    os.kill(winner.pid, signal.SIGSTOP)
    try:
        assert_loser(*finish(loser), winner, out)
    finally:
        os.kill(winner.pid, signal.SIGCONT)
    assert finish(winner)[0] == 0
    assert prep_main(["verify", str(out)]) == 0
    assert tree_bytes(out) == parquet_reference


@pytest.mark.parametrize("extra, rc, said", [
    ([], 0, "already a finished dataset with this recipe"),
    # The waiter locks a .work/ made anew (the holder's finalize removed the old one with its lock file); its
    # refusal had left that .work/lock in the finished dataset.
    (["--shard-tokens", 70000], 1, "made with a different recipe: shard_tokens: 60000 -> 70000"),
])
def test_wait_flag_waits_for_the_holder_then_finds_the_dataset_finished(tmp_path, fineweb_parquet, parquet_reference,
                                                                       extra, rc, said):
    out = tmp_path / "ds"
    args = ["tokenize", "--input", fineweb_parquet, "--out", out, *REFERENCE_RECIPE, "--workers", 1]
    first = start_prep(*args)
    holder_of(out / ".work" / "lock", [first])
    os.kill(first.pid, signal.SIGSTOP)
    try:
        waiting = start_prep(*args, *extra, "--wait")
        time.sleep(3)
        assert waiting.poll() is None, waiting.communicate()
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert finish(first)[0] == 0
    got, err = finish(waiting)
    assert got == rc and said in err, err
    assert tree_bytes(out) == parquet_reference and not (out / ".work").exists()


def test_array_tasks_share_the_directory_but_not_a_task_and_finalize_waits_for_them(tmp_path, fineweb_parquet,
                                                                                   parquet_reference):
    out = tmp_path / "ds"
    task = ["tokenize", "--input", fineweb_parquet, "--out", out, *REFERENCE_RECIPE, "--workers", 1,
            "--task-count", 2, "--task-index"]
    first = start_prep(*task, 0)
    holder_of(out / ".work" / "task-0-of-2.lock", [first])
    os.kill(first.pid, signal.SIGSTOP)
    try:
        assert_loser(*finish(start_prep(*task, 0)), first, f"task 0/2 of {out}")  # a second copy of task 0
        assert finish(start_prep(*task, 1))[0] == 0  # the other task runs beside it
        rc, err = finish(start_prep("finalize", "--out", out))
        assert rc == 1 and f"error: {out} is in use by running tokenize array task(s)" in err, err
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert finish(first)[0] == 0
    assert prep_main(["finalize", "--out", str(out)]) == 0
    assert tree_bytes(out) == parquet_reference


def test_symlinked_directories_are_followed_each_real_file_once(tmp_path, shakespeare_docs, capsys):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "deep").mkdir(parents=True)
    raw = tmp_path / "raw"
    (raw / "a").mkdir(parents=True)
    docs = shakespeare_docs[:50]
    for i in range(2):
        write_jsonl(raw / "a" / f"{i}.jsonl", [{"text": d} for d in docs[i * 10:(i + 1) * 10]])
    for i in range(2, 5):
        write_jsonl((elsewhere / "deep" if i == 4 else elsewhere) / f"{i}.jsonl",
                    [{"text": d} for d in docs[i * 10:(i + 1) * 10]])
    (raw / "b").symlink_to(elsewhere)           # a linked directory: its 3 files are input
    (raw / "c").symlink_to(elsewhere)           # a second link to it: counted once
    (raw / "a" / "loop").symlink_to(raw)        # a cycle
    (raw / "d.jsonl").symlink_to(raw / "a" / "0.jsonl")  # a link to a file already found
    assert tokenize([raw], tmp_path / "ds", "--val-tokens", 0) == 0
    m = Dataset(tmp_path / "ds").manifest
    real = [raw / "a" / "0.jsonl", raw / "a" / "1.jsonl", elsewhere / "2.jsonl", elsewhere / "3.jsonl",
            elsewhere / "deep" / "4.jsonl"]  # b/ before c/, and deep/ (b/deep) after b's files by name
    real = [str(f.resolve()) for f in real]
    assert [f["path"] for f in m["inputs"]] == real
    assert m["input_stats"]["documents"] == 50
    (raw / "e.jsonl").symlink_to(tmp_path / "gone.jsonl")
    capsys.readouterr()
    assert tokenize([raw], tmp_path / "ds2", "--val-tokens", 0) == 1
    assert f"error: {raw / 'e.jsonl'}: broken symbolic link" in capsys.readouterr().err


def _same_size_edit(path: Path, keep_mtime: bool) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    i = data.index(b"e", data.index(b'"text": "') + 9)  # in a document's text
    data[i:i + 1] = b"E"
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:  # a clock tick later, even on a filesystem with coarse timestamps
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))


def finished_two_input_dataset(tmp_path, docs):
    """(src, other, tokenize flags, the dataset's bytes) of a finished dataset at tmp_path/ds made of two inputs."""
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs[:200]])
    other = write_jsonl(tmp_path / "more.jsonl", [{"text": d} for d in docs[200:400]])
    args = ["--val-tokens", 0, "--shard-tokens", 5000]
    assert tokenize([src, other], tmp_path / "ds", *args) == 0
    return src, other, args, tree_bytes(tmp_path / "ds")


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["edited", "edited-mtime-restored"])
def test_input_edited_without_changing_its_size_is_refused(tmp_path, shakespeare_docs, keep_mtime, capsys):
    # A finished dataset: refused, untouched.
    src, other, args, before = finished_two_input_dataset(tmp_path, shakespeare_docs)
    _same_size_edit(src, keep_mtime)
    capsys.readouterr()
    assert tokenize([src, other], tmp_path / "ds", *args) == 1
    err = capsys.readouterr().err
    assert f"holds a finished dataset made with a different recipe: input changed: {src} (same size, " in err
    assert ("same modification time" if keep_mtime else "modified ") in err, err
    assert "the hash of its first and last 512 KiB differs" in err
    assert tree_bytes(tmp_path / "ds") == before
    # An unfinished one: the other task's units are never tokenized from the new content.
    assert tokenize([src, other], tmp_path / "ds2", *args, "--task-index", 0, "--task-count", 2) == 0
    _same_size_edit(other, keep_mtime)
    capsys.readouterr()
    assert tokenize([src, other], tmp_path / "ds2", *args, "--task-index", 1, "--task-count", 2) == 1
    err = capsys.readouterr().err
    assert f"holds unfinished work (.work/) made with a different recipe: input changed: {other}" in err
    assert sorted(p.name for p in (tmp_path / "ds2" / ".work" / "units").glob("u*.json")) == ["u000000.json"]


def test_a_unit_whose_file_changed_after_the_recipe_is_not_committed(tmp_path, shakespeare_docs):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in shakespeare_docs[:20]])
    out = tmp_path / "ds"
    (out / ".work" / "units").mkdir(parents=True)
    recorded = file_fingerprint(src)
    _same_size_edit(src, keep_mtime=False)  # after the recipe was taken, before the worker reads the unit
    job = UnitJob(str(out), Unit(0, str(src), "jsonl"), "text", False, 0, recorded)
    with pytest.raises(InputError, match=r"docs.jsonl: changed while being read .* tokenize into a new --out"):
        tokenize_unit(job)
    assert list((out / ".work" / "units").iterdir()) == []


def test_shard_tokens_must_fit_the_int32_header(tmp_path, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "a few words"}])
    assert tokenize([src], tmp_path / "ds", "--shard-tokens", 2**31, "--val-tokens", 0) == 2
    err = capsys.readouterr().err
    assert "--shard-tokens 2,147,483,648 does not fit the shard header" in err and "1.07e9" in err
    assert not (tmp_path / "ds").exists()
    assert tokenize([src], tmp_path / "ds", "--shard-tokens", 2**31 - 1, "--val-tokens", 0) == 0


def _imports(package: Path) -> dict[str, set[str]]:
    """The package-internal imports of each module of `package` (relative or absolute), read from the source."""
    graph = {}
    for path in package.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                parts = (node.module or "").split(".")
                if node.level == 1:
                    deps |= {parts[0]} if node.module else {a.name for a in node.names}
                elif parts[0] == package.name:
                    deps |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith(package.name + ".")}
        graph[path.stem] = {d for d in deps if (package / f"{d}.py").exists() and d != path.stem}
    return graph


def test_prep_modules_import_each_other_without_a_cycle():
    graph = _imports(REPO / "prep")
    assert "workdir" in graph["finalize"] and "finalize" in graph["tokenize"]  # the parser sees these imports
    state: dict[str, str] = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])
    assert not (REPO / "prep" / "atomic.py").exists()  # one file-safety module: common/files.py


def test_dataset_files_get_the_umask_permissions(tmp_path, shakespeare_docs):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in shakespeare_docs[:30]])
    out = tmp_path / "ds"
    result = subprocess.run(["sh", "-c", f"umask 027 && exec {PYTHON} -m prep tokenize --input {src} --out {out} "
                                         "--val-tokens 100"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {"0o640"}
    assert json.loads((out / "manifest.json").read_text())["totals"]["train"]["shards"] == 1


def _touch(path: Path, copy: bool) -> None:
    """The same content with a new modification time: a copy without -p (copy=True), or a restore / HSM recall."""
    if copy:
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(data)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))


@pytest.mark.parametrize("copy", [False, True], ids=["touched", "copied-without-p"])
def test_an_input_with_the_same_content_and_a_new_mtime_is_the_same_recipe(tmp_path, shakespeare_docs, copy, capsys):
    # A finished dataset: reused, untouched.
    src, other, args, before = finished_two_input_dataset(tmp_path, shakespeare_docs)
    _touch(src, copy)
    capsys.readouterr()
    assert tokenize([src, other], tmp_path / "ds", *args) == 0
    assert "is already a finished dataset with this recipe" in capsys.readouterr().err
    assert tree_bytes(tmp_path / "ds") == before
    # Unfinished work: the other task goes on, and finalize makes the same shards.
    assert tokenize([src, other], tmp_path / "ds2", *args, "--task-index", 0, "--task-count", 2) == 0
    _touch(other, copy)
    assert tokenize([src, other], tmp_path / "ds2", *args, "--task-index", 1, "--task-count", 2) == 0
    assert prep_main(["finalize", "--out", str(tmp_path / "ds2")]) == 0
    shards = {k: v for k, v in tree_bytes(tmp_path / "ds2").items() if k.endswith(".bin")}
    assert shards == {k: v for k, v in before.items() if k.endswith(".bin")} and shards
