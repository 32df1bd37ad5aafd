"""The console scripts of pyproject.toml's [project.scripts] (installed into the environment's bin/ by
`make install`) run this project's commands from any directory, also one holding a user's own model.py, train.py,
prep.py, eval.py or common.py: `python -m model` looks in the working directory first and would run those."""
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

STAGES = ("prep", "model", "train", "eval")


def declared_scripts() -> dict[str, str]:
    section = (REPO / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+) = "([\w.:]+)"$', section, re.MULTILINE))


def test_each_stage_has_a_console_script():
    assert declared_scripts() == {f"gpt2-{stage}": f"{stage}.__main__:main" for stage in STAGES}


def test_the_installed_scripts_run_ours_from_a_directory_with_a_users_modules(tmp_path):
    bin_dir = Path(sys.executable).parent
    for stage in (*STAGES, "common"):  # what a user's own scripts are often called
        (tmp_path / f"{stage}.py").write_text(f"raise SystemExit('the user\\'s {stage}.py ran')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(script, *argv):
        path = bin_dir / script
        assert path.is_file(), f"{path} is not installed: run `make install` (pip install -e .) after a change " \
                               f"to [project.scripts]"
        return subprocess.run([str(path), *argv], cwd=tmp_path, env=env, capture_output=True, text=True)

    done = run("gpt2-model", "info", "--model", "tiny")
    assert done.returncode == 0 and "token embedding (wte)" in done.stdout, done.stderr
    for stage in STAGES:
        done = run(f"gpt2-{stage}", "--help")
        assert done.returncode == 0 and done.stdout.startswith(f"usage: gpt2-{stage} "), done.stdout + done.stderr
