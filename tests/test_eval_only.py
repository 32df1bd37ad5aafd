"""`eval watch --only TAG` for a tag the run has not written: one it never writes is refused (exit 2), one it has
not got to yet is waited for (with --once: exit 1, saying so), one older than the newest checkpoint is gone
(rotated away: exit 0). Before, every such tag was taken as rotated away: exit 0 with nothing scored."""
import yaml

from eval.__main__ import main
from tests.conftest import REPO, SHARED
from train.recipe import load

HELLASWAG = SHARED / "data" / "hellaswag_val.jsonl"


def run_dir(tmp_path, max_steps=40, tags=()):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "format.json").write_text('{"format": 1}\n')  # as train starts a run directory
    recipe = load(REPO / "configs/train/tiny-cpu.yaml", [f"schedule.max_steps={max_steps}"])
    (run / "config.yaml").write_text(yaml.safe_dump(recipe.to_dict()))
    for tag in tags:
        (run / "checkpoints" / tag).mkdir()
    return run


def watch(run, *argv):
    return main(["watch", str(run), "--hellaswag-file", str(HELLASWAG), "--poll", "0.01", *argv])


def test_a_tag_the_run_never_writes_is_refused(tmp_path, capsys):
    run = run_dir(tmp_path)
    assert watch(run, "--only", "global_step99") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --only global_step99: ") and "stops at step 40" in err
    assert watch(run, "--only", "step5") == 2
    assert "--only step5: not a checkpoint tag (global_stepN)" in capsys.readouterr().err
    assert not (run / "eval").exists()


def test_a_tag_not_written_yet_is_waited_for_and_one_rotated_away_is_done(tmp_path, capsys):
    run = run_dir(tmp_path, tags=["global_step10"])
    assert watch(run, "--only", "global_step20", "--once") == 1
    out = capsys.readouterr().out
    assert "global_step20: not written yet (newest checkpoint: global_step10); waiting for it" in out
    assert "rotated" not in out
    assert watch(run, "--only", "global_step5", "--once") == 0  # older than the newest and gone: rotated away
    assert "global_step5: not in checkpoints/ (rotated away" in capsys.readouterr().out
