"""`eval watch` beside a run whose checkpoints appear while it polls, and `eval report` on the result."""
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import PYTHON, REPO
from train.rundir import RunDir
from train.rundir.identity import checkpoint_identity

WATCH_LIMIT = "8"  # docs per checkpoint: the watcher's bookkeeping is under test here, not the scores


def step_of(tag_dir):
    return int(tag_dir.name.removeprefix("global_step"))


def tag_dirs(run):
    return sorted((p for p in (run / "checkpoints").glob("global_step*") if p.is_dir()), key=step_of)


def new_run(run):
    """A run directory as train starts one (its format.json), for runs assembled here from tiny_run's files."""
    RunDir(run).start()
    return run


def set_latest(run, tag):
    tmp = run / "checkpoints" / ".latest.tmp"
    tmp.write_text(tag)
    os.replace(tmp, run / "checkpoints" / "latest")  # as DeepSpeed does, only once the tag is whole


class Watcher:
    """A `python -m eval watch` process whose stdout lines are collected as they come."""

    def __init__(self, run, hellaswag_file, *flags):
        self.lines = []
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "eval", "watch", str(run), "--hellaswag-file", str(hellaswag_file),
             "--limit", WATCH_LIMIT, "--batch-size", "8", *flags],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            umask=0o022)  # the usual umask, whatever the test runner's: outputs must then be readable by others
        self.reader = threading.Thread(target=self._read)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, text, timeout=240):
        deadline = time.time() + timeout
        while not any(text in line for line in self.lines):
            if time.time() > deadline or not self.reader.is_alive():
                pytest.fail(f"watcher never printed {text!r}; output:\n{''.join(self.lines)}")
            time.sleep(0.2)

    def finish(self, timeout=240):
        rc = self.proc.wait(timeout=timeout)
        self.reader.join()
        return rc, "".join(self.lines)


@pytest.fixture(scope="module")
def hellaswag_file(shared_dir):
    return shared_dir / "data" / "hellaswag_val.jsonl"


