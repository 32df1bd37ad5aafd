"""A resume whose recipe differs from its checkpoint's (real `python -m train` on the tiny fixtures)."""
import json
import shutil

import yaml

from tests.fixtures_run import read_metrics, run_train, train_command
from model.checkpoint import read_client_state


def tree(path):
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*")}


def test_changed_recipe_is_refused_unless_allowed_then_recorded(tmp_path, tiny_run, tiny_dataset):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run / "checkpoints", run_dir / "checkpoints")
    shutil.copy(tiny_run / "config.yaml", run_dir / "config.yaml")
    before = tree(run_dir)
    cmd = train_command(run_dir, tiny_dataset, "schedule.max_steps=7", "optim.max_lr=1e-3")  # one more step

    refused = run_train(cmd, check_rc=2)
    assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("error: "), refused.stderr
    assert "schedule.max_steps 6 -> 7" in refused.stderr and "optim.max_lr 0.003 -> 0.001" in refused.stderr
    assert tree(run_dir) == before  # nothing written, nothing touched

    allowed = run_train(cmd + ["--allow-change", "schedule.max_steps", "--allow-change", "optim.max_lr"])
    assert "at step 6" in allowed.stdout
    assert [r["step"] for r in read_metrics(run_dir)[0]] == [7]
    history = [json.loads(line) for line in (run_dir / "recipe_history.jsonl").read_text().splitlines()]
    assert len(history) == 1 and history[0]["step"] == 6 and history[0]["time"] > 0
    assert history[0]["changes"] == {"schedule.max_steps": {"old": 6, "new": 7},
                                     "optim.max_lr": {"old": 0.003, "new": 0.001}}
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["schedule"]["max_steps"] == 7 and config["optim"]["max_lr"] == 0.001
    assert read_client_state(run_dir / "checkpoints/global_step7")["config"] == config
