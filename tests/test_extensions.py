"""DeepSpeed's CPU communication op: built once per venv (make install), found at start-up on a cold account, and a
stale torch build lock named in one line instead of waited on forever."""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPO
from tests.fixtures_run import train_command
from train import extensions

VENV_OP = extensions.venv_build_dir() / extensions.OP


def test_a_venv_gets_its_own_extension_directory_unless_the_user_set_one():
    env = {}
    assert sys.prefix != sys.base_prefix  # the tests run in the project's venv
    mine = extensions.use_venv_build_dir(env)
    assert Path(mine).parent == Path(sys.prefix) / "torch_extensions" and env == {"TORCH_EXTENSIONS_DIR": mine}
    env = {"TORCH_EXTENSIONS_DIR": "/mine"}
    assert extensions.use_venv_build_dir(env) == "/mine" and env == {"TORCH_EXTENSIONS_DIR": "/mine"}


def test_a_venv_reached_through_a_symlink_builds_apart(tmp_path):
    """Its spelling is in the build's command line: one shared directory would rebuild the op at each alternation."""
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    code = "from train import extensions; print(extensions.venv_build_dir())"
    other = subprocess.run([str(tmp_path / ".venv/bin/python"), "-c", code], cwd=REPO, capture_output=True, text=True,
                           timeout=60).stdout.strip()
    assert Path(other).parent == tmp_path / ".venv" / "torch_extensions"
    assert Path(other).name != extensions.venv_build_dir().name


def test_a_cold_account_starts_without_building_the_op(tmp_path):
    """After the install step, a process group on CPU with an empty HOME loads the venv's build: nothing is built
    (the library is not rewritten) and nothing is written under HOME."""
    install = subprocess.run([PYTHON, "-m", "train.extensions"], cwd=REPO, capture_output=True, text=True,
                             timeout=900, env={k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"})
    assert install.returncode == 0 and "built in" in install.stdout, install.stderr
    library = next(VENV_OP.glob("*.so"))
    built_at = library.stat().st_mtime_ns
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    env.update(HOME=str(home), DS_ACCELERATOR="cpu")
    code = ("from datetime import timedelta; from train import launch; place = launch.setup(); "
            "launch.init_distributed(place, timedelta(minutes=1)); from deepspeed.comm import comm as dist; "
            "print('shm op', dist.cdb.shm_comm_op is not None)")
    result = subprocess.run([PYTHON, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shm op True" in result.stdout
    assert library.stat().st_mtime_ns == built_at
    assert not (home / ".cache/torch_extensions").exists()


def test_a_stale_build_lock_is_named_in_one_line_not_waited_on(tmp_path, tiny_dataset):
    """A lock left by a killed build: train stops at once, exit 1, naming the lock and the rm command (torch alone
    waits on it forever)."""
    build_dir = tmp_path / "ext" / extensions.OP
    build_dir.mkdir(parents=True)
    lock = build_dir / "lock"
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    # torch alone never returns: the timeout is the failure (start-up takes up to ~2 minutes on 2 busy cores).
    result = subprocess.run(train_command(tmp_path / "run", tiny_dataset), cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=400)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"rm {lock}" in last and "stale" in last, last
    assert lock.exists()  # named, never removed: it may belong to a build we cannot see


def test_a_young_lock_is_waited_on_and_said_and_one_that_turns_stale_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(extensions, "NOTICE_AFTER_S", 0.2)
    monkeypatch.setattr(extensions, "POLL_S", 0.05)
    lock = tmp_path / "lock"
    lock.touch()
    said = []
    threading.Timer(0.6, lock.unlink).start()  # another process's build finishing
    extensions.wait_for_lock(tmp_path, stale_after=60, log=lambda *a, **k: said.append(a[0]))
    assert len(said) == 1 and f"rm {lock}" in said[0] and "waiting" in said[0]

    lock.touch()
    with pytest.raises(extensions.StaleLockError, match="stale lock"):
        extensions.wait_for_lock(tmp_path, stale_after=0.5, log=lambda *a, **k: None)
    assert lock.exists()

    extensions.wait_for_lock(tmp_path / "nothing-here", log=lambda *a, **k: pytest.fail("no lock, nothing to say"))
