"""Training runs made by the real `python -m train` on tiny_dataset, for train/eval/slurm tests."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPO

__all__ = ["tiny_run", "train_command", "run_train", "read_metrics"]

# Shapes small enough that one optimizer step takes about a second on a busy 2-core CPU.
FAST = ["schedule.max_steps=6", "optim.warmup_steps=3", "batch.seq_len=32", "batch.micro_batch=2", "batch.total_tokens=128",
        "eval.every=3", "eval.val_batches=2", "checkpoint.every=3", "checkpoint.keep_last=3",
        "sample.every=3", "sample.max_new_tokens=8", "log.tensorboard=true"]


def train_command(run_dir, dataset, *overrides, nproc: int = 1, port: int | None = None,
                  launcher: str = "torchrun", module: str = "train") -> list[str]:
    """`python -m train` alone (nproc 1), or with nproc CPU ranks (gloo) under torchrun or the deepspeed launcher;
    module names a wrapper of train's CLI instead (tests.live_fp32_train)."""
    sets = [f"run_dir={run_dir}", f"data.dir={dataset}", *FAST, *overrides]
    args = ["-m", module, "--config", str(REPO / "configs/train/tiny-cpu.yaml")]
    for s in sets:
        args += ["--set", s]
    if nproc == 1:
        return [PYTHON, *args]
    if launcher == "deepspeed":
        # On CPU the deepspeed launcher counts "devices" from LOCAL_SIZE; `env` makes the command self-contained.
        return ["env", f"LOCAL_SIZE={nproc}", str(Path(PYTHON).parent / "deepspeed"), "--num_gpus", str(nproc),
                "--master_port", str(port or 29500), "--module", *args[1:]]
    return [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(port or 29500), *args]


def run_train(cmd, check_rc: int | None = 0, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check_rc is not None and result.returncode != check_rc:
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-6000:])
        raise AssertionError(f"train exited {result.returncode}, expected {check_rc}: {' '.join(map(str, cmd))}")
    return result


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training lines, validation lines) of RUN/metrics.jsonl."""
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "val_loss" in r]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_dataset) -> Path:
    """A finished 6-step single-process run of configs/train/tiny-cpu.yaml: checkpoints at steps 3 and 6,
    metrics.jsonl with train and val lines, samples.jsonl, TensorBoard events."""
    run_dir = tmp_path_factory.mktemp("tiny_run") / "run"
    run_train(train_command(run_dir, tiny_dataset))
    return run_dir
