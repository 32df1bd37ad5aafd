"""A resume whose recipe differs from its checkpoint's (real `python -m train` on the tiny fixtures)."""
import json
import shutil

import yaml

from tests.fixtures_run import read_metrics, run_train, train_command
from train.rundir.checkpoints import read_client_state


def tree(path):
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*")}


def test_changed_recipe_is_refused_unless_allowed_then_recorded(tmp_path, tiny_run, tiny_dataset):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run / "checkpoints", run_dir / "checkpoints")
    for name in ("format.json", "config.yaml"):
        shutil.copy(tiny_run / name, run_dir / name)
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


def saved_param_groups(tag_dir):
    """The optimizer's param groups as the checkpoint saved them (ZeRO-1: the base optimizer's state)."""
    from train.rundir.checkpoints import safe_load
    optim_file = sorted(tag_dir.glob("*optim_states.pt"))[0]
    return safe_load(optim_file)["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]


def test_allowed_optimizer_option_changes_are_applied_not_only_recorded(tmp_path, tiny_run, tiny_dataset):
    """torch's load_state_dict takes every option of the saved param groups: a resume that allowed new weight
    decay, betas and eps must still train (and save) with the new ones."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run / "checkpoints", run_dir / "checkpoints")
    for name in ("format.json", "config.yaml"):
        shutil.copy(tiny_run / name, run_dir / name)
    before = saved_param_groups(run_dir / "checkpoints/global_step6")
    assert [g["weight_decay"] for g in before] == [0.1, 0.0] and {tuple(g["betas"]) for g in before} == {(0.9, 0.95)}
    changed = ["optim.weight_decay=0.05", "optim.betas=[0.8, 0.9]", "optim.eps=1e-6"]
    run_train(train_command(run_dir, tiny_dataset, "schedule.max_steps=7", *changed)
              + [arg for key in ("schedule.max_steps", "optim.weight_decay", "optim.betas", "optim.eps")
                 for arg in ("--allow-change", key)])
    after = saved_param_groups(run_dir / "checkpoints/global_step7")
    assert [g["weight_decay"] for g in after] == [0.05, 0.0]  # the no-decay group stays at 0
    assert all(tuple(g["betas"]) == (0.8, 0.9) and g["eps"] == 1e-6 for g in after), after
