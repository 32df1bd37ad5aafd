"""Paths in a saved recipe: RUN/config.yaml resumes its run from any working directory (train.paths)."""
import os
import subprocess

import yaml

from tests.conftest import PYTHON, REPO
from tests.fixtures_run import read_metrics, run_train, train_command


def run_in(cwd, args) -> subprocess.CompletedProcess:
    """`python -m train ARGS` started in cwd, with this checkout importable (as an installed package would be)."""
    result = subprocess.run([PYTHON, "-m", "train", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_saved_recipe_resumes_its_run_from_another_directory(tmp_path, tiny_dataset):
    run_dir = tmp_path / "run"
    run_train(train_command(run_dir, tiny_dataset, "schedule.max_steps=2", "sample.every=0"))
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["deepspeed"] == str(REPO / "configs/deepspeed/zero1.json")  # named relatively (FAST)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The saved recipe as the config, from another directory, one more update allowed.
    result = run_in(elsewhere, ["--config", str(run_dir / "config.yaml"), "--set", "schedule.max_steps=3",
                                "--allow-change", "schedule.max_steps"])
    assert "resuming from" in result.stdout
    assert [r["step"] for r in read_metrics(run_dir)[0]] == [1, 2, 3]
    assert not list(elsewhere.iterdir())  # nothing written in the working directory


def test_relative_paths_are_read_from_the_working_directory(tmp_path, tiny_dataset):
    (tmp_path / "ds.json").write_text((REPO / "configs/deepspeed/zero1.json").read_text())
    (tmp_path / "data").symlink_to(tiny_dataset)
    args = train_command("run", "data", "schedule.max_steps=1", "eval.every=0", "sample.every=0",
                         "deepspeed=ds.json")[3:]
    run_in(tmp_path, args)
    saved = yaml.safe_load((tmp_path / "run/config.yaml").read_text())
    assert saved["run_dir"] == str(tmp_path / "run") and saved["data"]["dir"] == str(tmp_path / "data")
    assert saved["deepspeed"] == str(tmp_path / "ds.json")
