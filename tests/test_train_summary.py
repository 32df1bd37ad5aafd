"""The summary a finished run prints (train.summary): its numbers, and next-step commands that run as printed."""
import json
import shlex
import shutil
import subprocess

from tests.conftest import PYTHON, REPO
from tests.fixtures_run import read_metrics, run_train, train_command
from train.summary import text


def test_a_finished_run_prints_its_summary_and_the_commands_run(tmp_path, tiny_dataset):
    run_dir = tmp_path / "run"
    out = run_train(train_command(run_dir, tiny_dataset, "schedule.max_steps=2", "sample.every=0")).stdout
    summary = out[out.index("training finished"):]
    train, val = read_metrics(run_dir)
    assert f"final loss       {train[-1]['loss']:.4f} (step 2)" in summary
    assert f"final val loss   {val[-1]['val_loss']:.4f} (step 2)" in summary
    assert "tokens           256\n" in summary and "tokens/s" in summary and "GPU-hours" not in summary
    assert f"last checkpoint  {run_dir / 'checkpoints/global_step2'}" in summary
    commands = [line.strip() for line in summary[summary.index("next:\n"):].splitlines()[1:]]
    assert [c.split()[:3] for c in commands] == [["tensorboard", "--logdir", str(run_dir / "tb")],
                                                 ["python", "-m", "model"], ["python", "-m", "eval"]]
    assert list((run_dir / "tb").glob("events.out.tfevents.*")) and shutil.which("tensorboard", path=PYTHON[:-7])
    for command in commands[1:]:  # as printed, `python` being this environment's
        argv = shlex.split(command)
        result = subprocess.run([PYTHON, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (command, result.stderr[-2000:])
    assert (tmp_path / "run-hf/model.safetensors").is_file()


def test_gpu_runs_report_mfu_and_gpu_hours(tmp_path):
    lines = [{"step": 1, "loss": 9.0, "mfu": 0.4}, {"step": 2, "loss": 8.0, "mfu": 0.5}, {"step": 2, "val_loss": 8.5},
             {"step": 3, "loss": 7.0, "mfu": 0.6}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = text(tmp_path, start_step=1, end_step=3, tokens=1000, seconds=7200, world_size=8, on_gpu=True)
    assert "final loss       7.0000 (step 3)" in out and "final val loss   8.5000 (step 2)" in out
    assert "mean MFU         55.0% over 2 logged updates" in out  # steps 2 and 3: this session's
    assert "GPU-hours        16.00 (8 GPU(s))" in out and "last checkpoint  none" in out
