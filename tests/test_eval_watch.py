"""`eval watch` beside a run whose checkpoints appear while it polls, and `eval report` on the result."""
import json
import os
import shutil
import subprocess
import threading
import time

import pytest
import yaml

from tests.conftest import PYTHON, REPO

WATCH_LIMIT = "8"  # docs per checkpoint: the watcher's bookkeeping is under test here, not the scores


def step_of(tag_dir):
    return int(tag_dir.name.removeprefix("global_step"))


def tag_dirs(run):
    return sorted((p for p in (run / "checkpoints").glob("global_step*") if p.is_dir()), key=step_of)


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
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
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
def watched_run(tiny_run, hellaswag_file, tmp_path_factory):
    """Training replayed from tiny_run's real checkpoints while a watcher runs:

    A and B complete at start; B is rotated away while A is scored; a second watcher starts meanwhile;
    the final checkpoint C is first half-written (latest still names B), then completed.
    """
    source = tag_dirs(tiny_run)
    assert len(source) >= 2, "tiny_run must hold at least two checkpoints"
    a_src, c_src = source[0], source[-1]
    run = tmp_path_factory.mktemp("watched") / "run"
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
    run = tmp_path / "run"
    src = tag_dirs(tiny_run)[0]
    tag = run / "checkpoints" / src.name
    shutil.copytree(src, tag)
    model_file = tag / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])  # a crash mid-write that left `latest` behind
    set_latest(run, tag.name)
    outputs = []
    for _ in range(3):
        w = Watcher(run, hellaswag_file, "--once", "--max-attempts", "2")
        rc, out = w.finish()
        assert rc == 0
        outputs.append(out)
    assert "scoring" in outputs[0] and "will retry" in outputs[0]
    assert "attempt 2 of 2" in outputs[1] and "gave up after 2 failed attempts" in outputs[1]
    assert "scoring" not in outputs[2] and "gave up" in outputs[2]  # bounded: no third attempt
    assert not (run / "eval" / "results.jsonl").exists()
    assert not (run / "eval" / f"{tag.name}.json").exists()


def test_report_table_and_curves(watched_run):
    run = watched_run["run"]
    proc = subprocess.run([PYTHON, "-m", "eval", "report", str(run)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = (run / "eval" / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and line[2].isdigit()]
    results = [json.loads(line) for line in (run / "eval" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(results) == 2
    for row, result in zip(rows, results):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == str(result["step"])
        assert cells[1] == f"{result['tokens_seen']:,}"
        assert cells[5] == f"{result['tasks']['hellaswag']['acc_norm']:.4f}"
        assert all(cell != "–" for cell in cells), row  # train and val loss found for every checkpoint
    png = (run / "eval" / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_watch_refuses_a_missing_hellaswag_file(tmp_path, capsys):
    from eval.__main__ import main
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    rc = main(["watch", str(run), "--once", "--hellaswag-file", str(tmp_path / "missing.jsonl")])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and "missing.jsonl not found" in err and err.count("\n") == 1
    assert not (run / "eval").exists()


def test_final_step_from_either_schedule_form():
    from eval.watch import final_step
    assert final_step({"schedule": {"max_steps": 200, "max_tokens": None}}) == 200
    assert final_step({"schedule": {"max_steps": None, "max_tokens": 1000}, "batch": {"total_tokens": 512}}) == 2
    assert final_step({"schedule": {"max_steps": None, "max_tokens": 1024}, "batch": {"total_tokens": 512}}) == 2
    assert final_step({}) is None
