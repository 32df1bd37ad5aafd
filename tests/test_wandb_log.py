"""Weights & Biases (log.wandb, train.wandb_log) with the real wandb package in offline mode: the run's scalars, one
W&B run id kept in the run directory across a resume, eval results, and a missing package in one line."""
import json
import os
import struct
import subprocess

import pytest
import wandb
from wandb.proto import wandb_internal_pb2

from tests.conftest import PYTHON, REPO
from tests.fixtures_run import read_metrics, run_train, train_command
from train.recipe import load
from train.wandb_log import WandbError, WandbSink, log_eval


def offline_env(tmp_path) -> dict:
    """Offline, with W&B's own settings and caches in tmp (never the account's)."""
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
            "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
            "WANDB_SILENT": "true"}


def history(offline_dir) -> list[dict]:
    """The logged rows of an offline W&B run: its run-ID.wandb file is a LevelDB-style log (32 KiB blocks, 7-byte
    record headers: crc32, length, type) of protobuf Records after a 7-byte ":W&B" file header."""
    (path,) = offline_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    rows, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if (length, kind) == (0, 0):
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                # a key with "/" (train/loss) is stored as its parts
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_a_run_logs_to_one_wandb_run_across_a_resume(tmp_path, tiny_dataset, monkeypatch):
    run_dir, env = tmp_path / "run", offline_env(tmp_path)
    run_train(train_command(run_dir, tiny_dataset, "schedule.max_steps=2", "sample.every=0", "eval.every=2",
                            "log.wandb=true"), env=env)
    wandb_id = (run_dir / "wandb_id").read_text().strip()
    (first,) = (run_dir / "wandb").glob(f"offline-run-*-{wandb_id}")
    rows = history(first)
    train, val = read_metrics(run_dir)
    assert [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r] == [(r["step"], r["loss"]) for r in train]
    assert [(r["step"], r["val/val_loss"]) for r in rows if "val/val_loss" in r] == [(2, val[0]["val_loss"])]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(rows[0])  # TensorBoard's scalars
    # Resumed (as a requeue would): the same W&B run id, the next step logged into it.
    run_train(train_command(run_dir, tiny_dataset, "schedule.max_steps=3", "sample.every=0", "eval.every=2",
                            "log.wandb=true") + ["--allow-change", "schedule.max_steps"], env=env)
    assert (run_dir / "wandb_id").read_text().strip() == wandb_id
    (second,) = set((run_dir / "wandb").glob(f"offline-run-*-{wandb_id}")) - {first}
    assert [r["step"] for r in history(second) if "train/loss" in r] == [3]
    # An eval job's result: TensorBoard under RUN/tb/eval, W&B in the companion run ID-eval.
    for key, value in env.items():
        if key.startswith("WANDB_"):
            monkeypatch.setenv(key, value)
    log_eval(run_dir, 3, {"hellaswag/acc_norm": 0.25})
    (evaluated,) = (run_dir / "wandb").glob(f"offline-run-*-{wandb_id}-eval")
    assert [(r["step"], r["eval/hellaswag/acc_norm"]) for r in history(evaluated)] == [(3, 0.25)]
    assert list((run_dir / "tb/eval").glob("events.out.tfevents.*"))


BLOCK_WANDB = """
import runpy, sys
class NoWandb:  # this environment without the wandb package
    def find_spec(self, name, path=None, target=None):
        if name == "wandb" or name.startswith("wandb."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NoWandb())
sys.argv = ["train", *sys.argv[1:]]
runpy.run_module("train", run_name="__main__")
"""


def test_log_wandb_without_the_package_is_one_line(tmp_path, tiny_dataset):
    args = train_command(tmp_path / "run", tiny_dataset, "log.wandb=true")[3:]
    result = subprocess.run([PYTHON, "-c", BLOCK_WANDB, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: log.wandb is true but the wandb package is not installed: "
                                     "pip install -e '.[wandb]' (or pip install wandb), or set log.wandb=false")
    assert not (tmp_path / "run").exists()


def test_a_wandb_run_that_cannot_be_opened_is_one_line(tmp_path, monkeypatch):
    # Online with no API key (and no network here): W&B's refusal, in one line that says what to do.
    wandb.teardown()  # W&B keeps the settings of an earlier init in this process (log_eval's, offline) until then
    for key, value in offline_env(tmp_path).items():
        if key.startswith("WANDB_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    recipe = load(REPO / "configs/train/tiny-cpu.yaml", [f"run_dir={tmp_path / 'run'}", "log.wandb=true"])
    (tmp_path / "run").mkdir()
    with pytest.raises(WandbError) as error:
        WandbSink(tmp_path / "run", recipe)
    assert "\n" not in str(error.value)
    assert str(error.value).startswith("log.wandb: cannot open the W&B run ")
    assert str(error.value).endswith("; set WANDB_MODE=offline on machines without network, or log.wandb=false")


def test_a_wandb_run_that_cannot_be_opened_stops_every_rank(tmp_path, tiny_dataset):
    # Rank 0 alone opens W&B. Started as srun starts them (no launcher to kill the others when one fails), rank 1
    # waited in the first update's collective until the process-group timeout (an hour by default) unless the
    # outcome is shared; the communicate timeout asserts it is.
    from tests.fixtures_run import free_port
    env = {**offline_env(tmp_path), "WANDB_MODE": "online", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    env.pop("WANDB_API_KEY", None)
    cmd = train_command(tmp_path / "run", tiny_dataset, "log.wandb=true", "heal.watchdog_minutes=0")
    ranks = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    try:
        outputs = [rank.communicate(timeout=240) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    for rank, (_out, err) in zip(ranks, outputs):
        assert rank.returncode == 1, err[-3000:]
        assert "error: log.wandb: cannot open the W&B run " in err, err[-3000:]
    assert not list((tmp_path / "run" / "checkpoints").glob("global_step*"))
