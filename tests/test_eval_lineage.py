"""Evaluations are never lost and are keyed by what was evaluated (real training, real lm-eval):

a checkpoint rotated away before it was scored is named in results.jsonl and report.md; a run restarted from
scratch gets its checkpoints scored again and its report keeps the earlier run's scores apart; `eval checkpoint`
then `eval report` shows the score; eval's outputs never land in checkpoints or datasets nor replace what eval did
not write, and one that cannot be written is refused before the scoring; HellaSwag goes to TensorBoard and W&B,
and curves.png has the training loss."""
import hashlib
import json
import shlex
import shutil
import subprocess

import pytest

from tests.conftest import PYTHON, REPO
from tests.fixtures_run import read_metrics, run_train, train_command
from tests.test_train_writer import in_namespace
from tests.test_wandb_log import history, offline_env

LIMIT = "8"  # docs per checkpoint: what is recorded is under test here, not the scores


@pytest.fixture(scope="module")
def hellaswag_file(shared_dir):
    return shared_dir / "data" / "hellaswag_val.jsonl"


def eval_cmd(*args, env=None, timeout=300):
    return subprocess.run([PYTHON, "-m", "eval", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=timeout)


def watch_once(run, hellaswag_file, env=None):
    done = eval_cmd("watch", run, "--once", "--hellaswag-file", hellaswag_file, "--limit", LIMIT, "--batch-size", "8",
                    env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def report_of(run) -> str:
    done = eval_cmd("report", run)
    assert done.returncode == 0, done.stderr
    return (run / "eval" / "report.md").read_text()


def results_of(run) -> list[dict]:
    return [json.loads(line) for line in (run / "eval" / "results.jsonl").read_text().splitlines()]


def table_rows(report: str) -> list[list[str]]:
    """The cells of the main table's rows (before any further section)."""
    main = report.split("\n## ")[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in main.splitlines()
            if line.startswith("| ") and line[2].isdigit()]


def train_rotating(run, tiny_dataset, *overrides, env=None):
    """6 steps, checkpoints at 3 and 6, keep_last 1: global_step3 is rotated away during training, before any
    watcher ran (as under submit.sh --local, where the watcher runs after training)."""
    run_train(train_command(run, tiny_dataset, "checkpoint.keep_last=1", "sample.every=0", *overrides), env=env)
    assert [p.name for p in (run / "checkpoints").glob("global_step*")] == ["global_step6"]


@pytest.fixture(scope="module")
def rotated_run(tmp_path_factory, tiny_dataset, hellaswag_file):
    tmp = tmp_path_factory.mktemp("lineage")
    env = offline_env(tmp)
    run = tmp / "run"
    train_rotating(run, tiny_dataset, "log.wandb=true", env=env)
    out = watch_once(run, hellaswag_file, env)
    return dict(run=run, env=env, out=out, report=report_of(run))


def test_a_checkpoint_rotated_away_before_it_was_scored_is_named_in_results_and_report(rotated_run, hellaswag_file):
    run = rotated_run["run"]
    by_tag = {r["tag"]: r for r in results_of(run)}
    assert set(by_tag) == {"global_step3", "global_step6"}
    assert by_tag["global_step6"]["tasks"]["hellaswag"]["n_docs"] == int(LIMIT)
    lost = by_tag["global_step3"]
    assert "tasks" not in lost and lost["step"] == 3 and lost["checkpoint_id"]
    assert lost["unscored"].startswith("rotated away by checkpoint.keep_last=1 ")
    assert lost["unscored"].endswith("before it was scored")
    assert "global_step3: rotated away by checkpoint.keep_last=1" in rotated_run["out"]
    assert [r[0] for r in table_rows(rotated_run["report"])] == ["6"]
    not_scored = rotated_run["report"].split("## Not scored")[1]
    assert f"| 3 | global_step3 | {lost['unscored']} |" in not_scored
    # Said once: another watcher finds it recorded.
    watch_once(run, hellaswag_file)
    assert len(results_of(run)) == 2


def test_hellaswag_goes_to_tensorboard_and_wandb_and_curves_have_the_training_loss(rotated_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from eval.report import collect
    run = rotated_run["run"]
    hs = {r["tag"]: r for r in results_of(run)}["global_step6"]["tasks"]["hellaswag"]
    events = EventAccumulator(str(run / "tb" / "eval"))
    events.Reload()
    for name in ("acc", "acc_norm"):
        assert [(e.step, round(e.value, 6)) for e in events.Scalars(f"eval/hellaswag/{name}")] \
            == [(6, round(hs[name], 6))]
    wandb_id = (run / "wandb_id").read_text().strip()
    (evaluated,) = (run / "wandb").glob(f"offline-run-*-{wandb_id}-eval")
    assert [(r["step"], r["eval/hellaswag/acc_norm"]) for r in history(evaluated)] == [(6, hs["acc_norm"])]
    _, curves = collect(run)
    train, _ = read_metrics(run)
    assert curves["train_loss"] == [(m["tokens"], m["loss"]) for m in train]


def test_a_run_restarted_from_scratch_is_scored_again_and_the_earlier_scores_kept_apart(
        rotated_run, tiny_dataset, hellaswag_file, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(rotated_run["run"], run)
    earlier = {r["tag"]: r for r in results_of(run)}
    shutil.rmtree(run / "checkpoints")
    (run / "config.yaml").unlink()
    train_rotating(run, tiny_dataset, "seed=7")  # another model under the same tag names
    out = watch_once(run, hellaswag_file)
    assert "scoring global_step6" in out, out
    records = results_of(run)
    scored6 = [r for r in records if r["tag"] == "global_step6" and "tasks" in r]
    assert len(scored6) == 2 and scored6[0] == earlier["global_step6"]
    new = scored6[1]
    assert new["checkpoint_id"] != scored6[0]["checkpoint_id"]
    report = report_of(run)
    # The current run's row: its own score beside its own losses, never the earlier model's.
    [row] = table_rows(report)
    train, _ = read_metrics(run)
    assert row[0] == "6" and row[2] == f"{train[-1]['loss']:.4f}"
    hs = new["tasks"]["hellaswag"]
    assert row[5].startswith(f"{hs['acc_norm']:.4f} ± ")
    section = report.split("## Earlier runs in this directory")[1]
    assert f"| 6 | global_step6 | {scored6[0]['checkpoint_written']} |" in section
    # The current run's rotated checkpoint is named; the earlier run's is not repeated as this run's.
    not_scored = report.split("## Not scored")[1].split("## Earlier")[0]
    assert not_scored.count("global_step3") == 1


def test_eval_checkpoint_then_report_shows_the_score(tiny_run, hellaswag_file, tmp_path):
    from eval.results import is_our_result
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    done = eval_cmd("checkpoint", run, "--hellaswag-file", hellaswag_file, "--limit", LIMIT, "--batch-size", "8")
    assert done.returncode == 0, done.stderr
    result = json.loads((run / "eval" / "global_step6.json").read_text())
    [row] = table_rows(report_of(run))
    assert row[0] == "6" and row[5].startswith(f"{result['tasks']['hellaswag']['acc_norm']:.4f} ± ")
    assert is_our_result(run / "eval" / "global_step6.json")  # so --out may name it again


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_outputs_never_land_in_checkpoints_or_datasets_nor_replace_files_eval_did_not_write(
        tiny_run, tiny_dataset, tmp_path):
    from eval.watch import complete_checkpoints
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    tag = run / "checkpoints" / "global_step6"
    for out in (run / "checkpoints" / "global_step9", tag / "hf", tiny_dataset / "export"):
        done = eval_cmd("export", run, "--out", out)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith(f"error: --out {out} lies inside ") and not out.exists()
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    states = tag / "mp_rank_00_model_states.pt"
    before = {p: digest(p) for p in (notes, states)}
    for out, why in ((states, "lies inside checkpoint"), (notes, "exists and is not an earlier eval result"),
                     (notes / "x.json", f"{notes} is not a directory")):  # refused before scoring, not after
        done = eval_cmd("checkpoint", run, "--out", out, "--limit", LIMIT)
        assert done.returncode == 1 and done.stderr.count("\n") == 1 and why in done.stderr, done.stderr
        assert "loglikelihood" not in done.stdout + done.stderr
    done = eval_cmd("export", run, "--out", notes / "hf")
    assert done.returncode == 1 and done.stderr == f"error: --out {notes / 'hf'}: {notes} is not a directory; " \
                                                   f"choose another --out\n", done.stderr
    assert {p: digest(p) for p in before} == before
    # An export moved into checkpoints/ by hand is still not a checkpoint: it has no completion mark.
    exported = tmp_path / "hf"
    assert eval_cmd("export", run, "--out", exported).returncode == 0
    shutil.move(exported, run / "checkpoints" / "global_step9")
    assert list(complete_checkpoints(run)) == ["global_step3", "global_step6"]


@pytest.mark.parametrize("under", ["result.json", "new/dir/result.json"])
def test_an_out_in_a_directory_that_cannot_be_written_is_refused_before_scoring(tiny_run, hellaswag_file, tmp_path,
                                                                                under):
    # A read-only mount: root writes through permission bits, so it is the unwritable directory root meets too.
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    locked = tmp_path / "read-only"
    locked.mkdir()
    out = locked / under
    quoted = shlex.quote(str(locked))
    cmd = in_namespace(f"mount --bind {quoted} {quoted}; mount -o remount,bind,ro {quoted}",
                       [PYTHON, "-m", "eval", "checkpoint", run, "--out", out, "--hellaswag-file", hellaswag_file,
                        "--limit", LIMIT, "--batch-size", "8"])
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1 and done.stderr == (
        f"error: --out {out}: cannot write in {locked} (Read-only file system); make it writable or choose another "
        f"--out\n"), done.stderr
    assert done.stdout == ""  # refused before the start-up table, let alone the scoring
    assert list(locked.iterdir()) == []
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p != locked) == before