@pytest.fixture(scope="module")
def shareable_dir():
    """A directory other accounts may enter (pytest's own temporary directories are owner-only)."""
    path = Path(tempfile.mkdtemp(prefix="gpt2-pipeline-watch-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def watched_run(tiny_run, hellaswag_file, shareable_dir):
    """Training replayed from tiny_run's real checkpoints while a watcher runs:

    A and B complete at start; B is rotated away while A is scored; a second watcher starts meanwhile;
    the final checkpoint C is first half-written (latest still names B), then completed.
    """
    source = tag_dirs(tiny_run)
    assert len(source) >= 2, "tiny_run must hold at least two checkpoints"
    a_src, c_src = source[0], source[-1]
    run = new_run(shareable_dir / "run")
    (run / "checkpoints").mkdir(parents=True)
    recipe = yaml.safe_load((tiny_run / "config.yaml").read_text())
    recipe["schedule"]["max_steps"] = step_of(c_src)
    recipe["eval"]["command"] = "echo {ckpt} >> {run}/command.log"
    (run / "config.yaml").write_text(yaml.safe_dump(recipe))
    shutil.copy(tiny_run / "metrics.jsonl", run / "metrics.jsonl")
    a, b, c = (run / "checkpoints" / f"global_step{s}" for s in (step_of(a_src), step_of(a_src) + 1, step_of(c_src)))
    shutil.copytree(a_src, a)
    shutil.copytree(a_src, b)
    set_latest(run, b.name)

    first = Watcher(run, hellaswag_file, "--poll", "0.5", "--until-final")
    first.wait_for(f"scoring {a.name}")
    shutil.rmtree(b)  # checkpoint.keep_last rotates it away before its turn
    second = Watcher(run, hellaswag_file, "--once")
    second_rc, second_out = second.finish()
    first.wait_for(f"{a.name} scored")

    c.mkdir()  # DeepSpeed writing the final checkpoint: files appear one by one, `latest` comes last
    for f in sorted(c_src.iterdir())[:1]:
        shutil.copy(f, c / f.name)
    time.sleep(3)  # several polls see the half-written tag
    for f in sorted(c_src.iterdir())[1:]:
        shutil.copy(f, c / f.name)
    set_latest(run, c.name)
    rc, out = first.finish()
    return dict(run=run, a=a, b=b, c=c, rc=rc, out=out, second_rc=second_rc, second_out=second_out)


def test_watch_scores_each_complete_checkpoint_once(watched_run):
    w = watched_run
    assert w["rc"] == 0, w["out"]
    results = [json.loads(line) for line in (w["run"] / "eval" / "results.jsonl").read_text().splitlines()]
    assert [r["tag"] for r in results] == [w["a"].name, w["c"].name]  # once each, B never, C only when whole
    assert [r["step"] for r in results] == [step_of(w["a"]), step_of(w["c"])]
    assert all(r["tasks"]["hellaswag"]["n_docs"] == int(WATCH_LIMIT) for r in results)
    assert f"{w['b'].name}: rotated away" in w["out"]
    assert w["out"].count("scoring ") == 2, w["out"]  # no failed attempt on the half-written checkpoint
    assert not list((w["run"] / "eval" / ".watch").glob("*.attempts"))
    # The second watcher found A locked (or already scored) and scored nothing itself.
    assert w["second_rc"] == 0 and "scoring " not in w["second_out"], w["second_out"]
    # The recipe's eval.command ran once per scored checkpoint, with its placeholders filled.
    assert (w["run"] / "command.log").read_text().split() == [str(w["a"]), str(w["c"])]
    assert all(r["command"]["returncode"] == 0 for r in results)


def test_watch_retries_a_failed_evaluation_then_gives_up(tiny_run, hellaswag_file, tmp_path):
    run = new_run(tmp_path / "run")
    src = tag_dirs(tiny_run)[0]
    tag = run / "checkpoints" / src.name
    shutil.copytree(src, tag)
    model_file = tag / "mp_rank_00_model_states.pt"
    data = model_file.read_bytes()
    # Damaged after the save, size unchanged: the checkpoint still reads as complete, but cannot be loaded.
    model_file.write_bytes(data[:1000] + bytes(len(data) - 1000))
    set_latest(run, tag.name)
    outputs = []
    for _ in range(3):
        w = Watcher(run, hellaswag_file, "--once", "--max-attempts", "2")
        rc, out = w.finish()
        assert rc == 0
        outputs.append(out)
    assert "scoring" in outputs[0] and "will retry" in outputs[0]
    assert "attempt 2 of 2" in outputs[1] and "gave up after 2 failed evaluation attempts" in outputs[1]
    assert "scoring" not in outputs[2] and "gave up" in outputs[2]  # bounded: no third attempt
    assert not (run / "eval" / f"{tag.name}.json").exists()
    # Not lost silently: one results.jsonl line says so (the third watcher wrote no second), and the report lists it.
    lines = [json.loads(line) for line in (run / "eval" / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 1, lines
    assert lines[0]["tag"] == tag.name and lines[0]["checkpoint_id"] == checkpoint_identity(tag)["checkpoint_id"]
    assert "gave up after 2 failed evaluation attempts" in lines[0]["unscored"]
    assert f"remove {run / 'eval' / '.watch' / tag.name}.attempts to try again" in lines[0]["unscored"]
    report = subprocess.run([PYTHON, "-m", "eval", "report", str(run)], cwd=REPO, capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    assert "## Not scored" in (run / "eval" / "report.md").read_text()
    assert "gave up after 2" in (run / "eval" / "report.md").read_text()
    # The same tag name saved again (a run restarted from scratch) is another checkpoint: its attempts start at 0.
    shutil.rmtree(tag)
    shutil.copytree(src, tag)
    mark = json.loads((tag / "complete.json").read_text())
    (tag / "complete.json").write_text(json.dumps({**mark, "written": "2099-01-01T00:00:00+0000"}))
    rc, out = Watcher(run, hellaswag_file, "--once", "--max-attempts", "2").finish()
    assert rc == 0 and "attempt 1 of 2" in out and f"{tag.name} scored" in out, out
    lines = [json.loads(line) for line in (run / "eval" / "results.jsonl").read_text().splitlines()]
    assert [("unscored" in r, r["checkpoint_id"]) for r in lines] == [
        (True, lines[0]["checkpoint_id"]), (False, checkpoint_identity(tag)["checkpoint_id"])]
    assert lines[0]["checkpoint_id"] != lines[1]["checkpoint_id"]


@pytest.fixture(scope="module")
def reported_run(watched_run):
    run = watched_run["run"]
    proc = subprocess.run([PYTHON, "-m", "eval", "report", str(run)], cwd=REPO, capture_output=True, text=True,
                          umask=0o022)
    assert proc.returncode == 0, proc.stderr
    return run


def test_report_table_and_curves(reported_run):
    from eval.report import GPT2_124M_ACC_NORM, Z95
    run = reported_run
    report = (run / "eval" / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and line[2].isdigit()]
    results = [json.loads(line) for line in (run / "eval" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(results) == 2
    for row, result in zip(rows, results):
        cells = [c.strip() for c in row.strip("|").split("|")]
        hs = result["tasks"]["hellaswag"]
        assert cells[0] == str(result["step"])
        assert cells[1] == f"{result['tokens_seen']:,}"
        # Each score carries its 95% interval; 8 docs cannot be told apart from GPT-2's 0.3114 unless far off.
        assert cells[5] == f"{hs['acc_norm']:.4f} ± {Z95 * hs['acc_norm_stderr']:.4f}"
        low, high = hs["acc_norm"] - Z95 * hs["acc_norm_stderr"], hs["acc_norm"] + Z95 * hs["acc_norm_stderr"]
        assert cells[7] == ("above" if low > GPT2_124M_ACC_NORM else "below" if high < GPT2_124M_ACC_NORM
                            else "within")
        assert all(cell != "–" for cell in cells), row  # train and val loss found for every checkpoint
    png = (run / "eval" / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert not [p.name for p in (run / "eval").iterdir() if ".tmp-" in p.name]


def test_report_reads_as_uncertain_a_small_sample_above_the_reference():
    from eval.report import markdown, versus_reference
    # 100 docs at 0.35: lm-eval's stderr is sqrt(p(1-p)/(n-1)) = 0.0479, so 0.3114 lies inside 0.35 ± 0.094.
    stderr = (0.35 * 0.65 / 99) ** 0.5
    assert versus_reference(0.35, stderr) == "within"
    assert versus_reference(0.35, (0.35 * 0.65 / 10041) ** 0.5) == "above"  # the full 10,042 docs: it is better
    row = {"step": 100, "tokens": 1000, "train_loss": 3.0, "val_loss": 3.1, "acc": 0.3, "acc_stderr": None,
           "acc_norm": 0.35, "acc_norm_stderr": stderr, "n_docs": 100}
    assert "| 0.3500 ± 0.0940 | 100 | within |" in markdown(Path("run"), [row])


@pytest.mark.parametrize("file, line, message", [
    ("eval/results.jsonl", {"tag": "global_step2", "step": "2", "tasks": {}}, "step '2' is not a whole number"),
    ("eval/results.jsonl", {"tag": "global_step2", "step": 2, "tasks": {"hellaswag": {"acc_norm": "0.3"}}},
     "tasks.hellaswag.acc_norm '0.3' is not a number"),
    ("eval/results.jsonl", {"tag": "global_step2", "step": 2, "tasks": []}, "tasks [] is not an object"),
    ("metrics.jsonl", {"step": "2", "loss": 5.0}, "step '2' is not a number"),
])
def test_report_refuses_a_line_of_the_wrong_types_naming_it(tmp_path, capsys, file, line, message):
    # valid JSON with a string for a number was a traceback where the report compares or formats it
    from eval.__main__ import main
    run = new_run(tmp_path / "run")
    (run / "eval").mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 6.0, "tokens": 256}) + "\n")
    with open(run / file, "a") as f:
        f.write(json.dumps(line) + "\n")
    lineno = (run / file).read_text().count("\n")
    rc = main(["report", str(run)])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith(f"error: {run / file}:{lineno}: {message}"), err
    assert err.count("\n") == 1 and not (run / "eval" / "report.md").exists()


def waits_for_a_lock(pid: int) -> bool:
    """`pid` is blocked in flock (the kernel lists a waiter as "N: -> FLOCK ... PID ...")."""
    fields = (line.split() for line in Path("/proc/locks").read_text().splitlines())
    return any(len(f) > 5 and f[1] == "->" and f[5] == str(pid) for f in fields)


def test_two_reports_at_once_leave_the_newer_one_also_before_any_watcher_ran(tiny_run, hellaswag_file, tmp_path):
    # `eval checkpoint` alone (no RUN/eval/.watch), then two renders at once. The first is held after it read the
    # results, at metrics.jsonl (a FIFO the test feeds); a newer result appears and the second render starts.
    # Unserialised, the second wrote the newer report and the first, let go, replaced it with the older one.
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    done = subprocess.run([PYTHON, "-m", "eval", "checkpoint", *map(str, tag_dirs(run)), "--hellaswag-file",
                           str(hellaswag_file), "--limit", WATCH_LIMIT, "--batch-size", "8"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert not (run / "eval" / ".watch").exists()
    newer, aside = run / "eval" / "global_step6.json", tmp_path / "global_step6.json"
    newer.rename(aside)
    metrics = run / "metrics.jsonl"
    logged = metrics.read_bytes()
    (tmp_path / "metrics.jsonl").write_bytes(logged)
    metrics.unlink()
    os.mkfifo(metrics)
    fifo = tmp_path / "metrics.fifo"  # the FIFO's second name: it is fed after metrics.jsonl is a file again
    os.link(metrics, fifo)
    report = [PYTHON, "-m", "eval", "report", str(run)]
    first = subprocess.Popen(report, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second, fd = None, None
    try:
        deadline = time.time() + 300
        while fd is None:  # opening the FIFO for writing succeeds once the first render has it open to read
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                assert first.poll() is None and time.time() < deadline, first.communicate()
                time.sleep(0.05)
        os.replace(tmp_path / "metrics.jsonl", metrics)
        aside.rename(newer)
        second = subprocess.Popen(report, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while second.poll() is None and not waits_for_a_lock(second.pid):
            assert time.time() < deadline
            time.sleep(0.05)
        waited = second.poll() is None
        os.set_blocking(fd, True)
        os.write(fd, logged)
        os.close(fd)
        fd = None
        for proc in (first, second):
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0 and err == "", err
    finally:
        if fd is not None:
            os.close(fd)
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()
    rows = [line for line in (run / "eval" / "report.md").read_text().splitlines()
            if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[1].strip() for row in rows] == ["3", "6"]
    assert waited  # on the first, which held the report's lock
    assert (run / "eval" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in (run / "eval").iterdir() if ".tmp-" in p.name]
    assert [p.name for p in (run / "eval" / ".watch").iterdir()] == ["report.lock"]

def test_eval_outputs_are_readable_by_other_accounts(reported_run):
    """Under umask 022 every file eval writes is 0644, and another account (nobody) can read it."""
    run = reported_run
    outputs = [*sorted((run / "eval").glob("global_step*.json")), run / "eval" / "results.jsonl",
               run / "eval" / "report.md", run / "eval" / "curves.png"]
    assert len(outputs) == 5
    for path in outputs:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    if os.geteuid() == 0 and shutil.which("setpriv"):
        for path in outputs:
            as_nobody = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                                        "cat", str(path)], capture_output=True)
            assert as_nobody.returncode == 0, as_nobody.stderr
            assert as_nobody.stdout == path.read_bytes()


def one_checkpoint_run(tiny_run, run, command, scored=False):
    """A run directory holding tiny_run's last checkpoint as its final one, with `command` as eval.command.

    scored: RUN/eval/<tag>.json is already there, as a watcher that died after scoring leaves it, so a watcher
    goes straight to recording it and running the command.
    """
    src = tag_dirs(tiny_run)[-1]
    tag = new_run(run) / "checkpoints" / src.name
    shutil.copytree(src, tag)
    set_latest(run, tag.name)
    recipe = yaml.safe_load((tiny_run / "config.yaml").read_text())
    recipe["schedule"]["max_steps"] = step_of(src)
    recipe["eval"]["command"] = command
    (run / "config.yaml").write_text(yaml.safe_dump(recipe))
    if scored:
        (run / "eval").mkdir()
        identity = checkpoint_identity(tag)  # the result of this very checkpoint, not of another of its name
        (run / "eval" / f"{tag.name}.json").write_text(json.dumps(
            {**identity, "tasks": {"hellaswag": {"acc_norm": 0.3, "n_docs": 8}}}))
    return tag


def results_of(run):
    return [json.loads(line) for line in (run / "eval" / "results.jsonl").read_text().splitlines()]


def test_eval_command_gets_paths_quoted(tiny_run, hellaswag_file, tmp_path):
    run = tmp_path / "run $(touch pwned) x"
    tag = one_checkpoint_run(tiny_run, run, "echo {ckpt} >> {run}/command.log", scored=True)
    rc, out = Watcher(run, hellaswag_file, "--once").finish()
    assert rc == 0, out
    assert (run / "command.log").read_text() == f"{tag}\n"
    assert not list(tmp_path.rglob("pwned")) and not (REPO / "pwned").exists()
    [result] = results_of(run)
    assert result["command"]["returncode"] == 0


def pid_alive(pid):
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has finished; only its exit status waits to be collected


def test_a_watcher_killed_mid_evaluation_leaves_nothing_running_and_the_next_one_scores_once(
        tiny_run, hellaswag_file, tmp_path):
    run = tmp_path / "run"
    tag = one_checkpoint_run(tiny_run, run, "echo {ckpt} >> {run}/command.log")
    first = Watcher(run, hellaswag_file, "--poll", "0.5", "--until-final")
    first.wait_for(f"scoring {tag.name}")
    child = int(next(line for line in first.lines if "scoring" in line).rsplit("pid ", 1)[1].rstrip(")\n"))
    assert pid_alive(child)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()  # not finish(): an orphan would keep the watcher's stdout open until it ends
    deadline = time.time() + 5  # far less than the evaluation takes: it must have been killed, not finished
    while pid_alive(child) and time.time() < deadline:
        time.sleep(0.2)
    try:
        assert not pid_alive(child), "the killed watcher's `eval checkpoint` child is still running"
    finally:
        if pid_alive(child):
            os.kill(child, signal.SIGKILL)
        first.finish()
    rc, out = Watcher(run, hellaswag_file, "--poll", "0.5", "--until-final").finish()
    assert rc == 0 and out.count("scoring ") == 1, out
    assert [r["tag"] for r in results_of(run)] == [tag.name]
    assert (run / "command.log").read_text() == f"{tag}\n"


def test_a_watcher_killed_while_eval_command_runs_does_not_run_it_again(tiny_run, hellaswag_file, tmp_path):
    run = tmp_path / "run"
    tag = one_checkpoint_run(tiny_run, run, "echo $$ > {run}/command.pid; echo {ckpt} >> {run}/command.log; "
                                            "exec sleep 60 >/dev/null", scored=True)  # off the watcher's stdout
    first = Watcher(run, hellaswag_file, "--poll", "0.5", "--until-final")
    deadline = time.time() + 60
    while not (run / "command.log").exists() and time.time() < deadline:
        time.sleep(0.1)
    first.proc.send_signal(signal.SIGKILL)
    first.finish()
    command_pid = int((run / "command.pid").read_text())
    try:
        rc, out = Watcher(run, hellaswag_file, "--poll", "0.5", "--until-final").finish()
    finally:
        os.kill(command_pid, signal.SIGKILL)  # the killed watcher's command, still sleeping
    assert rc == 0, out
    assert (run / "command.log").read_text() == f"{tag}\n"  # once, by the killed watcher
    [result] = results_of(run)
    assert result["command"]["returncode"] is None and "not run again" in result["command"]["note"]
    assert "not run again" in out


def claim(run, tag, command):
    """RUN/eval/.watch/<tag>.command as a watcher writes it just before starting eval.command."""
    watch = run / "eval" / ".watch"
    watch.mkdir(parents=True, exist_ok=True)
    (watch / f"{tag.name}.command").write_text(json.dumps(
        {"command": command, "claimed_by": "host gone pid 4242", "since": "2026-01-01 00:00:00"}))
    return watch


def test_a_claim_whose_watcher_died_before_the_command_started_runs_it_once(tiny_run, hellaswag_file, tmp_path):
    """A watcher killed after its claim and before the command's process marked its start: the command never
    ran, so the next watcher runs it -- but only once the claimer is gone, which the checkpoint's lock tells."""
    from common import files
    run = tmp_path / "run"
    tag = one_checkpoint_run(tiny_run, run, "echo {ckpt} >> {run}/command.log", scored=True)
    watch = claim(run, tag, f"echo {tag} >> {run}/command.log")
    with files.try_lock(watch / f"{tag.name}.lock") as held:  # the claimer still alive: hands off
        assert held is not None
        rc, out = Watcher(run, hellaswag_file, "--once").finish()
    assert rc == 0, out
    assert not (run / "command.log").exists() and not (run / "eval" / "results.jsonl").exists()
    rc, out = Watcher(run, hellaswag_file, "--poll", "0.5", "--until-final").finish()
    assert rc == 0, out
    assert (run / "command.log").read_text() == f"{tag}\n"  # run, and once
    assert "claimed by a watcher killed before it started it (host gone pid 4242); running it now" in out
    [result] = results_of(run)
    assert result["command"]["returncode"] == 0
    assert not list(watch.glob("*.command*"))  # results.jsonl records it now


def test_a_command_marked_started_is_not_run_again(tiny_run, hellaswag_file, tmp_path):
    """The command's own process wrote its start mark before exec: it ran (or runs), whatever its watcher did."""
    run = tmp_path / "run"
    tag = one_checkpoint_run(tiny_run, run, "echo {ckpt} >> {run}/command.log", scored=True)
    watch = claim(run, tag, f"echo {tag} >> {run}/command.log")
    (watch / f"{tag.name}.command.started").write_text(f"host gone pid 4243 since then\necho {tag}\n")
    rc, out = Watcher(run, hellaswag_file, "--poll", "0.5", "--until-final").finish()
    assert rc == 0, out
    assert not (run / "command.log").exists()
    [result] = results_of(run)
    assert result["command"]["returncode"] is None and "not run again" in result["command"]["note"]


def test_a_requeued_watcher_job_carries_on_without_scoring_or_running_anything_twice(
        tiny_run, hellaswag_file, tmp_path):
    """The eval_watch stage is submitted with --requeue (slurm/stage.sbatch): Slurm stops a run of it with SIGTERM (to
    the script and the watcher) and later starts the same script again. Here the real script runs under bash twice with the
    variables Slurm and submit.sh set (no Slurm on this machine: the training job's state cannot be asked, which
    the script takes as "still there"); a cluster test would only add Slurm's own requeue, which
    tests/test_slurm_cluster.py shows for training. The second run scores only what the first had not, and
    eval.command runs once per checkpoint."""
    from tests.slurm_cluster import write_env_file
    script = REPO / "slurm" / "stage.sbatch"
    assert "#SBATCH --requeue\n" in script.read_text()
    run = tmp_path / "run"
    sources = tag_dirs(tiny_run)
    a, c = (run / "checkpoints" / src.name for src in (sources[0], sources[-1]))
    one_checkpoint_run(tiny_run, run, "echo {ckpt} >> {run}/command.log")  # the final one, c: not there yet
    shutil.rmtree(c)
    shutil.copytree(sources[0], a)
    set_latest(run, a.name)
    pipeline = write_env_file(tmp_path / "pipeline.env", {
        "RUN_DIR": run, "DATASET_DIR": tmp_path / "unused", "TRAIN_RECIPE": REPO / "configs/train/tiny-cpu.yaml",
        "HELLASWAG": hellaswag_file, "EVAL_LIMIT": WATCH_LIMIT, "EVAL_POLL": 0.5, "EVAL_MODE": "watch"})
    env = dict(os.environ, PYTHON=PYTHON, SLURM_JOB_ID="4242", TRAIN_JOB_ID="4241")
    env.pop("SLURM_RESTART_COUNT", None)

    def start(log):
        return subprocess.Popen(["bash", str(script), "eval_watch", str(pipeline)], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    with open(tmp_path / "first.log", "w") as log:
        first = start(log)
        deadline = time.time() + 240
        while not (run / "eval" / "results.jsonl").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert [r["tag"] for r in results_of(run)] == [a.name], (tmp_path / "first.log").read_text()
        os.killpg(first.pid, signal.SIGTERM)  # what Slurm does to the job at a requeue
        assert first.wait(timeout=60) == 143, (tmp_path / "first.log").read_text()
    summary = (run / "logs" / "summary.txt").read_text()
    assert " eval_watch 4242 stopped by Slurm (SIGTERM) " in summary and " ok " not in summary, summary
    shutil.copytree(sources[-1], c)  # training went on meanwhile: the final checkpoint
    set_latest(run, c.name)
    with open(tmp_path / "second.log", "w") as log:
        env["SLURM_RESTART_COUNT"] = "1"
        second = start(log)
        assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()
    out = (tmp_path / "second.log").read_text()
    assert out.count("eval watch: scoring ") == 1 and f"scoring {c.name} " in out, out  # a was not scored again
    assert [r["tag"] for r in results_of(run)] == [a.name, c.name]
    assert (run / "command.log").read_text().split() == [str(a), str(c)]
    assert (run / "eval" / "report.md").exists()
    assert (run / "logs" / "summary.txt").read_text().splitlines()[-1].split()[1:4] == ["eval_watch", "4242", "ok"]


def test_watch_refuses_a_missing_hellaswag_file(tmp_path, capsys):
    from eval.__main__ import main
    run = new_run(tmp_path / "run")
    (run / "checkpoints").mkdir(parents=True)
    rc = main(["watch", str(run), "--once", "--hellaswag-file", str(tmp_path / "missing.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "missing.jsonl: no such file or directory" in err
    assert err.count("\n") == 1
    assert not (run / "eval").exists()


@pytest.mark.parametrize("poll", ["1e300", "86401"])
def test_a_poll_too_long_to_sleep_is_a_usage_error(tmp_path, capsys, poll):
    # time.sleep(1e300) raised OverflowError, with a traceback, after the first poll had scored
    from eval.__main__ import main
    run = new_run(tmp_path / "run")
    (run / "checkpoints").mkdir(parents=True)
    rc = main(["watch", str(run), "--poll", poll])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "--poll: at most 86400 seconds" in err and err.count("\n") == 1
    assert not (run / "eval").exists()


def test_final_step_from_either_schedule_form(tmp_path):
    # The watcher reads config.yaml with train's own loader: its final step is the one train stops at.
    from eval.watch import Watcher
    from train.recipe import load
    tiny = REPO / "configs/train/tiny-cpu.yaml"
    for sets, final in ((["schedule.max_steps=200"], 200),
                        (["schedule.max_steps=null", "schedule.max_tokens=1000", "batch.total_tokens=512"], 2),
                        (["schedule.max_steps=null", "schedule.max_tokens=1024", "batch.total_tokens=512"], 2)):
        run = tmp_path / str(len(list(tmp_path.iterdir())))
        new_run(run)
        (run / "config.yaml").write_text(yaml.safe_dump(load(tiny, sets).to_dict()))
        assert Watcher(run, []).max_steps == final, sets
    (new_run(tmp_path / "fresh") / "checkpoints").mkdir(parents=True)  # no config.yaml yet: no final step known
    assert Watcher(tmp_path / "fresh", []).max_steps is None


def test_one_process_scores_several_checkpoints_as_one_process_each_would(tiny_run, hellaswag_file, tmp_path):
    """`eval checkpoint A B`: the tasks are loaded once (the second checkpoint's timings say 0 s for them), and
    each result is the one a process of its own writes."""
    run = tmp_path / "run"
    for src in tag_dirs(tiny_run)[:2]:
        shutil.copytree(src, run / "checkpoints" / src.name)
    a, b = tag_dirs(run)
    common = ["--hellaswag-file", str(hellaswag_file), "--limit", WATCH_LIMIT, "--batch-size", "8", "--device", "cpu"]
    together = subprocess.run([PYTHON, "-m", "eval", "checkpoint", str(a), str(b), *common], cwd=REPO,
                              capture_output=True, text=True)
    assert together.returncode == 0, together.stderr[-3000:]
    alone = subprocess.run([PYTHON, "-m", "eval", "checkpoint", str(b), *common, "--out", str(tmp_path / "b.json")],
                           cwd=REPO, capture_output=True, text=True)
    assert alone.returncode == 0, alone.stderr[-3000:]
    first, second = (json.loads((run / "eval" / f"{t.name}.json").read_text()) for t in (a, b))
    assert first["timings"]["tasks_s"] > 0 and second["timings"]["tasks_s"] == 0
    assert second["tasks"] == json.loads((tmp_path / "b.json").read_text())["tasks"]
    assert second["tag"] == b.name and first["tag"] == a.name


def test_two_dispatchers_submit_each_checkpoint_once(tiny_run, tmp_path):
    """`eval watch --submit CMD`: CMD TAG runs once per checkpoint, under the per-tag submission lock, even with
    two dispatchers looking at once; the job id it prints is the record the second one finds."""
    run = new_run(tmp_path / "run")
    for src in tag_dirs(tiny_run):
        shutil.copytree(src, run / "checkpoints" / src.name)
    shutil.copy(tiny_run / "config.yaml", run / "config.yaml")
    submitter = tmp_path / "submit.sh"   # stands in for sbatch: slow enough for the two to overlap
    submitter.write_text('#!/bin/bash\necho "$1" >> "$(dirname "$0")/submitted.log"\nsleep 1\n'
                         'echo "$((1000 + $(wc -l < "$(dirname "$0")/submitted.log")));cluster"\n')
    submitter.chmod(0o755)
    # A machine without Slurm (a PATH of just what the stand-in uses): no controller to ask about a recorded job,
    # so a dispatcher that finds a record leaves it for the next poll and submits nothing.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "wc", "sleep"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = dict(os.environ, PATH=str(bin_dir))
    cmd = [PYTHON, "-m", "eval", "watch", str(run), "--once", "--submit", f"{submitter} "]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    tags = sorted(t.name for t in tag_dirs(tiny_run))
    assert sorted((tmp_path / "submitted.log").read_text().split()) == tags
    records = {t: json.loads((run / "eval" / ".watch" / f"{t}.submitted").read_text()) for t in tags}
    assert sorted(r["job"] for r in records.values()) == ["1001", "1002"]
    assert all(r["submissions"] == 1 and r["jobs"] == [r["job"]] for r in records.values())
    assert "".join(outs).count("submitted eval job") == len(tags) and "scoring" not in "".join(outs)
    assert not (run / "eval" / "results.jsonl").exists()   # a dispatcher scores nothing itself


def test_a_dispatcher_resubmits_gives_up_on_record_and_starts_over_for_a_new_checkpoint_of_the_same_name(
        tiny_run, tmp_path):
    """Jobs that end without a result are submitted again up to --max-attempts; then results.jsonl says the
    checkpoint was given up. The submission record is of one checkpoint identity: the same tag saved again (a run
    restarted from scratch) gets jobs of its own."""
    from eval.dispatch import Dispatcher
    run = new_run(tmp_path / "run")
    src = tag_dirs(tiny_run)[0]
    tag = run / "checkpoints" / src.name
    shutil.copytree(src, tag)
    shutil.copy(tiny_run / "config.yaml", run / "config.yaml")
    submitter = tmp_path / "submit.sh"  # stands in for sbatch --parsable
    submitter.write_text('#!/bin/bash\necho "$1" >> "$(dirname "$0")/submitted.log"\n'
                         'echo "$((1000 + $(wc -l < "$(dirname "$0")/submitted.log")))"\n')
    submitter.chmod(0o755)
    lines = []

    def dispatcher():
        return Dispatcher(run, str(submitter), max_attempts=2, log=lines.append, job_state=lambda job: "FAILED")

    first = dispatcher()
    for _ in range(3):
        first.poll_once()
    record = json.loads((run / "eval" / ".watch" / f"{tag.name}.submitted").read_text())
    assert record["jobs"] == ["1001", "1002"] and record["checkpoint_id"] == checkpoint_identity(tag)["checkpoint_id"]
    results = [json.loads(line) for line in (run / "eval" / "results.jsonl").read_text().splitlines()]
    assert len(results) == 1 and "gave up after 2 eval jobs without a result" in results[0]["unscored"], results
    assert first.finished == {tag.name: "failed"}
    dispatcher().poll_once()  # a restarted dispatcher gives up too, without a second line or another job
    assert len((run / "eval" / "results.jsonl").read_text().splitlines()) == 1
    assert (tmp_path / "submitted.log").read_text().split() == [tag.name] * 2

    shutil.rmtree(tag)
    shutil.copytree(src, tag)
    mark = json.loads((tag / "complete.json").read_text())
    (tag / "complete.json").write_text(json.dumps({**mark, "written": "2099-01-01T00:00:00+0000"}))
    dispatcher().poll_once()
    record = json.loads((run / "eval" / ".watch" / f"{tag.name}.submitted").read_text())
    assert record["jobs"] == ["1003"] and record["checkpoint_id"] == checkpoint_identity(tag)["checkpoint_id"]
    assert any("submitted eval job 1003 (submission 1 of 2)" in line for line in lines), lines


def test_an_attempts_record_that_is_not_one_is_refused_naming_it_and_the_way_out(tmp_path):
    from eval.harness import EvalError
    from eval.watch import Watcher as InProcess
    run = new_run(tmp_path / "run")
    (run / "checkpoints").mkdir(parents=True)
    watcher = InProcess(run, [])
    record = run / "eval" / ".watch" / "global_step3.attempts"
    record.parent.mkdir(parents=True)
    for content, what in (("abc", "not valid JSON"), ('{"attempts": "2"}', "is not an attempts record"),
                          ("true", "is not an attempts record")):
        record.write_text(content)
        with pytest.raises(EvalError, match=f"{what}.*remove it to count global_step3's evaluation attempts from 0"):
            watcher._attempts(("global_step3", "abcd"))
    record.write_text("2")  # a bare count, as a watcher wrote before counts held the checkpoint identity
    assert watcher._attempts(("global_step3", "abcd")) == 2
    record.write_text(json.dumps({"tag": "global_step3", "checkpoint_id": "other", "attempts": 3}))
    assert watcher._attempts(("global_step3", "abcd")) == 0  # another checkpoint of that name: counted apart
